"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention, the first
`first_k_dense_replace` layers dense, then MoE layers with sigmoid scores, a selection bias
(`e_score_correction_bias`), group-limited top-k, renormalisation, a routed scaling factor
and ungated shared experts. The router weight and bias stay float32 in any dtype, as
transformers keeps them.

DeepSeek stores rotary dimensions interleaved (pairs (x0, x1), (x2, x3), ... share a
frequency; `rope_interleave=true`); jaxmoe uses the rotate-half layout, so the rows that
produce rotary dimensions (in `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa`) are permuted
evens-then-odds on the way in and back on the way out. The permutation is exact, so a round
trip is bit-identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxmoe.config import Config, ModelConfig
from jaxmoe.convert import layout as lo

NAME = "deepseek_v3"
# transformers' DeepseekV3Config defaults, used for keys a config.json leaves out.
HF_DEFAULTS = {"n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
               "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
               "qk_nope_head_dim": 128, "v_head_dim": 128, "rope_interleave": True,
               "attention_bias": False, "moe_intermediate_size": 2048,
               "intermediate_size": 18432}


def check(m: ModelConfig) -> None:
    lo.check_common(NAME, m)
    if m.attention != "mla":
        lo.refuse(NAME, f"model.attention={m.attention!r} cannot be represented (DeepSeek-V3 "
                  "uses multi-head latent attention: set model.attention=mla)")
    wrong = {"model.moe_every": (m.moe_every, 1),
             "model.router_scoring": (m.router_scoring, "sigmoid"),
             "model.shared_expert_gate": (m.shared_expert_gate, False)}
    for key, (have, want) in wrong.items():
        if have != want:
            lo.refuse(NAME, f"{key}={have!r} cannot be represented (DeepSeek-V3 needs {want!r})")
    if m.num_shared_experts < 1:
        lo.refuse(NAME, "model.num_shared_experts=0 cannot be represented (DeepSeek-V3 has "
                  "ungated shared experts)")
    if m.resolved_shared_mlp_dim != m.expert_mlp_dim * m.num_shared_experts:
        lo.refuse(NAME, f"model.shared_expert_mlp_dim={m.shared_expert_mlp_dim} cannot be "
                  "represented (DeepSeek-V3 uses expert_mlp_dim * num_shared_experts)")
    if m.num_experts < 2 * m.n_group:
        lo.refuse(NAME, f"model.num_experts={m.num_experts}: DeepSeek-V3 scores groups by their "
                  f"top-2 experts, so it needs >= 2 experts per group (n_group={m.n_group})")


def hf_config(cfg: Config, dtype: str) -> dict[str, Any]:
    m = cfg.model
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": NAME,
            **lo.base_hf_config(cfg, dtype), "num_key_value_heads": m.num_heads,
            "head_dim": m.qk_rope_head_dim, "qk_head_dim": m.qk_nope_head_dim + m.qk_rope_head_dim,
            "intermediate_size": m.mlp_dim, "moe_intermediate_size": m.expert_mlp_dim,
            "n_routed_experts": m.num_experts, "num_local_experts": m.num_experts,
            "n_shared_experts": m.num_shared_experts,
            "routed_scaling_factor": m.routed_scaling_factor,
            "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "n_group": m.n_group, "topk_group": m.topk_group,
            "first_k_dense_replace": m.first_k_dense, "moe_layer_freq": 1,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True,
            "attention_bias": False, "num_nextn_predict_layers": 0}


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    h = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k == "q_lora_rank"}}
    if not h["rope_interleave"]:
        lo.refuse(NAME, "rope_interleave=false is not supported")
    if h["attention_bias"]:
        lo.refuse(NAME, "attention_bias=true is not supported")
    if h.get("scoring_func", "sigmoid") != "sigmoid":
        lo.refuse(NAME, f"scoring_func={h['scoring_func']!r} is not supported (expected sigmoid)")
    base = lo.base_model_fields(NAME, h, kv_heads=h["num_attention_heads"], max_positions=4096)
    return {**base, "head_dim": h["qk_rope_head_dim"], "num_kv_heads": base["num_heads"],
            "attention": "mla", "q_lora_rank": h["q_lora_rank"] or 0,
            "kv_lora_rank": h["kv_lora_rank"], "qk_nope_head_dim": h["qk_nope_head_dim"],
            "qk_rope_head_dim": h["qk_rope_head_dim"], "v_head_dim": h["v_head_dim"],
            "num_experts": h.get("n_routed_experts") or h.get("num_local_experts"),
            "expert_mlp_dim": h["moe_intermediate_size"], "mlp_dim": h["intermediate_size"],
            "num_shared_experts": h["n_shared_experts"], "shared_expert_mlp_dim": 0,
            "router_scoring": "sigmoid", "norm_topk_prob": bool(h["norm_topk_prob"]),
            "routed_scaling_factor": float(h["routed_scaling_factor"]),
            "n_group": h["n_group"] or 1, "topk_group": h["topk_group"] or 1,
            "first_k_dense": h["first_k_dense_replace"] or 0}


def _rope_rows(nope: int, rope: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, inverse): jaxmoe rotary dim j is DeepSeek's dim perm[j] (evens, then odds)."""
    perm = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    return perm, np.argsort(perm)


def _queries(rows_in: int, n: int, nope: int, rope: int) -> tuple[lo.Fn, lo.Fn]:
    """jaxmoe [in, heads, nope + rope] <-> HF [heads * (nope + rope), in] (interleaved rope)."""
    perm, inv = _rope_rows(nope, rope)
    qk = nope + rope

    def to_hf(a, xp):
        w = a[0]
        w = xp.concatenate([w[..., :nope], w[..., nope:][..., inv]], axis=-1)
        return [w.reshape(rows_in, n * qk).T]

    def from_hf(t, xp):
        w = lo.tr(t[0], xp).reshape(rows_in, n, qk)
        return [xp.concatenate([w[..., :nope], w[..., nope:][..., perm]], axis=-1)]

    return to_hf, from_hf


def _kv_a(rkv: int, rope: int) -> tuple[lo.Fn, lo.Fn]:
    """(kv_a [embed, kv_lora], k_rope [embed, rope]) <-> kv_a_proj_with_mqa
    [kv_lora + rope, embed] (rope rows interleaved)."""
    perm, inv = _rope_rows(0, rope)
    return ((lambda a, xp: [xp.concatenate([lo.tr(a[0], xp), lo.tr(a[1][:, inv], xp)], axis=0)]),
            (lambda t, xp: [lo.tr(t[0][:rkv], xp), lo.tr(t[0][rkv:], xp)[:, perm]]))


def _kv_b(rkv: int, n: int, nope: int, vd: int) -> tuple[lo.Fn, lo.Fn]:
    """(k_b [kv_lora, heads, nope], v_b [kv_lora, heads, vd]) <-> kv_b_proj
    [heads * (nope + vd), kv_lora] (per head: its nope key rows, then its value rows)."""

    def to_hf(a, xp):
        return [xp.concatenate([a[0], a[1]], axis=-1).reshape(rkv, n * (nope + vd)).T]

    def from_hf(t, xp):
        w = lo.tr(t[0], xp).reshape(rkv, n, nope + vd)
        return [w[..., :nope], w[..., nope:]]

    return to_hf, from_hf


def _attention_rules(m: ModelConfig, b: lo.Block) -> list[lo.Rule]:
    d, n, rq, rkv = m.embed_dim, m.num_heads, m.q_lora_rank, m.kv_lora_rank
    nope, rope, vd = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    p = b.param
    if rq:
        rules = [b.rule([p("attn.q_a")], ["self_attn.q_a_proj.weight"], *lo.transposed()),
                 b.rule([p("attn.q_a_norm.scale")], ["self_attn.q_a_layernorm.weight"],
                        *lo.identity()),
                 b.rule([p("attn.q_b")], ["self_attn.q_b_proj.weight"], *_queries(rq, n, nope, rope))]
    else:
        rules = [b.rule([p("attn.q")], ["self_attn.q_proj.weight"], *_queries(d, n, nope, rope))]
    return rules + [
        b.rule([p("attn.kv_a"), p("attn.k_rope")], ["self_attn.kv_a_proj_with_mqa.weight"],
               *_kv_a(rkv, rope)),
        b.rule([p("attn.kv_a_norm.scale")], ["self_attn.kv_a_layernorm.weight"], *lo.identity()),
        b.rule([p("attn.k_b"), p("attn.v_b")], ["self_attn.kv_b_proj.weight"],
               *_kv_b(rkv, n, nope, vd)),
        b.rule([p("attn.o")], ["self_attn.o_proj.weight"], *lo.heads_out(n, vd, d))]


def rules(m: ModelConfig) -> list[lo.Rule]:
    out = lo.global_rules(m)
    for b in lo.blocks(m):
        out += lo.norm_rules(b) + _attention_rules(m, b)
        if not b.is_moe:
            out += lo.mlp_rules(b, "ffn", "mlp")
            continue
        out.append(b.rule([b.param("ffn.router.kernel")], ["mlp.gate.weight"], *lo.transposed(),
                          fp32=True))
        out.append(b.rule([b.rest("ffn.router.bias")], ["mlp.gate.e_score_correction_bias"],
                          *lo.identity(), fp32=True))
        out += lo.expert_rules(m, b, "mlp.experts")
        out += lo.mlp_rules(b, "ffn.shared", "mlp.shared_experts")
    return out


def ignored(name: str, m: ModelConfig) -> bool:
    """Multi-token-prediction layers (model.layers.{>= num_layers}) and rotary caches."""
    if name.endswith("rotary_emb.inv_freq"):  # also inside a layer (older checkpoints)
        return True
    parts = name.split(".")
    return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and int(parts[2]) >= m.num_layers)


FORMAT = lo.Format(NAME, (NAME,), check, hf_config, model_fields, rules, ignored,
                   router_bias=True)

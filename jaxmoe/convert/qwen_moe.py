"""Qwen-MoE: `Qwen2MoeForCausalLM` (q/k/v biases, a shared expert behind a sigmoid gate) and
`Qwen3MoeForCausalLM` (per-head q_norm/k_norm, no shared expert). Softmax over all experts,
top-k, renormalised only when `norm_topk_prob`. Dense layers (`mlp_only_layers`,
`decoder_sparse_step`) use `intermediate_size`; experts `moe_intermediate_size`."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import Config, ModelConfig
from jaxmoe.convert import layout as lo


def _check(fmt: str, m: ModelConfig) -> None:
    lo.check_common(fmt, m)
    wrong = {"model.attention": (m.attention, "gqa"),
             "model.router_scoring": (m.router_scoring, "softmax"),
             "model.routed_scaling_factor": (m.routed_scaling_factor, 1.0),
             "model.n_group": (m.n_group, 1)}
    if fmt == "qwen2_moe":
        wrong.update({"model.qk_norm": (m.qk_norm, False),
                      "model.num_shared_experts": (m.num_shared_experts > 0, True),
                      "model.shared_expert_gate": (m.shared_expert_gate, True)})
    else:
        wrong.update({"model.qk_norm": (m.qk_norm, True), "model.qkv_bias": (m.qkv_bias, False),
                      "model.num_shared_experts": (m.num_shared_experts, 0)})
    for key, (have, want) in wrong.items():
        if have != want:
            shown = m.num_shared_experts if key == "model.num_shared_experts" else have
            need = "> 0" if key == "model.num_shared_experts" and want is True else repr(want)
            lo.refuse(fmt, f"{key}={shown!r} cannot be represented ({fmt} needs {need})")


def _layer_pattern(m: ModelConfig) -> dict[str, Any]:
    """decoder_sparse_step + mlp_only_layers placing the same dense layers as jaxmoe."""
    if m.first_k_dense == 0:
        return {"decoder_sparse_step": m.moe_every, "mlp_only_layers": []}
    dense = [i for i in range(m.num_layers) if not m.is_moe_layer(i)]
    return {"decoder_sparse_step": 1, "mlp_only_layers": dense}


def _hf_config(fmt: str, cfg: Config, dtype: str) -> dict[str, Any]:
    m = cfg.model
    arch = "Qwen2MoeForCausalLM" if fmt == "qwen2_moe" else "Qwen3MoeForCausalLM"
    out = {"architectures": [arch], "model_type": fmt, **lo.base_hf_config(cfg, dtype),
           "intermediate_size": m.mlp_dim, "moe_intermediate_size": m.expert_mlp_dim,
           "num_experts": m.num_experts, "num_local_experts": m.num_experts,
           "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers,
           "output_router_logits": False, **_layer_pattern(m)}
    if fmt == "qwen2_moe":
        out.update(qkv_bias=m.qkv_bias, shared_expert_intermediate_size=m.resolved_shared_mlp_dim)
    else:
        out.update(attention_bias=False)
    return out


def _model_fields(fmt: str, hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        lo.refuse(fmt, "use_sliding_window=true is not supported")
    layers = hf["num_hidden_layers"]
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    step = hf.get("decoder_sparse_step", 1)
    only = set(hf.get("mlp_only_layers") or [])
    dense = {i for i in range(layers) if i in only or not (experts > 0 and (i + 1) % step == 0)}
    k, every = lo.dense_pattern(layers, dense)
    # Qwen2MoeConfig's and Qwen3MoeConfig's defaults
    base = lo.base_model_fields(fmt, hf, kv_heads=16 if fmt == "qwen2_moe" else 4,
                                max_positions=32768)
    out = {**base, "num_experts": experts,
           "expert_mlp_dim": hf["moe_intermediate_size"], "mlp_dim": hf["intermediate_size"],
           "first_k_dense": k, "moe_every": every, "router_scoring": "softmax",
           "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}
    if fmt == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size") or 0
        if shared < 1:
            lo.refuse(fmt, "shared_expert_intermediate_size must be > 0")
        out.update(qkv_bias=bool(hf.get("qkv_bias", True)), num_shared_experts=1,
                   shared_expert_mlp_dim=shared, shared_expert_gate=True)
    else:
        if hf.get("attention_bias"):
            lo.refuse(fmt, "attention_bias=true is not supported")
        out.update(qk_norm=True)
    return out


def _rules(fmt: str, m: ModelConfig) -> list[lo.Rule]:
    out = lo.global_rules(m)
    for b in lo.blocks(m):
        out += lo.norm_rules(b) + lo.gqa_rules(m, b)
        if not b.is_moe:
            out += lo.mlp_rules(b, "ffn", "mlp")
            continue
        out.append(b.rule([b.param("ffn.router.kernel")], ["mlp.gate.weight"], *lo.transposed()))
        out += lo.expert_rules(m, b, "mlp.experts")
        if fmt == "qwen2_moe":
            out += lo.mlp_rules(b, "ffn.shared", "mlp.shared_expert")
            out.append(b.rule([b.param("ffn.shared_gate")], ["mlp.shared_expert_gate.weight"],
                              *lo.transposed()))  # [embed, 1] <-> [1, embed]
    return out


def _ignored(name: str, m: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def _format(fmt: str) -> lo.Format:
    return lo.Format(fmt, (fmt,), lambda m: _check(fmt, m),
                     lambda cfg, dtype: _hf_config(fmt, cfg, dtype),
                     lambda hf: _model_fields(fmt, hf), lambda m: _rules(fmt, m), _ignored,
                     router_bias=False)


QWEN2_MOE = _format("qwen2_moe")
QWEN3_MOE = _format("qwen3_moe")

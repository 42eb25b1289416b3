"""Mixtral (`MixtralForCausalLM`): every layer MoE, softmax over all experts, top-k,
renormalised; per-expert `block_sparse_moe.experts.{e}.w1` (gate) / `w3` (up) / `w2` (down)."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import Config, ModelConfig
from jaxmoe.convert import layout as lo

NAME = "mixtral"
MODEL_TYPES = ("mixtral",)


def check(m: ModelConfig) -> None:
    """Raises ConversionError (one line) when Mixtral cannot represent `m`."""
    lo.check_common(NAME, m)
    wrong = {
        "model.attention": (m.attention, "gqa"),
        "model.first_k_dense": (m.first_k_dense, 0),
        "model.moe_every": (m.moe_every, 1),
        "model.num_shared_experts": (m.num_shared_experts, 0),
        "model.qkv_bias": (m.qkv_bias, False),
        "model.qk_norm": (m.qk_norm, False),
        "model.router_scoring": (m.router_scoring, "softmax"),
        "model.norm_topk_prob": (m.norm_topk_prob, True),
        "model.routed_scaling_factor": (m.routed_scaling_factor, 1.0),
        "model.n_group": (m.n_group, 1),
    }
    for key, (have, want) in wrong.items():
        if have != want:
            lo.refuse(NAME, f"{key}={have!r} cannot be represented (Mixtral needs {want!r})")


def hf_config(cfg: Config, dtype: str) -> dict[str, Any]:
    m = cfg.model
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            **lo.base_hf_config(cfg, dtype), "intermediate_size": m.expert_mlp_dim,
            "num_local_experts": m.num_experts, "num_experts": m.num_experts,
            "sliding_window": None, "router_jitter_noise": 0.0,
            "output_router_logits": False}


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("sliding_window") is not None:
        lo.refuse(NAME, f"sliding_window={hf['sliding_window']} is not supported")
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    # MixtralConfig's defaults (rope_theta 1e6 and eps 1e-5 differ from the other formats').
    return {**lo.base_model_fields(NAME, hf, kv_heads=8, max_positions=4096 * 32,
                                   rope_theta=1e6, norm_eps=1e-5),
            "num_experts": experts,
            "expert_mlp_dim": hf["intermediate_size"], "router_scoring": "softmax",
            "norm_topk_prob": True}


def rules(m: ModelConfig) -> list[lo.Rule]:
    out = lo.global_rules(m)
    for b in lo.blocks(m):
        out += lo.norm_rules(b) + lo.gqa_rules(m, b)
        out.append(b.rule([b.param("ffn.router.kernel")], ["block_sparse_moe.gate.weight"],
                          *lo.transposed()))
        out += lo.expert_rules(m, b, "block_sparse_moe.experts", ("w1", "w3", "w2"))
    return out


def ignored(name: str, m: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq")


# No selection bias in the format: a nonzero jaxmoe router bias is refused at export.
FORMAT = lo.Format(NAME, MODEL_TYPES, check, hf_config, model_fields, rules, ignored,
                   router_bias=False)

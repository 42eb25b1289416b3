"""Closed-form parameter counts and training FLOPs (no allocation).

Counts follow the modules exactly; a test checks them against `jax.eval_shape` of the model.
"""

from __future__ import annotations

from jaxmoe.config import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """{"total": {part: n}, "active": {part: n}}; parts are embeddings, attention, dense_mlp,
    routed_experts, shared_experts, router, norms. Active counts k of E routed experts."""
    d, h, n, k = cfg.embed_dim, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    dense_layers = cfg.num_layers - moe_layers
    attn = 2 * d * n * h + 2 * d * k * h
    if cfg.qkv_bias:
        attn += n * h + 2 * k * h
    norms = 2 * d + (2 * h if cfg.qk_norm else 0)
    if cfg.attention == "mla":
        attn, mla_norms = _mla_attention_params(cfg)
        norms = 2 * d + mla_norms
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    expert = 3 * d * cfg.expert_mlp_dim
    shared = 3 * d * cfg.resolved_shared_mlp_dim + (d if cfg.shared_expert_gate and
                                                    cfg.num_shared_experts else 0)
    total = {
        "embeddings": emb,
        "attention": cfg.num_layers * attn,
        "dense_mlp": dense_layers * 3 * d * cfg.mlp_dim,
        "routed_experts": moe_layers * cfg.num_experts * expert,
        "shared_experts": moe_layers * shared,
        "router": moe_layers * d * cfg.num_experts,
        "norms": cfg.num_layers * norms + d,
    }
    active = dict(total, routed_experts=moe_layers * cfg.num_experts_per_tok * expert)
    return {"total": total, "active": active}


def _mla_attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(projection parameters, norm parameters) of one MLA layer (see model/mla.py)."""
    d, n, rq, rkv = cfg.embed_dim, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = d * rq + rq * n * qk if rq else d * n * qk
    kv = d * (rkv + cfg.qk_rope_head_dim) + rkv * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + n * cfg.v_head_dim * d, rq + rkv


def total_params(cfg: ModelConfig) -> int:
    return sum(parameter_counts(cfg)["total"].values())


def active_params(cfg: ModelConfig) -> int:
    return sum(parameter_counts(cfg)["active"].values())


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs per trained token (forward + backward = 3 x forward, no remat recompute).

    matmul: 6 x active matmul parameters (embedding lookup is free, the LM head is not);
    attention: 12 x layers x heads x head_dim x seq_len (scores and values, full square as
    computed, the PaLM convention).
    """
    c = parameter_counts(cfg)["active"]
    matmul_params = sum(c.values()) - c["norms"] - cfg.vocab_size * cfg.embed_dim
    if cfg.tie_embeddings:  # the single table is both lookup and LM head
        matmul_params += cfg.vocab_size * cfg.embed_dim
    matmul = 6.0 * matmul_params
    attention = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if cfg.attention == "mla":  # scores over nope + rope dims, values over v_head_dim
        attention = 6.0 * cfg.num_layers * cfg.num_heads * seq_len * (
            cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def human_count(n: int) -> str:
    """1017472 -> '1.02M', 671e9 -> '671B': three significant digits, in the unit that keeps
    them below 1000 (999,600 is '1M', not '1e+03K')."""
    if n < 1000:
        return str(n)
    for unit, size in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
        text = f"{n / size:.3g}"
        if float(text) < 1000:
            return text + unit
    text = f"{n / 1e12:.3g}"
    return (text if float(text) < 1000 else f"{n / 1e12:,.0f}") + "T"

"""What the external formats share: tensor-mapping rules, layer locations, config helpers.

A `Rule` says how some jaxmoe arrays (by orbax name, one entry of their stacked `layers` axis)
become some Hugging Face tensors and back. Rule functions take the arrays and an array
namespace `xp`: the converter calls them with NumPy on real data, and with `jax.numpy` under
`jax.eval_shape` to learn every output shape before reading a byte (so safetensors headers can
be written first and tensors streamed after).

HF linear weights are `[out, in]`; jaxmoe's are `[in, out]` (with heads split out:
`q [embed, heads, head_dim]`, `o [heads, head_dim, embed]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxmoe.config import Config, ModelConfig
from jaxmoe.convert.safetensors_io import transpose_copy
from jaxmoe.model.decoder import layer_groups

Fn = Callable[[Sequence[Any], Any], list[Any]]


class ConversionError(ValueError):
    """The model cannot be represented in the target format, or the input is unusable."""


class FormatRefusal(ConversionError):
    """A format cannot hold this model (`to-hf --format F`) or read this config.json
    (`from-hf`, which names the file instead of a flag)."""

    def __init__(self, fmt: str, what: str):
        super().__init__(f"--format {fmt}: {what}")
        self.fmt, self.what = fmt, what


@dataclasses.dataclass(frozen=True)
class Rule:
    """jaxmoe arrays `leaves` (entry `index` of their leading layers axis, or whole arrays when
    index is None) <-> HF tensors `hf`. `to_hf(leaf values, xp)` returns the HF tensors in the
    order of `hf`; `from_hf(hf values, xp)` returns the leaf values in the order of `leaves`.
    `fp32`: transformers keeps this tensor in float32 whatever the model dtype."""

    leaves: tuple[str, ...]
    index: int | None
    hf: tuple[str, ...]
    to_hf: Fn
    from_hf: Fn
    fp32: bool = False


@dataclasses.dataclass(frozen=True)
class Format:
    """One external layout. check(model) refuses what it cannot represent (one line);
    hf_config(config, dtype) -> config.json; model_fields(config.json) -> ModelConfig fields;
    rules(model) -> every Rule; ignored(name, model): HF tensors to skip (rotary caches,
    multi-token-prediction layers);
    router_bias: whether the format stores the selection bias (else it must be zero)."""

    name: str
    model_types: tuple[str, ...]
    check: Callable[[ModelConfig], None]
    hf_config: Callable[[Config, str], dict[str, Any]]
    model_fields: Callable[[dict[str, Any]], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    ignored: Callable[[str, ModelConfig], bool]
    router_bias: bool


@dataclasses.dataclass(frozen=True)
class Block:
    """Decoder layer `layer` = block `block` of repeat `index` in layer group `group`."""

    layer: int
    group: str
    index: int
    block: int
    is_moe: bool

    def param(self, rel: str) -> str:
        return f"params.{self.group}.units.block{self.block}.{rel}.value"

    def rest(self, rel: str) -> str:
        return f"rest.{self.group}.units.block{self.block}.{rel}.value"

    def hf(self, rel: str) -> str:
        return f"model.layers.{self.layer}.{rel}"

    def rule(self, leaves: Sequence[str], hf: Sequence[str], to_hf: Fn, from_hf: Fn,
             fp32: bool = False) -> Rule:
        return Rule(tuple(leaves), self.index, tuple(self.hf(h) for h in hf), to_hf, from_hf, fp32)


def blocks(cfg: ModelConfig) -> list[Block]:
    """Every decoder layer, in order, with where its parameters live in the stacked groups."""
    out, layer = [], 0
    for spec in layer_groups(cfg):
        for index in range(spec.repeats):
            for j, is_moe in enumerate(spec.pattern):
                out.append(Block(layer, spec.name, index, j, is_moe))
                layer += 1
    return out


# ----------------------------------------------------------------------------- rule kits

def tr(x: Any, xp: Any) -> Any:
    """x.T of a 2-D array; with NumPy, a contiguous copy made by the fast strip transpose
    (from-HF direction; HF-bound views are made contiguous the same way by the writer)."""
    return transpose_copy(x) if xp is np else x.T


def identity() -> tuple[Fn, Fn]:
    return (lambda a, xp: [a[0]]), (lambda h, xp: [h[0]])


def transposed() -> tuple[Fn, Fn]:
    """jaxmoe [in, out] <-> HF [out, in]."""
    return (lambda a, xp: [a[0].T]), (lambda h, xp: [tr(h[0], xp)])


def heads_in(d: int, n: int, h: int) -> tuple[Fn, Fn]:
    """jaxmoe [d, heads, head_dim] <-> HF [heads * head_dim, d]."""
    return ((lambda a, xp: [a[0].reshape(d, n * h).T]),
            (lambda t, xp: [tr(t[0], xp).reshape(d, n, h)]))


def heads_out(n: int, h: int, d: int) -> tuple[Fn, Fn]:
    """jaxmoe [heads, head_dim, d] <-> HF [d, heads * head_dim]."""
    return ((lambda a, xp: [a[0].reshape(n * h, d).T]),
            (lambda t, xp: [tr(t[0], xp).reshape(n, h, d)]))


def flat_heads(n: int, h: int) -> tuple[Fn, Fn]:
    """jaxmoe [heads, head_dim] <-> HF [heads * head_dim] (biases)."""
    return (lambda a, xp: [a[0].reshape(n * h)]), (lambda t, xp: [t[0].reshape(n, h)])


def per_expert(num_experts: int) -> tuple[Fn, Fn]:
    """jaxmoe [experts, in, out] <-> one HF [out, in] tensor per expert."""
    def from_hf(t, xp):
        if xp is not np:
            return [xp.stack([w.T for w in t])]
        out = np.empty((len(t),) + t[0].shape[::-1], t[0].dtype)
        for e, w in enumerate(t):  # straight into place: no per-expert copy, then a stack
            transpose_copy(w, out=out[e])
        return [out]

    return (lambda a, xp: [a[0][e].T for e in range(num_experts)]), from_hf


def norm_rules(b: Block) -> list[Rule]:
    return [b.rule([b.param("attn_norm.scale")], ["input_layernorm.weight"], *identity()),
            b.rule([b.param("ffn_norm.scale")], ["post_attention_layernorm.weight"], *identity())]


def gqa_rules(m: ModelConfig, b: Block) -> list[Rule]:
    """q/k/v/o projections (+ Qwen2 biases, + Qwen3 q_norm/k_norm) under `self_attn.`."""
    d, n, k, h = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
    rules = [b.rule([b.param("attn.q")], ["self_attn.q_proj.weight"], *heads_in(d, n, h)),
             b.rule([b.param("attn.k")], ["self_attn.k_proj.weight"], *heads_in(d, k, h)),
             b.rule([b.param("attn.v")], ["self_attn.v_proj.weight"], *heads_in(d, k, h)),
             b.rule([b.param("attn.o")], ["self_attn.o_proj.weight"], *heads_out(n, h, d))]
    if m.qkv_bias:
        for name, heads in (("q", n), ("k", k), ("v", k)):
            rules.append(b.rule([b.param(f"attn.{name}_bias")], [f"self_attn.{name}_proj.bias"],
                                *flat_heads(heads, h)))
    if m.qk_norm:
        rules += [b.rule([b.param("attn.q_norm.scale")], ["self_attn.q_norm.weight"], *identity()),
                  b.rule([b.param("attn.k_norm.scale")], ["self_attn.k_norm.weight"], *identity())]
    return rules


def mlp_rules(b: Block, leaf: str, prefix: str) -> list[Rule]:
    """A SwiGLU MLP at jaxmoe `leaf` (gate/up/down [in, out]) <-> HF `prefix`.{gate,up,down}_proj."""
    return [b.rule([b.param(f"{leaf}.{w}")], [f"{prefix}.{w}_proj.weight"], *transposed())
            for w in ("gate", "up", "down")]


def expert_rules(m: ModelConfig, b: Block, prefix: str,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """Routed experts ffn.w_gate/w_up/w_down <-> `prefix`.{e}.<name>.weight for every expert."""
    e = m.num_experts
    return [b.rule([b.param(f"ffn.{leaf}")], [f"{prefix}.{i}.{name}.weight" for i in range(e)],
                   *per_expert(e))
            for leaf, name in zip(("w_gate", "w_up", "w_down"), names)]


def global_rules(m: ModelConfig) -> list[Rule]:
    """Embedding, final norm, LM head (absent when tied)."""
    rules = [Rule(("params.embedder.embedding.value",), None, ("model.embed_tokens.weight",),
                  *identity()),
             Rule(("params.final_norm.scale.value",), None, ("model.norm.weight",), *identity())]
    if not m.tie_embeddings:
        rules.append(Rule(("params.lm_head.value",), None, ("lm_head.weight",), *transposed()))
    return rules


# ----------------------------------------------------------------------------- config helpers

def refuse(fmt: str, what: str) -> None:
    raise FormatRefusal(fmt, what)


def check_common(fmt: str, m: ModelConfig) -> None:
    """Refusals every supported format shares."""
    if m.num_experts == 0:
        refuse(fmt, "the model has no experts (model.num_experts=0); these formats are MoE")


def rope_fields(m: ModelConfig) -> dict[str, Any]:
    """`rope_theta` (transformers 4.x) and `rope_parameters` (5.x), plus `rope_scaling` for 4.x
    when YaRN is on; all describe the same rotary table."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    out: dict[str, Any] = {"rope_theta": m.rope_theta}
    if m.rope_scaling == "yarn":
        yarn = {"factor": m.rope_scaling_factor,
                "original_max_position_embeddings": m.rope_original_max_len,
                "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow,
                "mscale": m.yarn_mscale, "mscale_all_dim": m.yarn_mscale_all_dim}
        params = {"rope_type": "yarn", "rope_theta": m.rope_theta, **yarn}
        out["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **yarn}
    out["rope_parameters"] = params
    return out


def base_hf_config(cfg: Config, dtype: str) -> dict[str, Any]:
    """Keys every decoder format shares (values from `cfg`)."""
    m = cfg.model
    max_pos = m.context_length or cfg.data.seq_len
    if m.rope_scaling == "yarn":  # transformers checks factor == max / original
        max_pos = round(m.rope_original_max_len * m.rope_scaling_factor)
    return {"vocab_size": m.vocab_size, "hidden_size": m.embed_dim,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std, "max_position_embeddings": max_pos,
            "num_experts_per_tok": m.num_experts_per_tok, "norm_topk_prob": m.norm_topk_prob,
            "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
            **rope_fields(m)}


def hf_rope(fmt: str, hf: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """ModelConfig rotary fields from an HF config (new `rope_parameters` or old keys);
    `default_theta`: the format's transformers default, for a config that leaves it out."""
    params = dict(hf.get("rope_parameters") or {})
    old = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    kind = params.get("rope_type") or old.get("rope_type") or old.get("type") or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "yarn":
        refuse(fmt, f"rope type {kind!r} is not supported (expected default or yarn)")
    y = {**old, **params}
    if y.get("attention_factor") is not None or y.get("truncate", True) is not True:
        refuse(fmt, "YaRN with an explicit attention_factor or truncate=false is not supported")
    factor = y.get("factor")
    orig = y.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if factor is None:  # transformers derives it from the two lengths
        factor = hf["max_position_embeddings"] / orig
    out.update(rope_scaling="yarn", rope_scaling_factor=float(factor),
               rope_original_max_len=int(orig),
               yarn_beta_fast=float(y.get("beta_fast") or 32.0),
               yarn_beta_slow=float(y.get("beta_slow") or 1.0),
               yarn_mscale=float(y.get("mscale") or 0.0),
               yarn_mscale_all_dim=float(y.get("mscale_all_dim") or 0.0))
    return out


def base_model_fields(fmt: str, hf: dict[str, Any], *, kv_heads: int, max_positions: int,
                      rope_theta: float = 10000.0, norm_eps: float = 1e-6) -> dict[str, Any]:
    """ModelConfig fields every decoder format shares. `kv_heads` (num_key_value_heads),
    `max_positions` (max_position_embeddings), `rope_theta`, `norm_eps`: the format's
    transformers defaults, for a config.json that leaves them out."""
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        refuse(fmt, f"quantized weights (quantization_config: {method}) are not supported; "
               "dequantize to bfloat16 or float32 first")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(fmt, f"hidden_act={hf['hidden_act']!r} is not supported (expected silu)")
    heads = hf["num_attention_heads"]
    max_pos = int(hf.get("max_position_embeddings") or max_positions)
    return {"vocab_size": hf["vocab_size"], "embed_dim": hf["hidden_size"],
            "num_layers": hf["num_hidden_layers"], "num_heads": heads,
            # a missing key takes the class default; null is read as the number of heads
            # (older transformers did; 5.x refuses it for Mixtral and Qwen3-MoE)
            "num_kv_heads": hf.get("num_key_value_heads", kv_heads) or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
            "norm_eps": float(hf.get("rms_norm_eps", norm_eps)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
            "context_length": max_pos, "num_experts_per_tok": hf["num_experts_per_tok"],
            **hf_rope(fmt, {**hf, "max_position_embeddings": max_pos}, rope_theta)}


def dense_pattern(num_layers: int, dense: set[int]) -> tuple[int, int]:
    """(first_k_dense, moe_every) whose placement makes exactly the layers in `dense` dense."""
    for k in range(num_layers + 1):
        for every in range(1, num_layers + 1):
            if (num_layers - k) % every:
                continue
            placed = {i for i in range(num_layers) if i < k or (i - k + 1) % every}
            if placed == dense:
                return k, every
    raise ConversionError(f"dense layers {sorted(dense)}: not expressible as first_k_dense + "
                          "moe_every (jaxmoe repeats one pattern of dense/MoE layers)")

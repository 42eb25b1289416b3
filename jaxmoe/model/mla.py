"""Multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi K2) with optional YaRN rotary scaling.

Keys and values are rebuilt from a small per-token latent: `c_kv = norm(x W_kv_a)` of width
`kv_lora_rank`, plus one rotary key `k_rope = rope(x W_k_rope)` of width `qk_rope_head_dim`
shared by every head. Per head, `k = [c_kv W_k_b, k_rope]` and `v = c_kv W_v_b`. Queries are
`[q_nope, rope(q_rope)]`, optionally through their own low-rank bottleneck
(`q_lora_rank > 0`: `q = norm(x W_q_a) W_q_b`). The softmax scale is `(nope + rope) ** -0.5`,
times `mscale(factor, mscale_all_dim) ** 2` under YaRN (as DeepSeek does).

At inference the point of MLA is the cache: only `(c_kv, k_rope)` per token is stored
(`kv_lora_rank + qk_rope_head_dim` numbers, shared by all heads, instead of
`2 * heads * head_dim`). `absorbed_attention` computes attention directly from that cache by
folding `W_k_b` into the query and `W_v_b` into the output; training uses the expanded form
(`mla_attention`), which is cheaper when every position is a query. Both give the same result.

Rotary dimensions use the "rotate half" layout (like `layers.apply_rope`); DeepSeek's
checkpoints store them interleaved, which the converter permutes once at load/export.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import logical as L
from jaxmoe.model.attention import attention_mask
from jaxmoe.model.layers import RMSNorm, Rotary, apply_rope, param, rotary_tables
from jaxmoe.model.precision import Precision


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [qk_rope_head_dim // 2] float32, cos/sin scale) for MLA's rotary part.

    Computed with NumPy in float32 (as transformers does in torch), at construction time.

    YaRN (Peng et al. 2023, as in transformers' `_compute_yarn_parameters` with truncation):
    frequencies that rotate fewer than `beta_slow` times over the original context are
    interpolated by `factor`, those rotating more than `beta_fast` times are kept, with a
    linear ramp between.
    """
    dim, base = cfg.qk_rope_head_dim, np.float32(cfg.rope_theta)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if cfg.rope_scaling != "yarn":
        return (1 / pos_freqs).astype(np.float32), 1.0
    factor, orig = cfg.rope_scaling_factor, cfg.rope_original_max_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1)
    extrapolate = (1 - ramp).astype(np.float32)  # 1: keep the original frequency
    inv = ((1 / (np.float32(factor) * pos_freqs)) * (1 - extrapolate)
           + (1 / pos_freqs) * extrapolate).astype(np.float32)
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        scale = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        scale = yarn_mscale(factor)
    return inv, float(scale)


def softmax_scale(cfg: ModelConfig) -> float:
    """DeepSeek's scale: (nope + rope) ** -0.5, times mscale(factor, mscale_all_dim) ** 2."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim) ** 2
    return scale


def rotary(cfg: ModelConfig, positions: jax.Array) -> Rotary:
    """Rotary tables for MLA's rotary part: positions [batch, length] -> [b, l, rope / 2],
    cos/sin multiplied by the YaRN scale."""
    inv_freq, scale = rope_inv_freq(cfg)
    return rotary_tables(positions, inv_freq, scale)


def _softmax(logits: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """logits [b, heads, t, s] float32, mask [b, 1, t, s] -> probabilities (float32)."""
    logits = jnp.where(mask, logits * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def mla_attention(q_nope: jax.Array, q_rope: jax.Array, k_nope: jax.Array, k_rope: jax.Array,
                  v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Expanded MLA attention.

    q_nope [b, t, n, nope], q_rope [b, t, n, rope], k_nope [b, s, n, nope],
    k_rope [b, s, rope] (one rotary key for all heads), v [b, s, n, vd], mask [b, 1, t, s]
    -> [b, t, n, vd]. Scores = (q_nope . k_nope + q_rope . k_rope) * scale, float32 softmax.
    """
    f32 = jnp.float32
    logits = (jnp.einsum("btnd,bsnd->bnts", q_nope, k_nope, preferred_element_type=f32)
              + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=f32))
    probs = _softmax(logits, mask, scale).astype(v.dtype)
    return jnp.einsum("bnts,bsnv->btnv", probs, v)


def absorbed_attention(q_nope: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
                       k_b: jax.Array, v_b: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """MLA attention straight from the latent cache (the decode-time form).

    q_nope [b, t, n, nope], q_rope [b, t, n, rope], c_kv [b, s, kv_lora], k_rope [b, s, rope],
    k_b [kv_lora, n, nope], v_b [kv_lora, n, vd], mask [b, 1, t, s] -> [b, t, n, vd].
    q_nope . (c_kv W_k_b) = (q_nope W_k_b^T) . c_kv, so keys never leave the latent space.
    """
    f32 = jnp.float32
    q_latent = jnp.einsum("btnd,rnd->btnr", q_nope, k_b)  # [b, t, n, kv_lora]
    logits = (jnp.einsum("btnr,bsr->bnts", q_latent, c_kv, preferred_element_type=f32)
              + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=f32))
    probs = _softmax(logits, mask, scale).astype(c_kv.dtype)
    out_latent = jnp.einsum("bnts,bsr->btnr", probs, c_kv)  # [b, t, n, kv_lora]
    return jnp.einsum("btnr,rnv->btnv", out_latent, v_b)


class MLAttention(nnx.Module):
    """Multi-head latent attention; a drop-in for `Attention` in the decoder block.

    Parameters (logical axes): q_a [embed, q_lora], q_a_norm [q_lora], q_b [q_lora, heads,
    nope + rope] (or q [embed, heads, nope + rope] when q_lora_rank == 0); kv_a [embed,
    kv_lora], kv_a_norm [kv_lora], k_rope [embed, rope]; k_b [kv_lora, heads, nope],
    v_b [kv_lora, heads, vd]; o [heads, vd, embed].
    """

    def __init__(self, cfg: ModelConfig, precision: Precision, rngs: nnx.Rngs):
        e, n, std, pd = cfg.embed_dim, cfg.num_heads, cfg.init_std, precision.param_dtype
        nope, rope, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        if rq:
            self.q_a = param(rngs, (e, rq), (L.EMBED, L.Q_LORA), std, pd)
            self.q_a_norm = RMSNorm(rq, cfg.norm_eps, precision)
            self.q_b = param(rngs, (rq, n, nope + rope), (L.Q_LORA, L.HEADS, L.HEAD_DIM), std, pd)
        else:
            self.q = param(rngs, (e, n, nope + rope), (L.EMBED, L.HEADS, L.HEAD_DIM), std, pd)
        self.kv_a = param(rngs, (e, rkv), (L.EMBED, L.KV_LORA), std, pd)
        self.kv_a_norm = RMSNorm(rkv, cfg.norm_eps, precision)
        self.k_rope = param(rngs, (e, rope), (L.EMBED, L.HEAD_DIM), std, pd)
        self.k_b = param(rngs, (rkv, n, nope), (L.KV_LORA, L.HEADS, L.HEAD_DIM), std, pd)
        self.v_b = param(rngs, (rkv, n, vd), (L.KV_LORA, L.HEADS, L.HEAD_DIM), std, pd)
        self.o = param(rngs, (n, vd, e), (L.HEADS, L.HEAD_DIM, L.EMBED), std, pd)
        self.q_lora = bool(rq)
        self.nope = nope
        self.scale = softmax_scale(cfg)
        self.precision = precision

    def queries(self, x: jax.Array, rope: Rotary) -> tuple[jax.Array, jax.Array]:
        """x [b, t, embed] -> (q_nope [b, t, n, nope], rotated q_rope [b, t, n, rope])."""
        c = self.precision.cast
        if self.q_lora:
            h = self.q_a_norm(jnp.einsum("bte,er->btr", x, c(self.q_a[...])))
            q = jnp.einsum("btr,rnd->btnd", h, c(self.q_b[...]))
        else:
            q = jnp.einsum("bte,end->btnd", x, c(self.q[...]))
        q = L.constrain(q, (L.BATCH, L.LENGTH, L.HEADS, L.HEAD_DIM))
        q_nope, q_rope = q[..., :self.nope], q[..., self.nope:]
        return q_nope, apply_rope(q_rope, rope)

    def latent(self, x: jax.Array, rope: Rotary) -> tuple[jax.Array, jax.Array]:
        """x [b, s, embed] -> the cache entry (c_kv [b, s, kv_lora], rotated k_rope [b, s, rope])."""
        c = self.precision.cast
        c_kv = self.kv_a_norm(jnp.einsum("bse,er->bsr", x, c(self.kv_a[...])))
        k_rope = jnp.einsum("bse,er->bsr", x, c(self.k_rope[...]))
        k_rope = apply_rope(k_rope, rope)
        return (L.constrain(c_kv, (L.BATCH, L.LENGTH, L.KV_LORA)),
                L.constrain(k_rope, (L.BATCH, L.LENGTH, L.HEAD_DIM)))

    def __call__(self, x: jax.Array, segment_ids: jax.Array, rope: Rotary) -> jax.Array:
        """x [batch, length, embed] -> [batch, length, embed] (causal, within segments)."""
        c = self.precision.cast
        q_nope, q_rope = self.queries(x, rope)
        c_kv, k_rope = self.latent(x, rope)
        k_nope = jnp.einsum("bsr,rnd->bsnd", c_kv, c(self.k_b[...]))
        v = jnp.einsum("bsr,rnv->bsnv", c_kv, c(self.v_b[...]))
        k_nope = L.constrain(k_nope, (L.BATCH, L.LENGTH, L.HEADS, L.HEAD_DIM))
        v = L.constrain(v, (L.BATCH, L.LENGTH, L.HEADS, L.HEAD_DIM))
        out = mla_attention(q_nope, q_rope, k_nope, k_rope, v, attention_mask(segment_ids),
                            self.scale)
        out = jnp.einsum("btnv,nve->bte", out, c(self.o[...]))
        return L.constrain(out, (L.BATCH, L.LENGTH, L.EMBED))

"""Grouped-query causal self-attention that respects packed segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import logical as L
from jaxmoe.model.layers import (
    RMSNorm,
    Rotary,
    apply_rope,
    const_param,
    param,
    rope_frequencies,
    rotary_tables,
)
from jaxmoe.model.matmul import accumulation_dtype, align_varying, einsum, match_varying
from jaxmoe.model.precision import Precision


def rotary(cfg: ModelConfig, positions: jax.Array) -> Rotary:
    """Rotary tables for grouped-query attention: positions [batch, length] -> [b, l, hd / 2]."""
    return rotary_tables(positions, rope_frequencies(cfg.head_dim, cfg.rope_theta))


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal, same-segment mask [batch, 1, length, length] (True = may attend).

    Causality is by index in the row, so packed documents never see their neighbours and
    padding (segment 0) only sees padding.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def _attend(q, k, v, mask):
    """(out [b, n, t, d], probs [b, kv, g * t, s] in v.dtype); see `dot_product_attention`."""
    b, n, t, d = q.shape
    s, kv = k.shape[2], k.shape[1]
    g = n // kv
    acc = accumulation_dtype(q.dtype, k.dtype)
    logits = einsum("bkqd,bksd->bkqs", q.reshape(b, kv, g * t, d), k, out_dtype=acc)
    logits = logits.reshape(b, kv, g, t, s)
    logits = jnp.where(mask[:, :, None], logits * (d ** -0.5), jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
    out = einsum("bkqs,bksd->bkqd", probs, v)  # [b, kv, g * t, d]
    return out.reshape(b, n, t, d), probs


@jax.custom_vjp
def _attention(q, k, v, mask):
    return _attend(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    out, probs = _attend(q, k, v, mask)
    return out, (q, k, v, mask, probs, out)


def _attention_bwd(res, d_out):
    """Softmax backward as dS = P * (dP - rowsum(dO * O)): the row sums come from the
    [.., t, d] output instead of a reduction over the [.., t, s] scores, which XLA:CPU fused
    with dP = dO V^T into one slow kernel (~9 ms of the benchmark step)."""
    q, k, v, mask, probs, out = res
    b, n, t, d = q.shape
    s, kv = k.shape[2], k.shape[1]
    g = n // kv
    acc = accumulation_dtype(q.dtype, k.dtype)
    d_out = d_out.astype(q.dtype).reshape(b, kv, g * t, d)
    delta = jnp.sum(d_out.astype(acc) * out.reshape(b, kv, g * t, d).astype(acc), axis=-1,
                    keepdims=True)
    dp = einsum("bkqd,bksd->bkqs", d_out, v, out_dtype=acc)
    allowed = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
    # Masked scores are constants: no gradient, even in a row with nothing allowed.
    ds = jnp.where(allowed, probs.astype(acc) * (dp - delta) * (d ** -0.5), 0).astype(q.dtype)
    dq = einsum("bkqs,bksd->bkqd", ds, k, out_dtype=acc).astype(q.dtype)
    dk = einsum("bkqs,bkqd->bksd", ds, q.reshape(b, kv, g * t, d), out_dtype=acc)
    dv = einsum("bkqs,bkqd->bksd", probs, d_out, out_dtype=acc)
    return (match_varying(dq.reshape(b, n, t, d), q), match_varying(dk.astype(k.dtype), k),
            match_varying(dv.astype(v.dtype), v), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Heads-major: q [b, heads, t, d], k/v [b, kv_heads, s, d], mask [b, 1, t, s]
    -> [b, heads, t, d].

    Softmax statistics in float32; query heads are grouped over the kv heads (GQA: head
    i * group + j reads kv head i), folded into the query rows, [b, kv, group * t, d], so the
    contractions are plain batched matmuls with no transpose in front of them. (On XLA:CPU a
    transpose between the bfloat16 cast and the matmul made XLA move the cast behind the
    transpose and run the matmul in float32, several times slower.) The backward pass is
    written out (`_attention_bwd`); matmul inputs in the compute dtype, float32 accumulation.
    """
    return _attention(*align_varying(q, k, v, mask))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, precision: Precision, rngs: nnx.Rngs):
        e, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = precision.param_dtype, cfg.init_std
        self.q = param(rngs, (e, n, h), (L.EMBED, L.HEADS, L.HEAD_DIM), std, pd)
        self.k = param(rngs, (e, k, h), (L.EMBED, L.KV_HEADS, L.HEAD_DIM), std, pd)
        self.v = param(rngs, (e, k, h), (L.EMBED, L.KV_HEADS, L.HEAD_DIM), std, pd)
        self.o = param(rngs, (n, h, e), (L.HEADS, L.HEAD_DIM, L.EMBED), std, pd)
        if cfg.qkv_bias:
            self.q_bias = const_param(jnp.zeros((n, h), pd), (L.HEADS, L.HEAD_DIM))
            self.k_bias = const_param(jnp.zeros((k, h), pd), (L.KV_HEADS, L.HEAD_DIM))
            self.v_bias = const_param(jnp.zeros((k, h), pd), (L.KV_HEADS, L.HEAD_DIM))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.norm_eps, precision, L.HEAD_DIM)
            self.k_norm = RMSNorm(h, cfg.norm_eps, precision, L.HEAD_DIM)
        self.qkv_bias, self.qk_norm = cfg.qkv_bias, cfg.qk_norm
        self.precision = precision

    def __call__(self, x: jax.Array, segment_ids: jax.Array, rope: Rotary) -> jax.Array:
        """x [batch, length, embed], segment_ids [batch, length], rope: `rotary(cfg, positions)`
        -> [batch, length, embed]."""
        c = self.precision.cast
        # Heads-major [batch, heads, length, head_dim] straight out of the projections.
        q = einsum("ble,enh->bnlh", x, c(self.q[...]))
        k = einsum("ble,ekh->bklh", x, c(self.k[...]))
        v = einsum("ble,ekh->bklh", x, c(self.v[...]))
        if self.qkv_bias:
            q = q + c(self.q_bias[...])[:, None]
            k = k + c(self.k_bias[...])[:, None]
            v = v + c(self.v_bias[...])[:, None]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = L.constrain(apply_rope(q, rope, length_axis=2),
                        (L.BATCH, L.HEADS, L.LENGTH, L.HEAD_DIM))
        k = L.constrain(apply_rope(k, rope, length_axis=2),
                        (L.BATCH, L.KV_HEADS, L.LENGTH, L.HEAD_DIM))
        v = L.constrain(v, (L.BATCH, L.KV_HEADS, L.LENGTH, L.HEAD_DIM))
        out = dot_product_attention(q, k, v, attention_mask(segment_ids))
        out = einsum("bnlh,nhe->ble", out, c(self.o[...]))
        return L.constrain(out, (L.BATCH, L.LENGTH, L.EMBED))

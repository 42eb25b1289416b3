"""Capacity-based dispatch (GShard / Switch): fixed per-expert buffers, overflow dropped.

Each expert takes at most C = ceil(capacity_factor * tokens * k / experts) token copies.
Priority follows GShard: every token's first choice before any token's second choice, and
earlier tokens first within a choice. Dropped copies contribute nothing (the residual
connection carries the token through). Padding tokens (token_mask False) take no slot: they
would otherwise crowd out real tokens, all routed alike by the same pad embedding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def capacity_moe(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                 w_up: jax.Array, w_down: jax.Array, capacity_factor: float,
                 token_mask: jax.Array | None = None):
    """x [tokens, embed] -> (y [tokens, embed], dropped: number of valid copies dropped)."""
    t, k = indices.shape
    e = w_gate.shape[0]
    c = expert_capacity(t, k, e, capacity_factor)
    valid = jnp.ones((t,), bool) if token_mask is None else token_mask.astype(bool)
    onehot = jax.nn.one_hot(indices.T, e, dtype=jnp.int32)  # [k, tokens, experts], priority order
    onehot = onehot * valid[None, :, None]
    position = jnp.cumsum(onehot.reshape(k * t, e), axis=0).reshape(k, t, e) - 1
    position = jnp.sum(position * onehot, axis=-1)  # [k, tokens]
    kept = (position < c) & valid[None, :]
    f = weights.dtype
    slot = jax.nn.one_hot(jnp.where(kept, position, c), c, dtype=f)  # [k, t, c]
    expert = jax.nn.one_hot(indices.T, e, dtype=f)  # [k, t, e]
    dispatch = jnp.einsum("kte,ktc->tec", expert, slot)  # [tokens, experts, capacity]
    combine = jnp.einsum("kte,ktc,kt->tec", expert, slot, weights.T)
    xin = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)  # [experts, capacity, embed]
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xin, w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", xin, w_up)
    y = jnp.einsum("ecf,efd->ecd", h, w_down)
    out = jnp.einsum("tec,ecd->td", combine, y.astype(f)).astype(x.dtype)
    dropped = jnp.sum((~kept) & valid[None, :])
    return out, dropped

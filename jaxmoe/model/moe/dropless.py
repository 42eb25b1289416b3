"""Dropless dispatch: sort token copies by expert, grouped matmul (`ragged_dot`), un-sort.

Only the chosen experts do work: FLOPs are tokens * k * 3 * 2 * embed * expert_mlp, with no
one-hot dispatch tensors. On GPU/TPU a Pallas grouped-matmul kernel can stand behind
`grouped_matmul` without changing callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [rows, in] sorted by group, w [groups, in, out], group_sizes [groups] -> [rows, out]."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def sort_by_expert(indices: jax.Array, num_experts: int):
    """indices [tokens, k] -> (order [tokens*k], group_sizes [experts]).

    `order` lists token-copy ids (t * k + j) grouped by expert, stable within an expert.
    """
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def expert_ffn(x_sorted: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
               w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU per expert over rows sorted by expert. x_sorted [rows, embed] -> [rows, embed]."""
    h = jax.nn.silu(grouped_matmul(x_sorted, w_gate, group_sizes))
    h = h * grouped_matmul(x_sorted, w_up, group_sizes)
    return grouped_matmul(h, w_down, group_sizes)


def dropless_moe(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                 w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x [tokens, embed], weights/indices [tokens, k], w_* [experts, ...] -> [tokens, embed]."""
    t, k = indices.shape
    order, group_sizes = sort_by_expert(indices, w_gate.shape[0])
    x_sorted = jnp.take(x, order // k, axis=0)  # [tokens*k, embed]
    y_sorted = expert_ffn(x_sorted, group_sizes, w_gate, w_up, w_down)
    inverse = jnp.argsort(order)
    y = jnp.take(y_sorted, inverse, axis=0).reshape(t, k, -1)
    out = jnp.einsum("tkd,tk->td", y.astype(weights.dtype), weights)
    return out.astype(x.dtype)

"""Dropless dispatch: sort token copies by expert, grouped matmuls, un-sort, combine.

Only the chosen experts do work: FLOPs are tokens * k * 3 * 2 * embed * expert_mlp, with no
one-hot dispatch tensors. Two grouped-matmul implementations stand behind `expert_ffn`:

- `ragged_dot`: `jax.lax.ragged_dot`, a native grouped matmul on TPU (the default there);
- `blocks`: token copies are gathered straight into fixed-size row blocks that each belong
  to one expert (every expert's group padded to a multiple of the block size), then batched
  matmuls with per-block expert weights (`block_swiglu.py`, explicit backward pass), then
  gathered back (`gather_rows.py`: the gradients are gathers too, not scatter-adds).
  XLA:CPU lowers `ragged_dot` to a dense masked matmul over *all* experts (E x the FLOPs,
  measured in tools/bench_train.py), so `blocks` is the default off TPU. Its padding costs
  at most experts x block rows: block size ~ rows / (8 experts) keeps that <= 12.5% of the
  expert FLOPs (compiled/analytic FLOPs <= 1.1) once rows >= 64 x experts (below that the
  block stays at its minimum of 8 rows and the share of padding grows). Larger blocks
  (`model.gmm_block_size`) run faster on XLA:CPU but pad more: 256 rows on the benchmark
  model ran at 1.0-1.3x the tokens/s of the default at 1.25x the analytic FLOPs
  (tools/bench_train.py, docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.model.moe.block_swiglu import block_swiglu
from jaxmoe.model.moe.gather_rows import gather_rows


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [rows, in] sorted by group, w [groups, in, out], group_sizes [groups] -> [rows, out]."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def default_impl() -> str:
    return "ragged_dot" if jax.default_backend() == "tpu" else "blocks"


def block_size(rows: int, groups: int, requested: int = 0) -> int:
    """`requested` if > 0, else the largest power of two <= rows / (8 groups), in [8, 256]."""
    if requested:
        return requested
    target = max(rows // (8 * groups), 1)
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def block_layout(group_sizes: jax.Array, rows: int, block: int):
    """Where each sorted row goes in the block buffer.

    Returns (dest [rows] int32: slot in a [num_blocks * block] buffer, or num_blocks * block
    for rows past sum(group_sizes); block_group [num_blocks]: the group of each block;
    num_blocks: static upper bound sum_g ceil(size_g / block) <= (rows + G (block-1)) / block).
    """
    groups = group_sizes.shape[0]
    num_blocks = (rows + groups * (block - 1)) // block
    blocks_per = (group_sizes + block - 1) // block
    block_end = jnp.cumsum(blocks_per)
    row_end = jnp.cumsum(group_sizes)
    r = jnp.arange(rows, dtype=jnp.int32)
    group_of_row = jnp.searchsorted(row_end, r, side="right")  # == groups for unused rows
    g = jnp.minimum(group_of_row, groups - 1)
    dest = (block_end[g] - blocks_per[g]) * block + r - (row_end[g] - group_sizes[g])
    dest = jnp.where(group_of_row < groups, dest, num_blocks * block).astype(jnp.int32)
    block_group = jnp.minimum(
        jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"), groups - 1)
    return dest, block_group, num_blocks


def _slots(group_sizes: jax.Array, rows: int, experts: int, block: int = 0):
    """(block, dest [rows] slot of each sorted row, src [slots] row of each slot or `rows`,
    block_group [num_blocks])."""
    block = block_size(rows, experts, block)
    dest, block_group, nb = block_layout(group_sizes, rows, block)
    src = jnp.full((nb * block,), rows, jnp.int32).at[dest].set(
        jnp.arange(rows, dtype=jnp.int32), mode="drop")
    return block, dest, src, block_group


def _expert_ffn_blocks(x_sorted, group_sizes, w_gate, w_up, w_down, block=0):
    rows, d = x_sorted.shape
    block, dest, src, block_group = _slots(group_sizes, rows, w_gate.shape[0], block)
    xb = gather_rows(x_sorted, src, dest[:, None]).reshape(-1, block, d)
    yb = block_swiglu(xb, block_group, w_gate, w_up, w_down).reshape(-1, d)
    return gather_rows(yb, dest, src[:, None])


def _dropless_blocks(x, weights, indices, w_gate, w_up, w_down, block=0):
    """Token copies go straight to their block slots (and back) by gathers."""
    t, k = indices.shape
    d = x.shape[-1]
    order, group_sizes = sort_by_expert(indices, w_gate.shape[0])
    block, dest, src, block_group = _slots(group_sizes, t * k, w_gate.shape[0], block)
    slot_of_copy = jnp.zeros((t * k,), jnp.int32).at[order].set(dest)  # copy c = token * k + j
    copy_of_slot = jnp.where(src < t * k, order[jnp.minimum(src, t * k - 1)], t * k)
    token_of_slot = jnp.where(copy_of_slot < t * k, copy_of_slot // k, t)
    xb = gather_rows(x, token_of_slot, slot_of_copy.reshape(t, k)).reshape(-1, block, d)
    yb = block_swiglu(xb, block_group, w_gate, w_up, w_down).reshape(-1, d)
    y = gather_rows(yb, slot_of_copy, copy_of_slot[:, None]).reshape(t, k, d)
    return jnp.einsum("tkd,tk->td", y.astype(weights.dtype), weights).astype(x.dtype)


def sort_by_expert(indices: jax.Array, num_experts: int):
    """indices [tokens, k] -> (order [tokens*k], group_sizes [experts]).

    `order` lists token-copy ids (t * k + j) grouped by expert, stable within an expert.
    """
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def expert_ffn(x_sorted: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
               w_up: jax.Array, w_down: jax.Array, impl: str | None = None,
               block: int = 0) -> jax.Array:
    """SwiGLU per expert over rows sorted by expert. x_sorted [rows, embed] -> [rows, embed].

    Rows past sum(group_sizes) (padding) give zeros. impl: "ragged_dot" | "blocks" | None
    (None: `default_impl()` for the current backend); block: rows per block (0: default).
    """
    impl = impl or default_impl()
    if impl == "blocks":
        return _expert_ffn_blocks(x_sorted, group_sizes, w_gate, w_up, w_down, block)
    if impl != "ragged_dot":
        raise ValueError(f"impl={impl!r}: expected 'ragged_dot' or 'blocks'")
    h = jax.nn.silu(grouped_matmul(x_sorted, w_gate, group_sizes))
    h = h * grouped_matmul(x_sorted, w_up, group_sizes)
    return grouped_matmul(h, w_down, group_sizes)


def dropless_moe(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                 w_up: jax.Array, w_down: jax.Array, impl: str | None = None,
                 block: int = 0) -> jax.Array:
    """x [tokens, embed], weights/indices [tokens, k], w_* [experts, ...] -> [tokens, embed].

    block: rows per block of the "blocks" implementation (0: `block_size`'s default)."""
    if (impl or default_impl()) == "blocks":
        return _dropless_blocks(x, weights, indices, w_gate, w_up, w_down, block)
    t, k = indices.shape
    order, group_sizes = sort_by_expert(indices, w_gate.shape[0])
    x_sorted = jnp.take(x, order // k, axis=0)  # [tokens*k, embed]
    y_sorted = expert_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, impl)
    inverse = jnp.argsort(order)
    y = jnp.take(y_sorted, inverse, axis=0).reshape(t, k, -1)
    out = jnp.einsum("tkd,tk->td", y.astype(weights.dtype), weights)
    return out.astype(x.dtype)

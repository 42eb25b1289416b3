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
  block stays at its minimum of 8 rows and the share of padding grows). Larger blocks run
  faster on XLA:CPU but pad more, so by default the blocks come in two sizes
  (`block_tiers`): over half the rows go through big blocks that every routing fills
  completely, the rest through small ones, with the small blocks' padding bound. On the
  benchmark model (2,048 copies, 4 experts: 5 blocks of 256 + 15 of 64 rows, the same 2,240
  slots as 35 blocks of 64) the training step ran 1.10-1.35x faster than with one size of 64
  in three tools/bench_train.py runs (docs/benchmarks.md, session 12; 1.00-1.19x in bf16 and
  1.16-1.22x in float32 in alternating rounds, docs/xla_cpu.md). `model.gmm_block_size`
  asks for one size; `expert_ffn` (rows may be padding) always uses one.
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


def block_tiers(rows: int, groups: int, requested: int = 0,
                exact: bool = True) -> tuple[tuple[int, int], ...]:
    """Static ((block rows, number of blocks), ...) that hold any grouping of `rows` rows.

    `requested` > 0 or `exact=False` (sum(group_sizes) may be < rows): one size, `block_size`'s,
    with sum_g ceil(size_g / block) <= (rows + G (block - 1)) // block blocks. Otherwise, if
    B = the largest power of two <= rows / (2 G), at most 512, is at least twice the small
    block: two sizes, as many big blocks of B rows as every grouping fills, ceil((rows -
    G (B - 1)) / B) (sum_g floor(size_g / B) is at least that), then small blocks for the
    rest. The padding bound is the small block's, G (block - 1) rows, and the same number
    of slots; over half the rows go through big matmuls (62.5% on the benchmark model).
    """
    small = block_size(rows, groups, requested)
    one = ((small, (rows + groups * (small - 1)) // small),)
    if requested or not exact:
        return one
    big = min(1 << max((rows // (2 * groups)).bit_length() - 1, 0), 512)
    if big < 2 * small:
        return one
    num_big = -(-(rows - groups * (big - 1)) // big)  # >= 1: rows >= 2 G big
    num_small = (rows - num_big * big + groups * (small - 1)) // small
    return ((big, num_big), (small, num_small)) if num_small else ((big, num_big),)  # 1 group


def block_layout(group_sizes: jax.Array, rows: int, tiers: tuple[tuple[int, int], ...]):
    """Where each sorted row goes in the block buffer of `block_tiers` shape.

    Every tier but the last takes whole blocks of rows from the groups in order (group g gives
    at most floor(left_g / block) of them) until its blocks are full; the last tier takes what
    is left, ceil(left_g / block) blocks per group. Returns (dest [rows] int32: slot in the
    [sum(n * block)] buffer, tiers one after another, or that length for rows past
    sum(group_sizes); block_groups: per tier, [n] the group of each block).
    """
    groups = group_sizes.shape[0]
    total = sum(n * b for b, n in tiers)
    row_end = jnp.cumsum(group_sizes)
    r = jnp.arange(rows, dtype=jnp.int32)
    group_of_row = jnp.searchsorted(row_end, r, side="right")  # == groups for unused rows
    g = jnp.minimum(group_of_row, groups - 1)
    j = r - (row_end[g] - group_sizes[g])  # index of the row within its group
    dest = jnp.full((rows,), total, jnp.int32)
    left, done, offset, block_groups = group_sizes, jnp.zeros_like(group_sizes), 0, []
    for i, (block, n) in enumerate(tiers):
        if i == len(tiers) - 1:
            per = (left + block - 1) // block
            placed = left
        else:
            avail = left // block
            per = jnp.clip(n - (jnp.cumsum(avail) - avail), 0, avail)
            placed = per * block
        block_end = jnp.cumsum(per)
        here = (group_of_row < groups) & (j >= done[g]) & (j < done[g] + placed[g])
        slot = offset + (block_end[g] - per[g]) * block + j - done[g]
        dest = jnp.where(here, slot, dest).astype(jnp.int32)
        block_groups.append(jnp.minimum(
            jnp.searchsorted(block_end, jnp.arange(n), side="right"), groups - 1))
        left, done, offset = left - placed, done + placed, offset + n * block
    return dest, block_groups


def _slots(group_sizes: jax.Array, rows: int, experts: int, block: int = 0,
           exact: bool = True):
    """(tiers, dest [rows] slot of each sorted row, src [slots] row of each slot or `rows`,
    block_groups per tier)."""
    tiers = block_tiers(rows, experts, block, exact)
    dest, block_groups = block_layout(group_sizes, rows, tiers)
    src = jnp.full((sum(n * b for b, n in tiers),), rows, jnp.int32).at[dest].set(
        jnp.arange(rows, dtype=jnp.int32), mode="drop")
    return tiers, dest, src, block_groups


def tiered_swiglu(xb: jax.Array, tiers: tuple[tuple[int, int], ...], block_groups,
                  w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """xb [slots, embed], the tiers' blocks one after another (`block_tiers`), block_groups
    per tier [n] (`block_layout`) -> [slots, embed]: `block_swiglu` per tier."""
    d, ys, offset = xb.shape[-1], [], 0
    for (block, n), groups in zip(tiers, block_groups):
        x = xb[offset:offset + n * block].reshape(n, block, d)
        ys.append(block_swiglu(x, groups, w_gate, w_up, w_down).reshape(-1, d))
        offset += n * block
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys)


def _expert_ffn_blocks(x_sorted, group_sizes, w_gate, w_up, w_down, block=0):
    rows = x_sorted.shape[0]  # may hold padding rows past sum(group_sizes): one block size
    tiers, dest, src, groups = _slots(group_sizes, rows, w_gate.shape[0], block, exact=False)
    xb = gather_rows(x_sorted, src, dest[:, None])
    return gather_rows(tiered_swiglu(xb, tiers, groups, w_gate, w_up, w_down), dest,
                       src[:, None])


def _dropless_blocks(x, weights, indices, w_gate, w_up, w_down, block=0):
    """Token copies go straight to their block slots (and back) by gathers."""
    t, k = indices.shape
    d = x.shape[-1]
    order, group_sizes = sort_by_expert(indices, w_gate.shape[0])
    tiers, dest, src, groups = _slots(group_sizes, t * k, w_gate.shape[0], block)
    slot_of_copy = jnp.zeros((t * k,), jnp.int32).at[order].set(dest)  # copy c = token * k + j
    copy_of_slot = jnp.where(src < t * k, order[jnp.minimum(src, t * k - 1)], t * k)
    token_of_slot = jnp.where(copy_of_slot < t * k, copy_of_slot // k, t)
    xb = gather_rows(x, token_of_slot, slot_of_copy.reshape(t, k))
    yb = tiered_swiglu(xb, tiers, groups, w_gate, w_up, w_down)
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

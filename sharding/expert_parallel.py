"""Expert parallelism: tokens travel to the devices that hold their experts, and back.

The routed-expert computation of every MoE block runs inside `jax.shard_map` over the mesh.
Each device holds the tokens of its batch shard and `E / n` experts (n = size of the expert
axes, which must be among the batch axes, so every expert device brings its own tokens):

  sort local token copies by expert -> send each expert's rows to its device (all-to-all)
  -> group received rows by local expert -> grouped matmul (`ragged_dot`) -> send back
  -> un-sort -> combine with the router weights (-> psum over the tensor axes, whose
  devices each hold a slice of every expert's MLP width).

Expert weights enter the shard_map split over the expert (and tensor) axes, so they are
never all-gathered across the expert axis; an FSDP split of their `embed` dimension enters
the map still split and is all-gathered inside it (`lax.all_gather` over the embed axes,
just before the expert matmuls), so that its transpose in the backward pass is a
reduce-scatter of the gradients rather than a psum of whole replicated ones.

Two interchangeable exchanges (`impl`):
  * "padded": `lax.all_to_all` of per-destination buffers of a static size. Runs on every
    backend (XLA:CPU included): it is what the CPU equivalence tests exercise.
  * "ragged": `lax.ragged_all_to_all` of exactly the rows each device needs (TPU, GPU);
    not implemented by XLA:CPU, so it is checked by TPU AOT compilation. "ragged_emulated"
    runs the same offset arithmetic with an all-gather based stand-in, so that arithmetic is
    tested numerically on CPU too.
Receive buffers are `buffer_factor x local copies` rows (0: the worst case, n x, so no copy
is ever dropped; copies beyond a smaller buffer are dropped and counted in `dropped`).

Capacity dispatch under EP follows GShard: each device's tokens form a group with capacity
ceil(capacity_factor * tokens * k / E) per expert (the same priority rule as
`jaxmoe.model.moe.capacity`), and the [E, C, embed] buffers are exchanged with all-to-all.
With one device the group is the whole batch, so results equal the single-device model
whenever nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import MeshError
from sharding.rules import Rules, logical_to_spec, mesh_axes_of

IMPLS = ("auto", "padded", "ragged", "ragged_emulated")
Ffn = Callable[..., jax.Array]  # ffn(x_sorted [rows, embed], group_sizes [experts], w_gate,
#                                w_up, w_down) -> [rows, embed], rows beyond the groups -> 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """Mesh axes of the token batch, the experts and the expert MLP width."""

    mesh: Mesh
    batch: tuple[str, ...]
    expert: tuple[str, ...]
    tensor: tuple[str, ...]
    impl: str
    buffer_factor: float
    matmul: str = "model"  # "model" (the block's ffn) | "megablox" | "megablox_interpret"
    embed: tuple[str, ...] = ()  # axes sharding the experts' embed dimension (FSDP)

    def size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)


def _axis(axes: tuple[str, ...]) -> Any:
    return axes[0] if len(axes) == 1 else axes


def _as_tuple(axes: Any) -> tuple[str, ...]:
    return () if axes is None else (axes if isinstance(axes, tuple) else (axes,))


def _spec(axes: tuple[str, ...]) -> Any:
    return None if not axes else _axis(axes)


# ----------------------------------------------------------------------------- exchanges

def _exchange_padded(x_sorted, e_sorted, group_sizes, ws, ffn, lay: Layout):
    """Padded all-to-all. x_sorted [rows, d] sorted by expert id e_sorted [rows];
    group_sizes [E]. Returns (y_sorted [rows, d], dropped copies)."""
    n = lay.size(lay.expert)
    e_local = ws[0].shape[0]
    rows, d = x_sorted.shape
    axis = _axis(lay.expert)
    per_dest = rows if lay.buffer_factor <= 0 else max(1, math.ceil(lay.buffer_factor * rows / n))
    dest = e_sorted // e_local
    counts = group_sizes.reshape(n, e_local).sum(-1)  # [n] copies for each destination
    slot = jnp.arange(rows) - (jnp.cumsum(counts) - counts)[dest]
    keep = slot < per_dest
    slot = jnp.where(keep, slot, per_dest)  # out of range: dropped by the scatter
    send = jnp.zeros((n, per_dest, d), x_sorted.dtype).at[dest, slot].set(x_sorted, mode="drop")
    ids = jnp.full((n, per_dest), e_local, jnp.int32).at[dest, slot].set(
        e_sorted % e_local, mode="drop")  # e_local marks an empty row
    recv = lax.all_to_all(send, axis, 0, 0).reshape(n * per_dest, d)  # [source * slot, d]
    rid = lax.all_to_all(ids, axis, 0, 0).reshape(n * per_dest)
    y = _local_experts(recv, rid, ws, ffn).reshape(n, per_dest, d)
    back = lax.all_to_all(y, axis, 0, 0)  # [destination, slot, d], in the send layout
    y_sorted = back.at[dest, slot].get(mode="fill", fill_value=0)
    return y_sorted, jnp.sum(~keep)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`lax.ragged_all_to_all` built from all-gathers (same contract; for CPU tests)."""
    me = lax.axis_index(axis_name)
    ops = lax.all_gather(operand, axis_name)  # [n, rows, d]
    in_off = lax.all_gather(input_offsets, axis_name)[:, me]  # [source]
    out_off = lax.all_gather(output_offsets, axis_name)[:, me]
    del send_sizes  # the receiver's recv_sizes say the same
    j = jnp.arange(output.shape[0])
    for s in range(ops.shape[0]):
        inside = (j >= out_off[s]) & (j < out_off[s] + recv_sizes[s])
        src = jnp.clip(in_off[s] + j - out_off[s], 0, ops.shape[1] - 1)
        output = jnp.where(inside[:, None], jnp.take(ops[s], src, axis=0), output)
    return output


def _exchange_ragged(x_sorted, e_sorted, group_sizes, ws, ffn, lay: Layout):
    """Ragged all-to-all: each device receives exactly its experts' rows (up to `cap`)."""
    del e_sorted
    n = lay.size(lay.expert)
    e_local = ws[0].shape[0]
    rows, d = x_sorted.shape
    axis = _axis(lay.expert)
    a2a = (lax.ragged_all_to_all if lay.impl == "ragged"
           else functools.partial(_emulated_ragged_all_to_all))
    cap = n * rows if lay.buffer_factor <= 0 else max(1, math.ceil(lay.buffer_factor * rows))
    me = lax.axis_index(axis)
    per = lax.all_gather(group_sizes, axis).reshape(n, n, e_local)  # [source, dest, expert]
    sizes = per.sum(-1)  # [source, dest]
    recv_off = jnp.cumsum(sizes, axis=0) - sizes  # where a source's rows start at a dest
    kept = jnp.clip(cap - recv_off, 0, sizes)  # rows that fit the destination's buffer
    send_off = jnp.cumsum(sizes, axis=1) - sizes  # where a dest's rows start at a source
    starts = jnp.minimum(recv_off[:, me], cap - 1)
    recv = a2a(x_sorted, jnp.zeros((cap, d), x_sorted.dtype),
               jnp.minimum(send_off[me], rows - 1), kept[me],
               jnp.minimum(recv_off[me], cap - 1), kept[:, me], axis_name=axis)
    # Local expert of each received row: segments (source, expert) in order, each clipped.
    seg_start = (recv_off[:, me][:, None] + jnp.cumsum(per[:, me], -1) - per[:, me]).reshape(-1)
    j = jnp.arange(cap)
    seg = jnp.searchsorted(seg_start, j, side="right") - 1  # [cap]
    src = seg // e_local
    valid = (seg >= 0) & (j < recv_off[src, me] + kept[src, me])
    rid = jnp.where(valid, seg % e_local, e_local)
    y = _local_experts(recv, rid, ws, ffn)
    y_sorted = a2a(y, jnp.zeros((rows, d), y.dtype), starts, kept[:, me],
                   jnp.minimum(send_off[:, me], rows - 1), kept[me], axis_name=axis)
    return y_sorted, rows - jnp.sum(kept[me])


def megablox_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, *, interpret: bool = False):
    """`jaxmoe.model.moe.dropless.expert_ffn` (SwiGLU per expert over rows sorted by expert)
    with the Pallas TPU grouped matmul (megablox `gmm`). Its backward computes the weight
    gradient group by group (`tgmm`); XLA:TPU lowers `ragged_dot`'s weight gradient to a
    dense product over every local expert, E_local times the work. Rows beyond the groups
    are 0. `interpret=True` runs the kernels on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = x_sorted.shape
    f = w_gate.shape[-1]
    # gmm needs whole row tiles (its k and n tiles may be ragged): up to 512 rows are one
    # tile; more are padded to a multiple of 512 with rows outside every group.
    tm = min(512, m)
    padded = -(-m // tm) * tm

    def mm(lhs, rhs, n_in, n_out):  # positional: gmm's non-differentiable arguments
        tiling = (tm, min(1024, n_in), min(1024, n_out))
        return gmm(lhs, rhs, group_sizes, lhs.dtype, tiling, None, None, False, interpret)

    # The kernels leave rows outside every group (and their input gradients) unwritten:
    # select them away on the way in and out, so neither garbage nor NaN can leak.
    valid = (jnp.arange(padded) < jnp.sum(group_sizes))[:, None]
    x = jnp.where(valid, jnp.pad(x_sorted, ((0, padded - m), (0, 0))), 0)
    h = jnp.where(valid, jax.nn.silu(mm(x, w_gate, k, f)) * mm(x, w_up, k, f), 0)
    return jnp.where(valid, mm(h, w_down, f, k), 0)[:m]


def _local_experts(rows, rid, ws, ffn):
    """rows [m, d] with local expert ids rid [m] (e_local = empty) -> ffn outputs [m, d]."""
    e_local = ws[0].shape[0]
    order = jnp.argsort(rid, stable=True)
    gs = jnp.bincount(rid, length=e_local).astype(jnp.int32)  # empty rows fall outside
    y = ffn(jnp.take(rows, order, axis=0), gs, *ws)
    return jnp.take(y, jnp.argsort(order), axis=0)


# ----------------------------------------------------------------------------- per device

def _dropless_local(x, weights, indices, mask, w_gate, w_up, w_down, *, ffn, lay: Layout):
    del mask
    t, k = indices.shape
    ws = (w_gate, w_up, w_down)
    n = lay.size(lay.expert)
    num_experts = w_gate.shape[0] * n
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # token copies (t * k + j) grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    x_sorted = jnp.take(x, order // k, axis=0)  # [t * k, d]
    if n == 1:
        y_sorted, dropped = ffn(x_sorted, group_sizes, *ws), jnp.zeros((), jnp.int32)
    elif lay.impl == "padded":
        y_sorted, dropped = _exchange_padded(x_sorted, flat[order], group_sizes, ws, ffn, lay)
    else:
        y_sorted, dropped = _exchange_ragged(x_sorted, flat[order], group_sizes, ws, ffn, lay)
    y = jnp.take(y_sorted, jnp.argsort(order), axis=0).reshape(t, k, -1)
    out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)
    return out, dropped


def _capacity_local(x, weights, indices, mask, w_gate, w_up, w_down, *, ffn, lay: Layout,
                    capacity_factor: float):
    t, k = indices.shape
    n = lay.size(lay.expert)
    e_local, d = w_gate.shape[0], x.shape[-1]
    e = e_local * n
    c = max(1, math.ceil(capacity_factor * t * k / e))  # = capacity.expert_capacity
    # GShard priority, as jaxmoe.model.moe.capacity: all first choices, then second, ...
    # padding tokens take no slot (as jaxmoe.model.moe.capacity)
    onehot = jax.nn.one_hot(indices.T, e, dtype=jnp.int32) * mask[None, :, None]  # [k, t, e]
    position = jnp.cumsum(onehot.reshape(k * t, e), axis=0).reshape(k, t, e) - 1
    position = jnp.sum(position * onehot, axis=-1)  # [k, t]
    kept = (position < c) & mask[None, :]
    slot = jax.nn.one_hot(jnp.where(kept, position, c), c, dtype=jnp.float32)  # [k, t, c]
    expert = jax.nn.one_hot(indices.T, e, dtype=jnp.float32)
    dispatch = jnp.einsum("kte,ktc->tec", expert, slot)
    combine = jnp.einsum("kte,ktc,kt->tec", expert, slot, weights.T)
    xin = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)  # [e, c, d]
    if n > 1:  # [dest, e_local, c, d] -> [source, e_local, c, d]
        xin = lax.all_to_all(xin.reshape(n, e_local, c, d), _axis(lay.expert), 0, 0)
        xin = xin.transpose(1, 0, 2, 3)  # [e_local, source, c, d]
    rows = xin.reshape(-1, d)
    gs = jnp.full((e_local,), rows.shape[0] // e_local, jnp.int32)
    y = ffn(rows, gs, w_gate, w_up, w_down)
    if n > 1:
        y = y.reshape(e_local, n, c, d).transpose(1, 0, 2, 3)
        y = lax.all_to_all(y, _axis(lay.expert), 0, 0)
    out = jnp.einsum("tec,ecd->td", combine, y.reshape(e, c, d).astype(jnp.float32))
    dropped = jnp.sum((~kept) & mask[None, :])
    return out, dropped


# ----------------------------------------------------------------------------- the hook

def _dispatch(x, weights, indices, w_gate, w_up, w_down, *, dispatch: str,
              capacity_factor: float, token_mask, ffn: Ffn, lay: Layout):
    """The `jaxmoe.model.moe.block.ExpertDispatch` for `lay` (shapes there, global)."""
    if lay.matmul != "model":
        ffn = functools.partial(megablox_ffn, interpret=lay.matmul == "megablox_interpret")
    if dispatch == "dropless":
        local = functools.partial(_dropless_local, ffn=ffn, lay=lay)
    else:
        local = functools.partial(_capacity_local, ffn=ffn, lay=lay,
                                  capacity_factor=capacity_factor)

    def body(x, weights, indices, mask, w_gate, w_up, w_down):
        if lay.size(lay.embed) > 1:
            # FSDP: gather the embed dimension inside the map, so that its transpose is a
            # reduce-scatter of the gradients rather than a psum of whole replicated ones.
            ax = _axis(lay.embed)
            w_gate, w_up = (lax.all_gather(w, ax, axis=1, tiled=True) for w in (w_gate, w_up))
            w_down = lax.all_gather(w_down, ax, axis=2, tiled=True)
        out, dropped = local(x, weights, indices, mask, w_gate, w_up, w_down)
        if lay.tensor:  # each tensor device summed over its slice of the MLP width
            out = lax.psum(out, _axis(lay.tensor))
        dropped = lax.psum(dropped, _axis(lay.batch)) if lay.batch else dropped
        return out.astype(x.dtype), dropped.astype(jnp.float32)

    tok = P(_spec(lay.batch))
    w_in = P(_spec(lay.expert), _spec(lay.embed), _spec(lay.tensor))
    w_out = P(_spec(lay.expert), _spec(lay.tensor), _spec(lay.embed))
    mapped = jax.shard_map(body, mesh=lay.mesh,
                           in_specs=(tok, tok, tok, tok, w_in, w_in, w_out),
                           out_specs=(tok, P()),
                           # Pallas kernels carry no varying-axes types; their body is
                           # checked by the tests instead (megablox_interpret on CPU).
                           check_vma=lay.matmul == "model")
    return mapped(x, weights, indices, token_mask.astype(bool), w_gate, w_up, w_down)


def resolve_impl(impl: str, mesh: Mesh) -> str:
    """"auto" -> "ragged" on TPU/GPU, "padded" elsewhere (XLA:CPU lacks ragged-all-to-all)."""
    if impl not in IMPLS:
        raise MeshError(f"mesh.expert_all_to_all={impl!r}: expected one of {', '.join(IMPLS)}")
    accelerator = mesh.devices.flat[0].platform in ("tpu", "gpu", "cuda", "rocm")
    if impl == "ragged" and not accelerator:
        raise MeshError(f"mesh.expert_all_to_all='ragged' on {mesh.devices.flat[0].platform} "
                        "devices: expected padded, ragged_emulated or auto (XLA:CPU has no "
                        "ragged-all-to-all)")
    if impl != "auto":
        return impl
    return "ragged" if accelerator else "padded"


def make_expert_dispatch(mesh: Mesh, rules: Rules, impl: str = "auto",
                         buffer_factor: float = 0.0, matmul: str = "auto") -> Callable | None:
    """The dispatch for MoE blocks on `mesh`, or None on a single device (built-in path).

    `matmul`: "auto" (megablox on TPU, the model's ragged_dot FFN elsewhere), "model",
    "megablox" or "megablox_interpret"."""
    if mesh.size == 1:
        return None
    if buffer_factor < 0:
        raise MeshError(f"mesh.expert_buffer_factor={buffer_factor}: expected >= 0 "
                        "(0 = never drop)")
    batch, expert, tensor = (mesh_axes_of(n, rules) for n in ("batch", "expert", "mlp"))

    def split(axes: tuple[str, ...]) -> tuple[str, ...]:  # an axis of size 1 splits nothing
        return tuple(a for a in axes if mesh.shape[a] > 1)

    if not set(split(expert)) <= set(batch):
        raise MeshError(f"rules: expert axes {expert} must also shard 'batch' {batch} "
                        "(each expert device brings its own tokens)")
    if set(split(tensor)) & set(split(batch)):
        raise MeshError(f"rules: 'mlp' axes {tensor} must not shard 'batch' {batch}")
    if matmul == "auto":
        matmul = "megablox" if mesh.devices.flat[0].platform == "tpu" else "model"
    w_spec = logical_to_spec(("expert", "embed", "mlp"), rules)
    if tuple(mesh_axes_of("expert", rules)) != _as_tuple(w_spec[0]) or \
            tuple(tensor) != _as_tuple(w_spec[2]):
        raise MeshError(f"rules: expert weights map to {w_spec}; expected the expert axes "
                        f"{expert} on experts and the 'mlp' axes {tensor} on their width")
    # Axes of size 1 are left out of the map's specs: an expert axis of size 1 outside the
    # batch axes would make every output "vary" over it, which shard_map's check refuses.
    lay = Layout(mesh, split(batch), split(expert), split(tensor), resolve_impl(impl, mesh),
                 buffer_factor, matmul, split(_as_tuple(w_spec[1])))
    return functools.partial(_dispatch, lay=lay)

"""SwiGLU over fixed-size row blocks, each block owned by one expert, with an explicit VJP.

x [blocks, block, embed] and block_group [blocks] (the expert of each block, ascending) ->
y [blocks, block, embed] with y[n] = SwiGLU_{block_group[n]}(x[n]). Each block reads its
expert's weights; the weight gradient is computed per block and then summed per expert by a
small one-hot contraction (a scatter-add of [blocks, in, out] partials, which autodiff of
`jnp.take` would produce, is several times slower on XLA:CPU). Matmuls take compute-dtype inputs and
accumulate in float32 (see jaxmoe/model/matmul.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.model.matmul import accumulation_dtype, align_varying, einsum, match_varying


def _forward(x, block_group, w_gate, w_up, w_down):
    acc = accumulation_dtype(x.dtype, w_gate.dtype)

    def up(w):  # [blocks, block, embed] x per-block expert weights -> [blocks, block, mlp]
        return einsum("nbi,nio->nbo", x, jnp.take(w, block_group, axis=0), out_dtype=acc)

    a, u = up(w_gate), up(w_up)
    h = (jax.nn.silu(a) * u).astype(x.dtype)
    return einsum("nbf,nfo->nbo", h, jnp.take(w_down, block_group, axis=0)), a, u


@jax.custom_vjp
def _block_swiglu(x, block_group, w_gate, w_up, w_down):
    return _forward(x, block_group, w_gate, w_up, w_down)[0]


def _fwd(x, block_group, w_gate, w_up, w_down):
    y, a, u = _forward(x, block_group, w_gate, w_up, w_down)
    return y, (x, block_group, w_gate, w_up, w_down, a.astype(x.dtype), u.astype(x.dtype))


def _per_expert(dw_blocks: jax.Array, block_group: jax.Array, experts: int, dtype) -> jax.Array:
    """[blocks, in, out] partials (accumulation dtype) -> [experts, in, out] sums."""
    onehot = jax.nn.one_hot(block_group, experts, dtype=dw_blocks.dtype)
    return jnp.einsum("ne,nio->eio", onehot, dw_blocks).astype(dtype)


def _bwd(res, g):
    x, block_group, w_gate, w_up, w_down, a, u = res
    experts = w_down.shape[0]
    acc = accumulation_dtype(x.dtype, w_gate.dtype)
    g = g.astype(x.dtype)
    a32, u32 = a.astype(acc), u.astype(acc)
    sig = jax.nn.sigmoid(a32)
    silu = a32 * sig
    h = (silu * u32).astype(x.dtype)
    dh = einsum("nbo,nfo->nbf", g, jnp.take(w_down, block_group, axis=0), out_dtype=acc)
    da = (dh * u32 * sig * (1 + a32 * (1 - sig))).astype(x.dtype)
    du = (dh * silu).astype(x.dtype)

    def down(d, w):  # [blocks, block, mlp] x per-block expert weights^T -> [blocks, block, embed]
        return einsum("nbo,nio->nbi", d, jnp.take(w, block_group, axis=0), out_dtype=acc)

    dx = (down(da, w_gate) + down(du, w_up)).astype(x.dtype)

    def dw(lhs, rhs, w):
        partial = einsum("nbi,nbo->nio", lhs, rhs, out_dtype=acc)
        return match_varying(_per_expert(partial, block_group, experts, w.dtype), w)

    return (match_varying(dx, x), None, dw(x, da, w_gate), dw(x, du, w_up),
            dw(h, g, w_down))


_block_swiglu.defvjp(_fwd, _bwd)


def block_swiglu(x: jax.Array, block_group: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                 w_down: jax.Array) -> jax.Array:
    """x [blocks, block, embed], block_group [blocks] int, w_gate/w_up [experts, embed, mlp],
    w_down [experts, mlp, embed] -> [blocks, block, embed] in x.dtype."""
    return _block_swiglu(*align_varying(x, block_group, w_gate, w_up, w_down))

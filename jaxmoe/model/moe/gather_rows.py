"""Row gathers whose gradient is also a gather (MoE dispatch and combine).

Dispatch copies each token to k slots of the expert buffer and combine reads each slot back:
both are gathers. Autodiff turns a gather's gradient into a scatter-add, which XLA:CPU runs
as a serial loop (the largest non-matmul cost of an MoE step before this, measured with
tools/bench_train.py). Here the inverse mapping is passed along, so the gradient is a gather
plus a sum over the k copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.model.matmul import align_varying, match_varying


def gather_rows(x: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """y[i] = x[src[i]], or zeros where src[i] == len(x).

    x [n, d]; src [m] int in [0, n]; dst [n, k] int in [0, m]: the k rows of y that hold
    x[r] (every row of x is read exactly k times; m marks an unused copy). -> y [m, d].
    """
    return _gather_rows(*align_varying(x, src, dst))


@jax.custom_vjp
def _gather_rows(x, src, dst):
    return jnp.take(x, src, axis=0, mode="fill", fill_value=0)


def _fwd(x, src, dst):
    return _gather_rows(x, src, dst), (x, src, dst)


def _bwd(res, g):
    x, src, dst = res
    n, k = dst.shape
    dx = jnp.take(g, dst.reshape(-1), axis=0, mode="fill", fill_value=0)
    acc = jnp.promote_types(g.dtype, jnp.float32)
    dx = jnp.sum(dx.reshape(n, k, -1).astype(acc), axis=1).astype(g.dtype)
    return match_varying(dx, x), None, None


_gather_rows.defvjp(_fwd, _bwd)

"""SwiGLU feed-forward block (dense layers and shared experts)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxmoe.model import logical as L
from jaxmoe.model.layers import param
from jaxmoe.model.matmul import einsum
from jaxmoe.model.precision import Precision


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] (up to 3 leading dims) times w [in, out]."""
    lead = "abc"[:x.ndim - 1]
    return einsum(f"{lead}i,io->{lead}o", x, w)


class MLP(nnx.Module):
    """y = (silu(x W_gate) * (x W_up)) W_down; x [..., embed]."""

    def __init__(self, embed_dim: int, mlp_dim: int, std: float, precision: Precision,
                 rngs: nnx.Rngs):
        pd = precision.param_dtype
        self.gate = param(rngs, (embed_dim, mlp_dim), (L.EMBED, L.MLP), std, pd)
        self.up = param(rngs, (embed_dim, mlp_dim), (L.EMBED, L.MLP), std, pd)
        self.down = param(rngs, (mlp_dim, embed_dim), (L.MLP, L.EMBED), std, pd)
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.precision.cast
        h = jax.nn.silu(_mm(x, c(self.gate[...]))) * _mm(x, c(self.up[...]))
        if h.ndim == 3:
            h = L.constrain(h, (L.BATCH, L.LENGTH, L.MLP))
        return _mm(h, c(self.down[...]))

"""Small building blocks: parameters with logical axes, RMSNorm, embeddings, rotary positions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.model import logical as L
from jaxmoe.model.matmul import einsum
from jaxmoe.model.precision import Precision


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
          dtype=jnp.float32) -> nnx.Param:
    """A normal(0, std) parameter tagged with logical axis names (one per dimension)."""
    assert len(shape) == len(axes), (shape, axes)
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes)


def const_param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, statistics in float32. x: [..., dim]."""

    def __init__(self, dim: int, eps: float, precision: Precision, axis_name: str = L.NORM):
        self.scale = const_param(jnp.ones((dim,), precision.param_dtype), (axis_name,))
        self.eps = eps
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.precision.compute_dtype)


class Embedder(nnx.Module):
    """Token embedding [vocab, embed]; `attend` gives logits when embeddings are tied."""

    def __init__(self, vocab: int, dim: int, std: float, precision: Precision, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), (L.VOCAB, L.EMBED), std,
                               precision.param_dtype)
        self.precision = precision

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] int -> [batch, length, embed] in compute dtype."""
        # The table's embed dimension is gathered first, as FSDP does for every weight: looked
        # up from the sharded table, rows come out split over embed, and going from there to
        # the batch-split activation (and back, for the gradient) is a full rematerialisation
        # for XLA on meshes with both data and fsdp/expert axes.
        table = L.constrain(self.embedding[...], (L.VOCAB, None))
        x = jnp.take(table, tokens, axis=0)
        return L.constrain(self.precision.cast(x), (L.BATCH, L.LENGTH, L.EMBED))

    def attend(self, x: jax.Array) -> jax.Array:
        """x [batch, length, embed] -> logits [batch, length, vocab] in float32."""
        w = self.precision.cast(self.embedding[...])
        return einsum("ble,ve->blv", x, w, out_dtype=jnp.float32)


class Rotary(NamedTuple):
    """Rotary tables of one forward pass: cos, sin [batch, length, rotary_dim // 2] float32,
    already multiplied by any YaRN scale.

    The decoder builds them once (`rotary_tables`) and every layer reads them. Computing
    sin/cos inside each layer lets XLA fuse them into every consumer, which then evaluates
    them again per head, for q and k, in the forward, remat and backward passes (measured on
    XLA:CPU: ~10% of a small model's step).
    """

    cos: jax.Array
    sin: jax.Array


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [head_dim // 2] (float32)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotary_tables(positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> Rotary:
    """positions [batch, length] (per-segment), inv_freq [dim // 2] -> Rotary tables."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return Rotary(jnp.cos(angles) * scale, jnp.sin(angles) * scale)


def apply_rope(x: jax.Array, rope: Rotary, length_axis: int = 1) -> jax.Array:
    """Rotary embedding, "rotate half" layout (as Llama/Mixtral/Qwen/DeepSeek in transformers).

    x: [batch, ..., dim] with the length at `length_axis` (1: [batch, length, heads, dim];
    2: heads-major [batch, heads, length, dim]); rope tables [batch, length, dim / 2].
    """
    b, length, half = rope.cos.shape
    if (x.shape[0], x.shape[length_axis], x.shape[-1]) != (b, length, 2 * half):
        raise ValueError(f"rotary tables {rope.cos.shape} do not fit x {x.shape} (length "
                         f"axis {length_axis}): expected batch {b}, length {length}, "
                         f"dim {2 * half}")
    shape = [1] * x.ndim
    shape[0], shape[length_axis], shape[-1] = b, length, half
    cos, sin = rope.cos.reshape(shape), rope.sin.reshape(shape)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

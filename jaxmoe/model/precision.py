"""The precision policy, set in one place: parameter dtype, compute dtype, output dtype.

Parameters are stored in `param_dtype` (float32 by default) and cast to `compute_dtype`
(bfloat16 by default) at use; router logits, softmax statistics, logits and losses are float32.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Precision:
    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.bfloat16
    output_dtype: jnp.dtype = jnp.float32  # logits, router probabilities, losses

    @classmethod
    def from_names(cls, param_dtype: str, compute_dtype: str) -> "Precision":
        return cls(jnp.dtype(param_dtype), jnp.dtype(compute_dtype))

    def cast(self, x):
        return x.astype(self.compute_dtype)

"""Logical axis names for activations.

Modules name what a dimension *is* (`batch`, `length`, `embed`, ...); `sharding/rules.py`
decides where it lives. Outside a mesh + rules context these constraints are no-ops, so the
same module runs unchanged on one CPU and on a pod.
"""

from __future__ import annotations

import jax
from flax.linen import spmd

BATCH, LENGTH, EMBED = "batch", "length", "embed"
HEADS, KV_HEADS, HEAD_DIM = "heads", "kv_heads", "head_dim"
MLP, EXPERT, VOCAB, LAYERS = "mlp", "expert", "vocab", "layers"
NORM = "norm"
Q_LORA, KV_LORA = "q_lora", "kv_lora"  # MLA low-rank query / key-value latent widths


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on `x` by logical axis names (no-op without rules and a mesh)."""
    return spmd.with_logical_constraint(x, axes)

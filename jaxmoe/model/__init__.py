"""Flax NNX model: decoder-only MoE transformer and its parts."""

import flax

# Shardings are derived from logical axis names by `sharding/` and applied through jit's
# in/out shardings; Flax's eager per-variable sharding would demand a mesh at construction.
# Set here, before any submodule creates a variable: every model part is imported through
# this package.
flax.config.update("flax_always_shard_variable", False)

from jaxmoe.model.decoder import (  # noqa: E402
    DecoderOutput,
    GroupSpec,
    MoETransformer,
    layer_groups,
)

__all__ = ["DecoderOutput", "GroupSpec", "MoETransformer", "layer_groups"]

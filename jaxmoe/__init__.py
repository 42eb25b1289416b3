"""jaxmoe: Mixture-of-Experts transformers in JAX / Flax NNX."""

import flax

# Shardings are derived from logical axis names by `sharding/` and applied through jit's
# in/out shardings; Flax's eager per-variable sharding would demand a mesh at construction.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"

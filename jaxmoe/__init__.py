"""jaxmoe: Mixture-of-Experts transformers in JAX / Flax NNX.

Importing the package imports nothing heavy (the `jaxmoe` command's entry point,
`jaxmoe/__main__.py`, relies on it); Flax is set up by `jaxmoe.model`.
"""

__version__ = "0.1.0"

"""Training state: an explicit pytree (no hidden module state)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import MoETransformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: int32 scalar; params: trainable `nnx.Param`s; rest: other model variables (the
    router selection biases); opt_state: optax state of `params`; rng: a PRNG key."""

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


def split_model(model: MoETransformer):
    """model -> (graphdef, params, rest)."""
    return nnx.split(model, nnx.Param, ...)


def model_graphdef(cfg: ModelConfig):
    """The static structure of the model, without allocating parameters."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0))))
    return graphdef


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Builds the model and optimizer state (call under jit with out_shardings to shard it)."""
    key = jax.random.key(seed)
    init_key, rng = jax.random.split(key)
    model = MoETransformer(cfg, nnx.Rngs(params=init_key))
    _, params, rest = split_model(model)
    return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), rng)

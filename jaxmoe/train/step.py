"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: cross-entropy over non-pad tokens plus the
weighted MoE auxiliary losses, gradients accumulated over micro-batches with `lax.scan`, an
optax update, then the aux-loss-free router-bias update from the measured expert loads.

Gradient accumulation gives the same update as one large batch: each micro-batch contributes
sum(token losses) / (non-pad tokens of the *whole* batch). The MoE aux losses are per
micro-batch statistics (as per-group losses in GShard), averaged over micro-batches.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxmoe.config import Config
from jaxmoe.model.decoder import DecoderOutput
from jaxmoe.train.state import TrainState, merge_model, split_model

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: [batch, length] int32


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Sum of token cross-entropies (nats) over `mask` and the token count. logits float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * m), jnp.sum(m)


def forward(graphdef, params, rest, batch: Batch) -> DecoderOutput:
    model = merge_model(graphdef, TrainState(None, params, rest, None, None))
    return model(batch["inputs"], batch["segment_ids"], batch["positions"])


def _split_micro(batch: Batch, n: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    m = cfg.model
    accum = cfg.train.grad_accum_steps

    def loss_fn(params, rest, micro: Batch, total_tokens):
        out = forward(graphdef, params, rest, micro)
        ce_sum, ntok = cross_entropy_sum(out.logits, micro["targets"], micro["segment_ids"] > 0)
        aux, z = out.aux_losses()
        loss = ce_sum / total_tokens + (m.aux_loss_coef * aux + m.z_loss_coef * z) / accum
        loads = {g: tuple(s.load for s in stats) for g, stats in out.moe.items()}
        return loss, (ce_sum, ntok, aux, z, loads, out.dropped())

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        total_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), 1.0)
        micro = _split_micro(batch, accum)

        def accumulate(carry, mb):
            grads, ce, aux, z, loads, dropped = carry
            (_, (ce_i, _, aux_i, z_i, loads_i, dropped_i)), g = grad_fn(
                state.params, state.rest, mb, total_tokens)
            grads = jax.tree.map(jnp.add, grads, g)
            loads = jax.tree.map(jnp.add, loads, loads_i)
            return (grads, ce + ce_i, aux + aux_i / accum, z + z_i / accum, loads,
                    dropped + dropped_i), None

        zero_loads = jax.eval_shape(lambda: loss_fn(state.params, state.rest,
                                                    jax.tree.map(lambda x: x[0], micro),
                                                    total_tokens)[1][4])
        init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()),
                jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_loads),
                jnp.zeros(()))
        (grads, ce, aux, z, loads, dropped), _ = jax.lax.scan(accumulate, init, micro)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        if m.bias_update_rate > 0:
            model = merge_model(graphdef, TrainState(None, params, rest, None, None))
            model.update_router_biases(loads, m.bias_update_rate)
            _, _, rest = split_model(model)
        metrics = {
            "loss": ce / total_tokens,
            "aux_loss": aux,
            "z_loss": z,
            "grad_norm": optax.global_norm(grads),
            "tokens": total_tokens,
            "dropped": dropped,
            "load_max_over_mean": _imbalance(loads),
        }
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = TrainState(state.step + 1, params, rest, opt_state, state.rng)
        return new_state, metrics

    return train_step


def _imbalance(loads) -> jax.Array:
    leaves = jax.tree.leaves(loads)
    if not leaves:
        return jnp.ones(())
    ratios = [jnp.max(l, axis=-1) / jnp.maximum(jnp.mean(l, axis=-1), 1e-9) for l in leaves]
    return jnp.max(jnp.stack([jnp.max(r) for r in ratios]))


def make_eval_step(graphdef) -> Callable:
    def eval_step(state: TrainState, batch: Batch):
        out = forward(graphdef, state.params, state.rest, batch)
        ce_sum, ntok = cross_entropy_sum(out.logits, batch["targets"], batch["segment_ids"] > 0)
        return {"ce_sum": ce_sum, "tokens": ntok}

    return eval_step

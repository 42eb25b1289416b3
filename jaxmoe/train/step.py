"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: cross-entropy over non-pad tokens plus the
weighted MoE auxiliary losses, gradients accumulated over micro-batches with `lax.scan`, an
optax update, then the aux-loss-free router-bias update from the measured expert loads.

Gradient accumulation gives the same update as one large batch on the dropless path: each
micro-batch contributes sum(token losses) / (non-pad tokens of the *whole* batch). The MoE
aux losses are per micro-batch statistics (as per-group losses in GShard), averaged over
micro-batches; capacity dispatch sizes and fills its expert slots per micro-batch too.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.config import Config
from jaxmoe.model.decoder import DecoderOutput
from jaxmoe.train.state import TrainState, split_model

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: [batch, length] int32


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Sum of token cross-entropies (nats) over `mask` and the token count. logits float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * m), jnp.sum(m)


def forward(graphdef, params, rest, batch: Batch) -> DecoderOutput:
    model = nnx.merge(graphdef, params, rest)
    return model(batch["inputs"], batch["segment_ids"], batch["positions"])


def split_micro(batch: Batch, n: int) -> Batch:
    """[batch, ...] -> [n, batch // n, ...]: micro-batch i holds rows i, i + n, i + 2n, ...

    Strided, not consecutive rows: a batch sharded over devices in contiguous row blocks
    then gives every device its own share of every micro-batch, so no input moves between
    devices (consecutive blocks would put micro-batch 0 on the first devices only, and XLA
    would reshuffle the inputs every step). Which rows share a micro-batch does not change
    the dropless sum.
    """
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_grad_fn(graphdef, cfg: Config) -> Callable:
    """(params, rest, batch) -> (grads, stats): gradients of the batch loss, accumulated over
    `cfg.train.grad_accum_steps` micro-batches with `lax.scan`.

    stats: ce_sum (nats), tokens, aux/z (averaged over micro-batches), loads (group ->
    per-block [repeats, experts] summed over micro-batches), dropped.
    """
    m = cfg.model
    accum = cfg.train.grad_accum_steps

    def loss_fn(params, rest, micro: Batch, total_tokens):
        out = forward(graphdef, params, rest, micro)
        ce_sum, _ = cross_entropy_sum(out.logits, micro["targets"], micro["segment_ids"] > 0)
        aux, z = out.aux_losses()
        loss = ce_sum / total_tokens + (m.aux_loss_coef * aux + m.z_loss_coef * z) / accum
        loads = {g: tuple(s.load for s in stats) for g, stats in out.moe.items()}
        return loss, {"ce_sum": ce_sum, "aux_loss": aux / accum, "z_loss": z / accum,
                      "loads": loads, "dropped": out.dropped()}

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate_grads(params, rest, batch: Batch):
        total_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), 1.0)
        micro = split_micro(batch, accum)

        def body(carry, mb):
            g, stats = grad_fn(params, rest, mb, total_tokens)
            return jax.tree.map(jnp.add, carry, (g, stats)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, rest, first, total_tokens)
        # Sums in float32 at least (bfloat16 parameters give bfloat16 gradients, and a
        # bfloat16 running sum rounds at every micro-batch), cast back once at the end.
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _sum_dtype(s.dtype)), shapes)
        (grads, stats), _ = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, shapes[0])
        stats["tokens"] = total_tokens
        return grads, stats

    return accumulate_grads


def _sum_dtype(dtype) -> jnp.dtype:
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
    rate = cfg.model.bias_update_rate
    accumulate_grads = make_grad_fn(graphdef, cfg)

    def train_step(state: TrainState, batch: Batch):
        grads, stats = accumulate_grads(state.params, state.rest, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        if rate > 0:
            model = nnx.merge(graphdef, params, rest)
            model.update_router_biases(stats["loads"], rate)
            _, _, rest = split_model(model)
        metrics = {
            "loss": stats["ce_sum"] / stats["tokens"],
            "aux_loss": stats["aux_loss"],
            "z_loss": stats["z_loss"],
            "grad_norm": optax.tree.norm(grads),
            "tokens": stats["tokens"],
            "dropped": stats["dropped"],
            "load_max_over_mean": _imbalance(stats["loads"]),
        }
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(state.step + 1, params, rest, opt_state, state.rng), metrics

    return train_step


def _imbalance(loads) -> jax.Array:
    leaves = jax.tree.leaves(loads)
    if not leaves:
        return jnp.ones(())
    ratios = [jnp.max(l, axis=-1) / jnp.maximum(jnp.mean(l, axis=-1), 1e-9) for l in leaves]
    return jnp.max(jnp.stack([jnp.max(r) for r in ratios]))


def make_eval_step(graphdef, micro_batches: int = 1) -> Callable:
    """(state, batch) -> {ce_sum, tokens}, the batch run as `micro_batches` forward passes in
    a `lax.scan` (as training does: a batch that only fits split for training would not fit
    whole for evaluation; the logits alone are [batch, length, vocab] float32)."""
    def eval_step(state: TrainState, batch: Batch):
        def body(carry, micro: Batch):
            out = forward(graphdef, state.params, state.rest, micro)
            ce_sum, ntok = cross_entropy_sum(out.logits, micro["targets"],
                                             micro["segment_ids"] > 0)
            return (carry[0] + ce_sum, carry[1] + ntok), None

        zero = jnp.zeros((), jnp.float32)
        (ce_sum, ntok), _ = jax.lax.scan(body, (zero, zero), split_micro(batch, micro_batches))
        return {"ce_sum": ce_sum, "tokens": ntok}

    return eval_step

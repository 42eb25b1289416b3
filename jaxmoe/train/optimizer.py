"""AdamW with warm-up + cosine decay, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

import jax
import optax

from jaxmoe.config import OptimizerConfig

# Parameters named like this are norms or biases: no weight decay.
_NO_DECAY = ("scale", "q_bias", "k_bias", "v_bias")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
    """True for parameters that get weight decay (matrices), False for norms and biases."""
    def leaf(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        if name == "value" and len(path) > 1:  # nnx.State leaves may end in `.value`
            name = getattr(path[-2], "key", getattr(path[-2], "name", str(path[-2])))
        return str(name) not in _NO_DECAY
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)

"""The MoE feed-forward block: router + routed experts (+ shared experts)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import logical as L
from jaxmoe.model.layers import param
from jaxmoe.model.mlp import MLP
from jaxmoe.model.moe.capacity import capacity_moe
from jaxmoe.model.moe.dropless import dropless_moe, expert_ffn
from jaxmoe.model.moe.router import MoEStats, Router, routing_stats
from jaxmoe.model.precision import Precision

# A replacement for the routed-expert computation, installed by a parallelism strategy (the
# `sharding` package's expert parallelism) while a step is traced. Called as
# fn(x [tokens, embed], weights [tokens, k], indices [tokens, k], w_gate, w_up, w_down, *,
#    dispatch: str, capacity_factor: float, token_mask [tokens], ffn: the grouped SwiGLU
#    `expert_ffn(x_sorted [rows, embed], group_sizes [experts], w_gate, w_up, w_down)`)
# -> (y [tokens, embed], dropped: scalar or None). The model itself never names mesh axes.
ExpertDispatch = Callable[..., tuple[jax.Array, "jax.Array | None"]]
_EXPERT_DISPATCH: contextvars.ContextVar[ExpertDispatch | None] = contextvars.ContextVar(
    "expert_dispatch", default=None)


@contextlib.contextmanager
def expert_dispatch(fn: ExpertDispatch | None) -> Iterator[None]:
    """Routes every MoEBlock traced inside this context through `fn` (None: built-in)."""
    token = _EXPERT_DISPATCH.set(fn)
    try:
        yield
    finally:
        _EXPERT_DISPATCH.reset(token)


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, precision: Precision, rngs: nnx.Rngs):
        e, d, f, std = cfg.num_experts, cfg.embed_dim, cfg.expert_mlp_dim, cfg.init_std
        pd = precision.param_dtype
        self.router = Router(d, e, cfg.num_experts_per_tok, scoring=cfg.router_scoring,
                             norm_topk_prob=cfg.norm_topk_prob,
                             routed_scaling_factor=cfg.routed_scaling_factor, std=std,
                             precision=precision, rngs=rngs, n_group=cfg.n_group,
                             topk_group=cfg.topk_group)
        self.w_gate = param(rngs, (e, d, f), (L.EXPERT, L.EMBED, L.MLP), std, pd)
        self.w_up = param(rngs, (e, d, f), (L.EXPERT, L.EMBED, L.MLP), std, pd)
        self.w_down = param(rngs, (e, f, d), (L.EXPERT, L.MLP, L.EMBED), std, pd)
        self.shared = (MLP(d, cfg.resolved_shared_mlp_dim, std, precision, rngs)
                       if cfg.num_shared_experts else None)
        self.shared_gate = (param(rngs, (d, 1), (L.EMBED, None), std, pd)
                            if cfg.num_shared_experts and cfg.shared_expert_gate else None)
        self.num_experts = e
        self.dispatch = cfg.dispatch
        self.gmm_impl = None if cfg.grouped_matmul == "auto" else cfg.grouped_matmul
        self.gmm_block = cfg.gmm_block_size
        self.capacity_factor = cfg.capacity_factor
        self.aux_loss_scope = cfg.aux_loss_scope
        self.precision = precision

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, MoEStats]:
        """x [batch, length, embed], token_mask [batch, length] -> ([batch, length, embed], stats)."""
        b, l, d = x.shape
        c = self.precision.cast
        xt = x.reshape(b * l, d)
        mask = token_mask.reshape(b * l)
        r = self.router(xt)
        w = (c(self.w_gate[...]), c(self.w_up[...]), c(self.w_down[...]))
        override = _EXPERT_DISPATCH.get()
        if override is not None:
            y, dropped = override(xt, r.weights, r.indices, *w, dispatch=self.dispatch,
                                  capacity_factor=self.capacity_factor, token_mask=mask,
                                  ffn=functools.partial(expert_ffn, impl=self.gmm_impl,
                                                        block=self.gmm_block))
        elif self.dispatch == "dropless":
            y = dropless_moe(xt, r.weights, r.indices, *w, self.gmm_impl, self.gmm_block)
            dropped = None
        else:
            y, dropped = capacity_moe(xt, r.weights, r.indices, *w, self.capacity_factor, mask)
        if self.shared is not None:
            s = self.shared(xt)
            if self.shared_gate is not None:
                f = self.precision.output_dtype
                g = jax.nn.sigmoid(jnp.dot(xt.astype(f), self.shared_gate[...].astype(f),
                                            precision=jax.lax.Precision.HIGHEST))
                s = (s.astype(f) * g).astype(s.dtype)
            y = y + s
        y = L.constrain(y.reshape(b, l, d), (L.BATCH, L.LENGTH, L.EMBED))
        sequences = b if self.aux_loss_scope == "sequence" else 1
        return y, routing_stats(r, mask, self.num_experts, dropped, sequences)

"""Top-k router: softmax or sigmoid scoring, selection bias, load-balancing statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.model import logical as L
from jaxmoe.model.layers import param
from jaxmoe.model.precision import Precision


class RouterBias(nnx.Variable):
    """DeepSeek-V3 aux-loss-free balancing bias [expert]: used only to *select* experts,
    never to weight them, and updated from measured load outside the gradient."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """Routing decision for `tokens` flattened tokens.

    weights [tokens, k] float32 (combine weights), indices [tokens, k] int32 (expert ids),
    probs [tokens, experts] float32 (scores; softmax or sigmoid), logits [tokens, experts].
    """

    weights: jax.Array
    indices: jax.Array
    probs: jax.Array
    logits: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    """Per-MoE-layer statistics returned as data (summed/stacked by the decoder).

    aux_loss: Switch load-balancing loss; z_loss: router z-loss; load [experts]: tokens
    assigned to each expert (valid tokens only); dropped: assignments dropped for capacity.
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    load: jax.Array
    dropped: jax.Array


class Router(nnx.Module):
    def __init__(self, embed_dim: int, num_experts: int, top_k: int, *, scoring: str,
                 norm_topk_prob: bool, routed_scaling_factor: float, std: float,
                 precision: Precision, rngs: nnx.Rngs, n_group: int = 1, topk_group: int = 1):
        self.kernel = param(rngs, (embed_dim, num_experts), (L.EMBED, L.EXPERT), std,
                            precision.param_dtype)
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), out_sharding=(L.EXPERT,))
        self.top_k = top_k
        self.scoring = scoring
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.output_dtype = precision.output_dtype
        self.n_group, self.topk_group = n_group, topk_group

    def __call__(self, x: jax.Array) -> Routing:
        """x [tokens, embed] -> Routing. Logits and scores in float32."""
        f = self.output_dtype
        # HIGHEST: at default precision TPUs (and TF32 on GPUs) round float32 operands to
        # bfloat16-like precision, and near-ties in the top-k would then flip.
        logits = jnp.einsum("td,de->te", x.astype(f), self.kernel[...].astype(f),
                            precision=jax.lax.Precision.HIGHEST)
        if self.scoring == "softmax":
            probs = jax.nn.softmax(logits, axis=-1)
        else:
            probs = jax.nn.sigmoid(logits)
        selection = probs + jax.lax.stop_gradient(self.bias[...]).astype(probs.dtype)
        if self.n_group > 1:
            selection = limit_to_top_groups(selection, self.n_group, self.topk_group)
        _, indices = jax.lax.top_k(selection, self.top_k)
        weights = jnp.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return Routing(weights, indices.astype(jnp.int32), probs, logits)


def limit_to_top_groups(selection: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """DeepSeek-V3 group-limited routing: selection [tokens, experts] with every expert outside
    the token's `topk_group` best groups set to -inf. Experts form `n_group` contiguous groups;
    a group's score is the sum of its two best selection scores."""
    t, e = selection.shape
    grouped = selection.reshape(t, n_group, e // n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [tokens, groups]
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.any(top_groups[:, :, None] == jnp.arange(n_group)[None, None], axis=1)
    keep = jnp.repeat(keep, e // n_group, axis=1)  # [tokens, experts]
    return jnp.where(keep, selection, -jnp.inf)


def routing_stats(r: Routing, token_mask: jax.Array, num_experts: int,
                  dropped: jax.Array | None = None, sequences: int = 1) -> MoEStats:
    """Switch aux loss E * sum_e f_e * P_e, z-loss mean(logsumexp(logits)^2), and loads.

    token_mask [tokens] excludes padding. f_e is the fraction of the top-k assignments that go
    to expert e; P_e is the mean (normalised) router score of expert e. Uniform routing gives 1.
    With `sequences` > 1 the tokens are that many equal sequences (batch rows): the aux loss
    is taken per sequence and averaged over the sequences holding a token (DeepSeek-V3's
    sequence-wise balance loss); loads and z-loss stay over all tokens. f_e counts the experts
    actually chosen (selection bias and group limit included, as Megatron's sequence-wise
    loss does); the paper's equation counts the top-k of the unbiased scores.
    (transformers' Mixtral `load_balancing_loss_func` counts f_e over tokens, not assignments:
    k times this value for one layer; it pools the statistics of all layers before
    multiplying, where jaxmoe averages the per-layer losses. DeepSeek-V3's balance loss uses
    this normalisation.)
    """
    m = token_mask.astype(r.probs.dtype)
    n = jnp.maximum(jnp.sum(m), 1.0)
    k = r.indices.shape[-1]
    assign = jax.nn.one_hot(r.indices, num_experts, dtype=r.probs.dtype).sum(axis=1)  # [t, e]
    load = jnp.sum(assign * m[:, None], axis=0)  # [e]
    p = r.probs / jnp.sum(r.probs, axis=-1, keepdims=True)  # sigmoid scores are normalised
    ms = m.reshape(sequences, -1, 1)  # [sequences, tokens per sequence, 1]
    n_seq = jnp.sum(ms, axis=1)  # [sequences, 1]
    f = jnp.sum(assign.reshape(sequences, -1, num_experts) * ms, axis=1) / (
        jnp.maximum(n_seq, 1.0) * k)  # [sequences, experts]
    big_p = jnp.sum(p.reshape(sequences, -1, num_experts) * ms, axis=1) / jnp.maximum(n_seq, 1.0)
    per_seq = num_experts * jnp.sum(f * big_p, axis=-1)  # [sequences]
    has_tokens = (n_seq[:, 0] > 0).astype(per_seq.dtype)
    aux = jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    z = jnp.sum(jax.nn.logsumexp(r.logits, axis=-1) ** 2 * m) / n
    if dropped is None:
        dropped = jnp.zeros((), r.probs.dtype)
    return MoEStats(aux, z, load, dropped.astype(r.probs.dtype))

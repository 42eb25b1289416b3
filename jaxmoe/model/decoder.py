"""The decoder: layer groups of scanned, rematerialised transformer blocks.

Layers are organised in *groups*. A group repeats one *unit* (a short pattern of dense/MoE
blocks) `repeats` times; its parameters are stacked on a leading `layers` axis and the group
runs as one `lax.scan`, so compile time does not grow with depth. DeepSeek-style models get a
dense group (the first k layers) and an MoE group; interleaved models (`moe_every=n`) repeat a
unit of n-1 dense blocks and one MoE block. Each group is the natural place for its own remat
policy and sharding rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import attention, mla
from jaxmoe.model import logical as L
from jaxmoe.model.attention import Attention
from jaxmoe.model.layers import Embedder, RMSNorm, Rotary, param
from jaxmoe.model.matmul import einsum
from jaxmoe.model.mla import MLAttention
from jaxmoe.model.mlp import MLP
from jaxmoe.model.moe import MoEBlock, MoEStats
from jaxmoe.model.precision import Precision

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def rotary(cfg: ModelConfig, positions: jax.Array) -> Rotary:
    """The rotary tables of the configured attention for positions [batch, length]."""
    return (mla.rotary if cfg.attention == "mla" else attention.rotary)(cfg, positions)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    name: str
    pattern: tuple[bool, ...]  # is_moe for each block of the repeating unit
    repeats: int


def layer_groups(cfg: ModelConfig) -> list[GroupSpec]:
    """The groups for `cfg`; layer i is MoE exactly when `cfg.is_moe_layer(i)`."""
    if cfg.num_experts == 0:
        return [GroupSpec("dense", (False,), cfg.num_layers)]
    groups = []
    if cfg.first_k_dense:
        groups.append(GroupSpec("dense", (False,), cfg.first_k_dense))
    unit = (False,) * (cfg.moe_every - 1) + (True,)
    repeats = (cfg.num_layers - cfg.first_k_dense) // cfg.moe_every
    if repeats:
        groups.append(GroupSpec("moe", unit, repeats))
    return groups


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is MLP or MoE."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, precision: Precision, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, precision)
        self.attn = (MLAttention(cfg, precision, rngs) if cfg.attention == "mla"
                     else Attention(cfg, precision, rngs))
        self.ffn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, precision)
        self.ffn = (MoEBlock(cfg, precision, rngs) if is_moe
                    else MLP(cfg.embed_dim, cfg.mlp_dim, cfg.init_std, precision, rngs))
        self.is_moe = is_moe

    def __call__(self, x, segment_ids, rope: Rotary, token_mask):
        x = x + self.attn(self.attn_norm(x), segment_ids, rope)
        h = self.ffn_norm(x)
        stats = None
        if self.is_moe:
            h, stats = self.ffn(h, token_mask)
        else:
            h = self.ffn(h)
        x = L.constrain(x + h, (L.BATCH, L.LENGTH, L.EMBED))
        return x, stats


class Unit(nnx.Module):
    """One repetition of a group's pattern (blocks named block0, block1, ...)."""

    def __init__(self, cfg: ModelConfig, pattern: tuple[bool, ...], precision: Precision,
                 rngs: nnx.Rngs):
        self.size = len(pattern)
        for i, is_moe in enumerate(pattern):
            setattr(self, f"block{i}", DecoderBlock(cfg, is_moe, precision, rngs))

    def blocks(self) -> list[DecoderBlock]:
        return [getattr(self, f"block{i}") for i in range(self.size)]

    def __call__(self, x, segment_ids, rope: Rotary, token_mask):
        all_stats = []
        for block in self.blocks():
            x, stats = block(x, segment_ids, rope, token_mask)
            if stats is not None:
                all_stats.append(stats)
        return x, tuple(all_stats)


class LayerGroup(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: GroupSpec, precision: Precision, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=spec.repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: L.LAYERS})
        def create(rngs: nnx.Rngs) -> Unit:
            return Unit(cfg, spec.pattern, precision, rngs)

        self.units = create(rngs)
        self.spec = spec
        self.remat = cfg.remat
        self.scan = cfg.scan_layers

    def __call__(self, x, segment_ids, rope: Rotary, token_mask):
        """x [batch, length, embed] -> (x, stats: tuple of MoEStats stacked on [repeats])."""
        graphdef, state = nnx.split(self.units)

        def body(x, unit_state):
            unit = nnx.merge(graphdef, unit_state)
            return unit(x, segment_ids, rope, token_mask)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat])
        if self.scan:
            return jax.lax.scan(body, x, state)
        outs = []
        for i in range(self.spec.repeats):
            x, stats = body(x, jax.tree.map(lambda a: a[i], state))
            outs.append(stats)
        return x, jax.tree.map(lambda *s: jnp.stack(s), *outs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderOutput:
    """logits [batch, length, vocab] float32; moe: group name -> tuple of MoEStats whose
    fields carry a leading [repeats] axis (one entry per MoE block of the group's unit)."""

    logits: jax.Array
    moe: dict[str, tuple[MoEStats, ...]]

    def aux_losses(self) -> tuple[jax.Array, jax.Array]:
        """(load-balancing loss, z-loss), each averaged over MoE layers (0 for dense models)."""
        stats = [s for group in self.moe.values() for s in group]
        if not stats:
            return jnp.zeros(()), jnp.zeros(())
        n = sum(s.aux_loss.shape[0] for s in stats)
        aux = sum(jnp.sum(s.aux_loss) for s in stats) / n
        z = sum(jnp.sum(s.z_loss) for s in stats) / n
        return aux, z

    def dropped(self) -> jax.Array:
        return sum((jnp.sum(s.dropped) for g in self.moe.values() for s in g), jnp.zeros(()))


class MoETransformer(nnx.Module):
    """Decoder-only (MoE) transformer."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        precision = Precision.from_names(cfg.param_dtype, cfg.compute_dtype)
        self.cfg = cfg
        self.precision = precision
        self.embedder = Embedder(cfg.vocab_size, cfg.embed_dim, cfg.init_std, precision, rngs)
        self.group_names = tuple(spec.name for spec in layer_groups(cfg))
        for spec in layer_groups(cfg):
            setattr(self, spec.name, LayerGroup(cfg, spec, precision, rngs))
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, precision)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.embed_dim, cfg.vocab_size), (L.EMBED, L.VOCAB),
                                 cfg.init_std, precision.param_dtype)

    def groups(self) -> list[LayerGroup]:
        return [getattr(self, name) for name in self.group_names]

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 prefix_embeddings: jax.Array | None = None) -> DecoderOutput:
        """tokens [batch, length]; segment_ids/positions [batch, prefix + length].

        `prefix_embeddings` [batch, prefix, embed] (e.g. from modality encoders) are placed
        before the token embeddings; logits cover the whole sequence.
        """
        x = self.embedder(tokens)
        if prefix_embeddings is not None:
            x = jnp.concatenate([prefix_embeddings.astype(x.dtype), x], axis=1)
        if segment_ids.shape != x.shape[:2] or positions.shape != x.shape[:2]:
            raise ValueError(f"segment_ids {segment_ids.shape} and positions {positions.shape}: "
                             f"expected {x.shape[:2]} (prefix + tokens)")
        token_mask = segment_ids > 0
        rope = rotary(self.cfg, positions)  # once per forward, read by every layer
        moe = {}
        for name, group in zip(self.group_names, self.groups()):
            x, stats = group(x, segment_ids, rope, token_mask)
            moe[name] = stats
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = self.embedder.attend(x)
        else:
            logits = einsum("ble,ev->blv", x, self.precision.cast(self.lm_head[...]),
                            out_dtype=jnp.float32)
        logits = L.constrain(logits, (L.BATCH, L.LENGTH, L.VOCAB))
        return DecoderOutput(logits, moe)

    def update_router_biases(self, loads: dict[str, tuple[jax.Array, ...]], rate: float) -> None:
        """DeepSeek-V3 aux-free balancing: bias += rate * sign(mean load - load), per layer.

        `loads` maps group name -> one [repeats, experts] array per MoE block of the unit
        (the `.load` fields of `DecoderOutput.moe`, possibly summed over micro-batches)."""
        for name, group in zip(self.group_names, self.groups()):
            moe_blocks = [b for b in group.units.blocks() if b.is_moe]
            for block, load in zip(moe_blocks, loads.get(name, ())):
                delta = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
                block.ffn.router.bias[...] = block.ffn.router.bias[...] + rate * delta

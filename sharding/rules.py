"""The one place where logical axis names meet mesh axis names.

Rules are (logical name, mesh axes) pairs in order of precedence (Flax's convention): each
dimension takes the first rule whose mesh axes are still free in that array, so an
activation `[batch, length, embed]` gives `fsdp` to `batch` and leaves `embed` whole, while a
weight `[embed, mlp]` gets FSDP on `embed` and tensor parallelism on `mlp`.

The defaults: batch over data x fsdp x expert (expert devices each bring their own tokens);
Megatron tensor parallelism over `tensor`: column-parallel q/k/v [embed, heads, head_dim]
and gate/up [embed, mlp], row-parallel o [heads, head_dim, embed] and down [mlp, embed],
heads and vocab split; experts over `expert`; the `embed` dimension of every weight over
fsdp x expert (FSDP; expert weights: fsdp only). `mesh.rules` in a config overrides single
names (`mesh.rules={embed: [fsdp, data]}` replaces both embed rules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Outer to inner: the last axis gets the nearest devices (mesh_utils), so `tensor`, whose
# all-reduces sit on every layer's critical path, is innermost. A pipeline `stage` axis
# belongs after `data`.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    # FSDP: weights split their embed dimension over fsdp and expert together (the expert
    # devices hold distinct tokens, so they are data-parallel for every non-expert weight);
    # expert weights, whose expert dimension already took `expert`, fall to the next rule.
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("q_lora", None),  # MLA latent widths: small, kept whole
    ("kv_lora", None),
)


def make_rules(overrides: dict[str, Any] | None = None) -> Rules:
    """DEFAULT_RULES with single logical names re-mapped (`mesh.rules` in the config).

    An override replaces every default rule of that logical name, in the place of the first
    one; lists become tuples."""
    overrides = overrides or {}
    for name, value in overrides.items():
        axes = value if isinstance(value, (list, tuple)) else [value]
        for a in axes:
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"mesh.rules.{name}={value!r}: expected mesh axes among "
                                 f"{', '.join(MESH_AXES)} or null")
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh.rules.{name}={value!r}: expected each mesh axis once")
    # Each override takes the place of the first default rule of its name: precedence
    # between names stays as in the defaults (put first, an `embed` override would take
    # its mesh axes from `batch` in every [batch, length, embed] activation).
    rules, placed = [], set()
    for n, a in DEFAULT_RULES:
        if n not in overrides:
            rules.append((n, a))
        elif n not in placed:
            v = overrides[n]
            rules.append((n, tuple(v) if isinstance(v, list) else v))
            placed.add(n)
    rules += [(n, tuple(v) if isinstance(v, list) else v)
              for n, v in overrides.items() if n not in placed]
    return tuple(rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have the logical `names`."""
    return spmd.logical_to_mesh_axes(tuple(names), rules)


def mesh_axes_of(name: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a lone logical dimension `name` maps to (empty when replicated)."""
    axes = logical_to_spec((name,), rules)[0]
    if axes is None:
        return ()
    return axes if isinstance(axes, tuple) else (axes,)


def variable_axes(v: Any) -> tuple[str | None, ...] | None:
    """The logical axis names an `nnx.Variable` carries (None when it has none)."""
    meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree holding `nnx.Variable`s (params, optimizer state, ...).

    Each Variable is sharded by its logical axis names; everything else (step counters, RNG
    keys, scalars) is replicated. The result is a pytree prefix usable as jit in/out shardings.
    """
    def one(leaf):
        axes = variable_axes(leaf) if isinstance(leaf, nnx.Variable) else None
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(tuple(axes), rules))
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a `[batch, length]` input array."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def check_overrides(tree: Any, mesh: Mesh, rules: Rules, overrides: dict[str, Any] | None,
                    error: type[Exception] = ValueError) -> None:
    """Refuses a `mesh.rules` override that cannot take effect on the parameters.

    A rule applies to a dimension only when all its mesh axes are still free in that array,
    earlier rules first (Flax's convention), and an override replaces the defaults'
    fallbacks. So `embed: [fsdp, tensor]` gave the embed dimension of every weight whose
    heads or mlp dimension took `tensor` no axis at all: those weights were replicated over
    fsdp, with no word. Raises `error` (one line, naming the largest weight and the
    dimension in the way) when an override leaves a weight replicated over a mesh axis of
    size > 1 that it asked for, or applies to no parameter dimension of its name at all
    (`layers: fsdp`: every weight's embed dimension takes fsdp first).
    """
    overrides = overrides or {}
    worst = None  # (bytes, message): a weight left replicated over an axis it asked for
    seen: dict[str, tuple[int, str]] = {}  # name -> (bytes, message) of a dim it missed
    applied: set[str] = set()  # overridden names that some dimension took
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = variable_axes(leaf) if isinstance(leaf, nnx.Variable) else None
        if not axes:
            continue
        spec = tuple(logical_to_spec(tuple(axes), rules))
        spec += (None,) * (len(axes) - len(spec))
        used = {a for s in spec if s for a in (s if isinstance(s, tuple) else (s,))}
        for name, got in zip(axes, spec):
            if name not in overrides:
                continue
            value = overrides[name]
            asked = tuple(a for a in (value if isinstance(value, (list, tuple)) else [value])
                          if a is not None)
            if got is not None or not asked:
                applied.add(name)
                continue
            if math.prod(mesh.shape[a] for a in asked) < 2:
                continue  # asks for nothing that splits
            taken = [a for a in asked if a in used]
            free = [a for a in asked if a not in taken]
            by = sorted({n for n, g in zip(axes, spec) if g and set(
                g if isinstance(g, tuple) else (g,)) & set(taken)})
            nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
            where = jax.tree_util.keystr(path, simple=True, separator=".")
            message = (f"mesh.rules.{name}={value!r}: leaves the {name} dimension of {where} "
                       f"{list(axes)} ({nbytes / 1e6:,.1f} MB) unsplit: its {', '.join(by)} "
                       f"dimension already uses {', '.join(taken)} (a rule applies only where "
                       "all its mesh axes are free, earlier rules first); expected axes the "
                       "other dimensions leave free" + (f", e.g. {name}: {free}" if free else
                                                        f", or {', '.join(by)} on other axes"))
            if math.prod(mesh.shape[a] for a in free) >= 2:  # replicated over a free axis
                if worst is None or nbytes > worst[0]:
                    worst = (nbytes, message)
            elif nbytes > seen.get(name, (-1, ""))[0]:
                seen[name] = (nbytes, message)
    if worst is not None:
        raise error(worst[1])
    for name, (_, message) in sorted(seen.items()):
        if name not in applied:  # the override changed nothing anywhere
            raise error(message)

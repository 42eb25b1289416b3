"""Device meshes from the config's `mesh:` section, validated before anything compiles.

A mesh has the named axes `MESH_AXES` (data, fsdp, expert, tensor; `tensor` last so that
it gets the nearest devices, which carry its per-layer all-reduces). Degrees in the config
are per slice (ICI); `dcn_<axis>` degrees multiply an axis across slices or hosts (DCN), and
such meshes are built with `mesh_utils.create_hybrid_device_mesh`, so that a DCN step of
an axis always crosses a slice (or process) boundary and ICI steps never do.

Every impossible layout is refused here with one line naming the numbers: the device count,
experts vs the expert axis, heads / kv-heads / MLP widths / vocab vs the tensor axis, and the
global batch vs the axes that shard it; then (`check_params_divide`) every parameter dimension
vs the mesh axes its logical name maps to, whatever `mesh.rules` moved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from sharding.rules import MESH_AXES, Rules, logical_to_spec, variable_axes


class MeshError(ValueError):
    """The requested mesh does not fit the devices or the model."""


def mesh_shape(degrees: dict[str, int], num_devices: int,
               per_slice: str = "") -> dict[str, int]:
    """Resolves one -1 degree so that the product equals `num_devices`. `per_slice` (e.g.
    " per slice") qualifies the device count in messages when DCN degrees split the devices."""
    fixed = math.prod(v for v in degrees.values() if v != -1)
    shape = dict(degrees)
    for axis, v in degrees.items():
        if v == -1:
            if num_devices % fixed:
                raise MeshError(f"mesh: {num_devices} devices{per_slice} are not divisible by "
                                f"the fixed degrees "
                                f"{({a: d for a, d in degrees.items() if d != -1})} "
                                f"(product {fixed}) to fill mesh.{axis}=-1")
            shape[axis] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise MeshError(f"mesh {shape}: product {math.prod(shape.values())} != "
                        f"{num_devices} devices{per_slice}")
    return shape


def config_degrees(mesh_cfg: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI degrees, DCN degrees) per mesh axis from a `MeshConfig` (missing ones are 1)."""
    fields = {f.name for f in dataclasses.fields(mesh_cfg)}
    ici = {a: getattr(mesh_cfg, a) if a in fields else 1 for a in MESH_AXES}
    dcn = {a: getattr(mesh_cfg, f"dcn_{a}") if f"dcn_{a}" in fields else 1 for a in MESH_AXES}
    for a, v in dcn.items():
        if v < 1:
            raise MeshError(f"mesh.dcn_{a}={v}: expected a positive integer")
    return ici, dcn


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
    """(number of DCN granules, whether they are processes rather than slices)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return len(slices), False
    return len({d.process_index for d in devices}), True


def _device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged as `shape`; on TPU along the physical torus (mesh_utils)."""
    if devices[0].platform == "tpu" or getattr(devices[0], "coords", None) is not None:
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # odd sub-slices: plain order is still a valid (if slower) mesh
    return np.asarray(devices).reshape(shape)


def make_mesh(degrees: dict[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: dict[str, int] | None = None) -> Mesh:
    """A Mesh with axes `MESH_AXES`. `degrees` are per-slice (one may be -1); `dcn` degrees
    (default 1) multiply axes across slices/processes. Final axis size = ici * dcn."""
    for what, given in (("degrees", degrees), ("dcn", dcn or {})):
        unknown = sorted(set(given) - set(MESH_AXES))
        if unknown:  # a misspelt axis would silently get size 1
            raise MeshError(f"mesh {what} {dict(given)}: unknown axis {unknown[0]!r}; "
                            f"expected axes among {', '.join(MESH_AXES)}")
    devices = list(devices if devices is not None else jax.devices())
    dcn = {a: (dcn or {}).get(a, 1) for a in MESH_AXES}
    n_dcn = math.prod(dcn.values())
    if len(devices) % n_dcn:
        raise MeshError(f"mesh: {len(devices)} devices are not divisible by the DCN degrees "
                        f"{ {a: v for a, v in dcn.items() if v > 1} } (product {n_dcn})")
    granules, by_process = _granules(devices)
    if n_dcn == 1 and granules > 1 and not by_process:
        # A flat mesh would put ICI steps of some axis across slices (DCN).
        raise MeshError(f"mesh: the {len(devices)} devices are in {granules} slices but no "
                        f"DCN degree is set; expected mesh.dcn_data/dcn_fsdp with product "
                        f"{granules}")
    if n_dcn > 1 and granules != n_dcn:
        shown = {f"mesh.dcn_{a}": v for a, v in dcn.items() if v > 1}
        if by_process and granules == 1:
            where = "but the devices are one slice in one process (nothing to cross over DCN)"
        else:
            where = f"but the devices are in {granules} {'processes' if by_process else 'slices'}"
        raise MeshError(f"mesh: DCN degrees {shown} (product {n_dcn}) {where}; expected a "
                        f"product of {granules}")
    per = (f" per {'process' if by_process else 'slice'} ({len(devices)} devices / DCN "
           f"product {n_dcn})" if n_dcn > 1 else "")
    ici = mesh_shape({a: degrees.get(a, 1) for a in MESH_AXES}, len(devices) // n_dcn, per)
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    if n_dcn == 1:
        return Mesh(_device_grid(ici_shape, devices), MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(
        ici_shape, tuple(dcn[a] for a in MESH_AXES), devices,
        process_is_granule=by_process, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def _axes_size(mesh_sizes: dict[str, int], axes: Any) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh_sizes[a] for a in axes)


def check_model_fits(mesh_sizes: dict[str, int], rules: Rules, model: Any,
                     batch_size: int, grad_accum_steps: int = 1) -> None:
    """Raises MeshError (one line) when the model or batch cannot be split over the mesh.

    `mesh_sizes` maps mesh axis -> size; sizes of the axes that each logical name maps to
    come from `rules`, so an overridden rule is checked as it will be used.
    """
    def size(name: str) -> tuple[int, str]:
        axes = logical_to_spec((name,), rules)[0]
        n = _axes_size(mesh_sizes, axes)
        names = axes if isinstance(axes, tuple) else (axes,)
        shown = "*".join(f"mesh.{a}" for a in names) if axes is not None else "1"
        return n, shown

    n_exp, exp_axes = size("expert")
    if model.num_experts == 0 and n_exp > 1:
        raise MeshError(f"{exp_axes}={n_exp}: expert parallelism needs an MoE model "
                        f"(model.num_experts=0)")
    if model.num_experts % n_exp:
        raise MeshError(f"model.num_experts={model.num_experts} is not divisible by the "
                        f"expert axis {exp_axes}={n_exp}")
    checks = [("heads", "model.num_heads", model.num_heads),
              ("vocab", "model.vocab_size", model.vocab_size),
              ("embed", "model.embed_dim", model.embed_dim)]
    if any(not model.is_moe_layer(i) for i in range(model.num_layers)):
        # Only dense layers have weights of width mlp_dim (an all-MoE model has none).
        checks.insert(1, ("mlp", "model.mlp_dim", model.mlp_dim))
    if getattr(model, "attention", "gqa") != "mla":  # MLA has no separate kv heads
        checks.append(("kv_heads", "model.num_kv_heads", model.num_kv_heads))
    if model.num_experts:
        checks.append(("mlp", "model.expert_mlp_dim", model.expert_mlp_dim))
        if model.resolved_shared_mlp_dim:
            checks.append(("mlp", "shared expert width", model.resolved_shared_mlp_dim))
    for logical, key, value in checks:
        n, axes = size(logical)
        if value % n:
            raise MeshError(f"{key}={value} is not divisible by {axes}={n} "
                            f"(the mesh axes sharding logical axis {logical!r})")
    n_batch, batch_axes = size("batch")
    micro = batch_size // max(grad_accum_steps, 1)
    if micro % n_batch:
        what = (f"train.batch_size={batch_size}" if grad_accum_steps == 1 else
                f"the micro-batch train.batch_size/grad_accum_steps={micro}")
        raise MeshError(f"{what} is not divisible by the batch axes {batch_axes}="
                        f"{n_batch} (each device needs whole sequences)")


def check_params_divide(tree: Any, mesh_sizes: dict[str, int], rules: Rules) -> None:
    """Raises MeshError (one line) for the first parameter of `tree` (a pytree of
    `nnx.Variable`s, e.g. an abstract state's params) with a dimension that the product of
    the mesh axes sharding it (under `rules`) does not divide.

    `check_model_fits` checks the model widths behind the default rules by name, with
    friendlier messages; this catches the rest, whatever `mesh.rules` maps where (e.g.
    `layers: [data]` over more devices than layers), which jax would otherwise refuse with an
    IndivisibleError traceback only when the state is first laid out."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = variable_axes(leaf) if isinstance(leaf, nnx.Variable) else None
        if not names:
            continue  # replicated (state_shardings gives it PartitionSpec())
        spec = tuple(logical_to_spec(tuple(names), rules))
        spec += (None,) * (len(names) - len(spec))
        for dim, (name, axes, length) in enumerate(zip(names, spec, leaf.shape)):
            n = _axes_size(mesh_sizes, axes)
            if length % n:
                shown = "*".join(f"mesh.{a}" for a in (axes if isinstance(axes, tuple)
                                                        else (axes,)))
                where = jax.tree_util.keystr(path, simple=True, separator=".")
                raise MeshError(f"parameter {where} of shape {tuple(leaf.shape)}: dimension "
                                f"{dim} (logical axis {name!r}, size {length}) is not divisible "
                                f"by {shown}={n}, the mesh axes sharding it; expected mesh "
                                f"axes on {name!r} (mesh.rules) whose sizes divide {length}")


def mesh_from_config(cfg: Any, rules: Rules,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds and validates the mesh of a full `Config` (mesh, model and train sections)."""
    ici, dcn = config_degrees(cfg.mesh)
    mesh = make_mesh(ici, devices, dcn)
    check_model_fits(dict(mesh.shape), rules, cfg.model, cfg.train.batch_size,
                     cfg.train.grad_accum_steps)
    return mesh

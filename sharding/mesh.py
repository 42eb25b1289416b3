"""Device meshes from the config's `mesh:` section."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.rules import MESH_AXES


class MeshError(ValueError):
    """The requested mesh does not fit the devices or the model."""


def mesh_shape(degrees: dict[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 degree so that the product equals `num_devices`."""
    fixed = math.prod(v for v in degrees.values() if v != -1)
    shape = dict(degrees)
    for axis, v in degrees.items():
        if v == -1:
            if num_devices % fixed:
                raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed "
                                f"degrees {({a: d for a, d in degrees.items() if d != -1})} "
                                f"(product {fixed}) to fill mesh.{axis}=-1")
            shape[axis] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise MeshError(f"mesh {shape}: product {math.prod(shape.values())} != "
                        f"{num_devices} devices")
    return shape


def make_mesh(degrees: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, expert) from `degrees` (one may be -1)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: degrees.get(a, 1) for a in MESH_AXES}, len(devices))
    arr = np.asarray(devices).reshape(tuple(shape[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)

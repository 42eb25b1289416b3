"""Meshes, logical-axis rules and parallelism strategies (the only package naming mesh axes)."""

from sharding.mesh import MeshError, make_mesh, mesh_shape
from sharding.rules import DEFAULT_RULES, MESH_AXES, batch_sharding, make_rules, state_shardings

__all__ = ["DEFAULT_RULES", "MESH_AXES", "MeshError", "batch_sharding", "make_mesh",
           "make_rules", "mesh_shape", "state_shardings"]

"""Meshes, logical-axis rules and parallelism strategies (the only package naming mesh axes)."""

from sharding.expert_parallel import make_expert_dispatch
from sharding.mesh import (
                           MeshError,
                           check_model_fits,
                           check_params_divide,
                           config_degrees,
                           make_mesh,
                           mesh_from_config,
                           mesh_shape,
)
from sharding.multihost import MultiHostError, batch_rows
from sharding.rules import (
                           DEFAULT_RULES,
                           MESH_AXES,
                           batch_sharding,
                           check_overrides,
                           logical_to_spec,
                           make_rules,
                           mesh_axes_of,
                           state_shardings,
)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "MeshError", "MultiHostError", "batch_rows",
           "batch_sharding", "check_model_fits", "check_overrides", "check_params_divide",
           "config_degrees", "logical_to_spec", "make_expert_dispatch", "make_mesh",
           "make_rules", "mesh_axes_of", "mesh_from_config", "mesh_shape", "state_shardings"]

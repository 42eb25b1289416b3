"""Mesh construction and validation: every impossible layout is one line naming the numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import sharding
from sharding.expert_parallel import make_expert_dispatch
from tests.sharding._helpers import tiny_config


def build(*overrides: str):
    cfg = tiny_config(*overrides)
    rules = sharding.make_rules(cfg.mesh.rules)
    mesh = sharding.mesh_from_config(cfg, rules, jax.devices())
    make_expert_dispatch(mesh, rules, cfg.mesh.expert_all_to_all, cfg.mesh.expert_buffer_factor)
    return mesh


@pytest.mark.parametrize("overrides, expected", [
    (["mesh.data=3"], "product 3 != 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=3"], "8 devices are not divisible by the fixed degrees"),
    (["mesh.data=1", "mesh.expert=8"],
     "model.num_experts=4 is not divisible by the expert axis mesh.expert=8"),
    (["mesh.data=1", "mesh.tensor=8"], "model.num_heads=4 is not divisible by mesh.tensor=8"),
    (["mesh.data=2", "mesh.tensor=4", "model.num_kv_heads=2"],
     "model.num_kv_heads=2 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.mlp_dim=510"],
     "model.mlp_dim=510 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.expert_mlp_dim=254"],
     "model.expert_mlp_dim=254 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.vocab_size=514"],
     "model.vocab_size=514 is not divisible by mesh.tensor=4"),
    (["mesh.data=1", "mesh.fsdp=8", "model.embed_dim=132"],
     "model.embed_dim=132 is not divisible by mesh.fsdp*mesh.expert=8"),
    (["mesh.data=8", "train.batch_size=12"],
     "train.batch_size=12 is not divisible by the batch axes mesh.data*mesh.fsdp*mesh.expert=8"),
    (["mesh.data=2", "mesh.expert=4", "train.batch_size=16", "train.grad_accum_steps=4"],
     ("micro-batch train.batch_size/grad_accum_steps=4 is not divisible by the batch axes "
      "mesh.data*mesh.fsdp*mesh.expert=8")),
    (["mesh.data=4", "mesh.dcn_data=2"], "!= 1 processes holding the devices"),
    (["mesh.data=1", "mesh.expert=8", "model.num_experts=0"],
     "expert parallelism needs an MoE model"),
    (["mesh.data=2", "mesh.expert=4", "mesh.rules={batch: [data]}"],
     "expert axes ('expert',) must also shard 'batch'"),
])
def test_bad_mesh_one_line(overrides, expected):
    with pytest.raises(sharding.MeshError) as e:
        build(*overrides)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize("overrides, shape", [
    (["mesh.data=-1"], {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}),
    (["mesh.data=-1", "mesh.expert=4"], {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}),
    (["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"],
     {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}),
])
def test_good_mesh_shapes(overrides, shape):
    assert dict(build(*overrides).shape) == shape


def test_bad_mesh_through_cli_exits_2(capsys):
    from jaxmoe.cli import main

    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", "/tmp/unused",
               "mesh.data=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("jaxmoe: mesh error: mesh") and "\n" not in err, err


def test_hybrid_mesh_keeps_dcn_steps_across_slices():
    """2 slices of v5p 2x2x1 (compile-only devices): data crosses slices, fsdp stays inside."""
    from sharding import aot

    devices = aot.topology_devices(aot.target_from_name("v5p:2x2x1", num_slices=2))
    assert devices is not None and len(devices) == 8, "libtpu must be installed (pip: libtpu)"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4}, devices, dcn={"data": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    with pytest.raises(sharding.MeshError, match="DCN degrees"):
        sharding.make_mesh({"data": 1, "fsdp": 2}, devices, dcn={"data": 4})

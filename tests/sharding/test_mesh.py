"""Mesh construction and validation: every impossible layout is one line naming the numbers."""

from __future__ import annotations

import re

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
    # mlp_dim is the width of the dense layers' MLP: checked when some layer is dense
    (["mesh.data=2", "mesh.tensor=4", "model.mlp_dim=510", "model.first_k_dense=1"],
     "model.mlp_dim=510 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.mlp_dim=510", "model.moe_every=2"],
     "model.mlp_dim=510 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.expert_mlp_dim=254"],
     "model.expert_mlp_dim=254 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.num_shared_experts=1",
      "model.shared_expert_mlp_dim=250"],
     "shared expert width=250 is not divisible by mesh.tensor=4"),
    (["mesh.data=2", "mesh.tensor=4", "model.vocab_size=514"],
     "model.vocab_size=514 is not divisible by mesh.tensor=4"),
    (["mesh.data=1", "mesh.fsdp=8", "model.embed_dim=132"],
     "model.embed_dim=132 is not divisible by mesh.fsdp*mesh.expert=8"),
    (["mesh.data=8", "train.batch_size=12"],
     "train.batch_size=12 is not divisible by the batch axes mesh.data*mesh.fsdp*mesh.expert=8"),
    (["mesh.data=2", "mesh.expert=4", "train.batch_size=16", "train.grad_accum_steps=4"],
     ("micro-batch train.batch_size/grad_accum_steps=4 is not divisible by the batch axes "
      "mesh.data*mesh.fsdp*mesh.expert=8")),
    (["mesh.data=4", "mesh.dcn_data=2"],
     "DCN degrees {'mesh.dcn_data': 2} (product 2) but the devices are one slice in one "
     "process"),
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


def test_make_mesh_refuses_unknown_axes():
    """A misspelt axis got size 1 without a word."""
    with pytest.raises(sharding.MeshError, match=r"^mesh degrees \{'data': -1, 'tensr': 4\}: "
                                                 r"unknown axis 'tensr'; expected axes among "
                                                 r"data, fsdp, expert, tensor$"):
        sharding.make_mesh({"data": -1, "tensr": 4})


@pytest.mark.parametrize("field, value", [("dcn_data", 0), ("dcn_fsdp", -1)])
def test_config_degrees_refuses_a_non_positive_dcn_degree(field, value):
    """Reference: DCN degrees are given whole, >= 1 (`validate` refuses them on the config
    path; config_degrees, called on a MeshConfig that skipped it, refuses them too)."""
    from jaxmoe.config_schema import MeshConfig

    with pytest.raises(sharding.MeshError) as e:
        sharding.config_degrees(MeshConfig(**{field: value}))
    assert str(e.value) == f"mesh.{field}={value}: expected a positive integer"
    assert sharding.config_degrees(MeshConfig(dcn_data=2))[1]["data"] == 2


@pytest.mark.parametrize("overrides, shape", [
    (["mesh.data=-1"], {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}),
    (["mesh.data=-1", "mesh.expert=4"], {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}),
    (["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"],
     {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}),
    # tiny_moe has no dense layer, so no weight of width mlp_dim: 511 was refused
    (["mesh.data=4", "mesh.tensor=2", "model.mlp_dim=511"],
     {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}),
])
def test_good_mesh_shapes(overrides, shape):
    assert dict(build(*overrides).shape) == shape


def test_bad_mesh_through_cli_exits_2(capsys):
    from jaxmoe.cli import main

    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", "/tmp/unused",
               "mesh.data=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("jaxmoe: mesh error: mesh") and "\n" not in err, err
    # a rule override that would leave weights unsplit (sharding.check_overrides)
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", "/tmp/unused",
               "mesh.data=1", "mesh.fsdp=8", "mesh.rules={embed: [fsdp, tensor]}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("jaxmoe: mesh error: mesh.rules.embed=['fsdp', "
                                      "'tensor']: leaves the embed dimension of "), err


def test_a_rule_override_that_splits_a_weight_unevenly_is_refused_before_the_run(
        capsys, tmp_path):
    """`layers: [data]` with mesh.data=8 on tiny_moe's 2 layers passed every named check and
    died in the first layout of the state with jax's IndivisibleError traceback (exit 1),
    leaving a run directory behind. Reference: the weight's shape (num_layers=2,
    embed_dim=128, num_kv_heads=2, head_dim=32) and the mesh, written out by hand."""
    from jaxmoe.cli import main

    run_dir = tmp_path / "run"
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
               "--no-progress", "train.steps=1", "mesh.data=8", "mesh.rules={layers: [data]}"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "jaxmoe: mesh error: parameter moe.units.block0.attn.k of shape (2, 128, 2, 32): "
        "dimension 0 (logical axis 'layers', size 2) is not divisible by mesh.data=8, the mesh "
        "axes sharding it; expected mesh axes on 'layers' (mesh.rules) whose sizes divide 2\n"), err
    assert not run_dir.exists()


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


@pytest.mark.parametrize("degrees, dcn, expected", [
    # No DCN degree: a flat mesh would run some axis's ICI ring across the slices.
    ({"fsdp": 8}, None, "8 devices are in 2 slices but no DCN degree is set; expected "
                        "mesh.dcn_data/dcn_fsdp with product 2"),
    ({"data": -1}, {}, "in 2 slices but no DCN degree is set"),
    ({"data": 3}, {"data": 2}, "product 3 != 4 devices per slice (8 devices / DCN product 2)"),
    ({"fsdp": 2}, {"data": 2, "fsdp": 2},
     "DCN degrees {'mesh.dcn_data': 2, 'mesh.dcn_fsdp': 2} (product 4) but the devices are in "
     "2 slices; expected a product of 2"),
])
def test_multi_slice_devices_need_matching_dcn_degrees(degrees, dcn, expected):
    from sharding import aot

    devices = aot.topology_devices(aot.target_from_name("v5p:2x2x1", num_slices=2))
    with pytest.raises(sharding.MeshError) as e:
        sharding.make_mesh(degrees, devices, dcn=dcn)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kwargs, env, expected", [
    ({"num_processes": 2, "process_id": 0}, {},
     "num_processes=2, process_id=0: expected a coordinator address too"),
    ({}, {"JAXMOE_PROCESS_ID": "1"}, "num_processes=None, process_id=1: expected a coordinator"),
    ({"coordinator_address": "127.0.0.1:1", "process_id": 0}, {},
     "coordinator 127.0.0.1:1: expected --num-processes and --process-id"),
    ({"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, {},
     "process_id=2, num_processes=2: expected 0 <= process_id < num_processes"),
    ({"coordinator_address": "127.0.0.1:1", "num_processes": 0, "process_id": 0}, {},
     "process_id=0, num_processes=0: expected 0 <= process_id < num_processes"),
    ({}, {"JAXMOE_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAXMOE_NUM_PROCESSES": "two",
          "JAXMOE_PROCESS_ID": "0"}, "JAXMOE_NUM_PROCESSES='two': expected an integer"),
])
def test_multihost_settings_refused_one_line(monkeypatch, kwargs, env, expected):
    """Bad multi-process settings fail before `jax.distributed` is touched."""
    from sharding import multihost

    for name in (multihost.ENV_ADDRESS, multihost.ENV_COUNT, multihost.ENV_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def unreachable(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize reached with bad settings")

    monkeypatch.setattr(jax.distributed, "initialize", unreachable)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda *a, **k: None)
    with pytest.raises(multihost.MultiHostError) as e:
        multihost.initialize(**kwargs)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


def test_multihost_arguments_come_before_the_environment(monkeypatch):
    """An address, count and id given as arguments win over the environment's. Reference:
    check_settings' docstring ("arguments before the environment"), as the CLI's flags."""
    from sharding import multihost

    monkeypatch.setenv(multihost.ENV_ADDRESS, "10.0.0.9:1234")
    monkeypatch.setenv(multihost.ENV_COUNT, "8")
    monkeypatch.setenv(multihost.ENV_ID, "7")
    assert multihost.check_settings("127.0.0.1:1", 2, 1) == ("127.0.0.1:1", 2, 1)
    assert multihost.check_settings() == ("10.0.0.9:1234", 8, 7)  # the environment alone


class _Rows:
    """A stand-in sharding: `devices_indices_map` from {(device id, process): rows}."""

    def __init__(self, rows: dict[tuple[int, int], tuple[int, int]]):
        import collections
        Device = collections.namedtuple("Device", "id process_index")
        self._map = {Device(*key): (slice(*r), slice(None)) for key, r in rows.items()}

    def devices_indices_map(self, shape):
        return self._map


@pytest.mark.parametrize("rows, expected", [
    # data-parallel: each process its own half
    ({(0, 0): (0, 4), (1, 0): (4, 8), (2, 1): (8, 12), (3, 1): (12, 16)}, [(0, 2), (1, 2)]),
    # tensor parallelism across processes: every device holds all rows
    ({(0, 0): (0, 16), (1, 0): (0, 16), (2, 1): (0, 16), (3, 1): (0, 16)}, [(0, 1), (0, 1)]),
    # 4 processes, data over 2 of them at a time: processes 0 and 2 feed rows 0..8
    ({(0, 0): (0, 8), (1, 1): (8, 16), (2, 2): (0, 8), (3, 3): (8, 16)},
     [(0, 2), (1, 2), (0, 2), (1, 2)]),
])
def test_batch_rows_per_process(rows, expected):
    """Reference: the row blocks written out by hand."""
    processes = sorted({p for _, p in rows})
    assert [sharding.batch_rows(_Rows(rows), (16, 8), p) for p in processes] == expected


@pytest.mark.parametrize("rows, message", [
    ({(0, 0): (0, 4), (1, 0): (8, 12), (2, 1): (4, 8), (3, 1): (12, 16)},
     "process 0 holds rows [(0, 4), (8, 12)] of the batch: expected one contiguous block"),
    ({(0, 0): (0, 8), (1, 0): (8, 12), (2, 1): (12, 16), (3, 1): (12, 16)},
     "the processes hold the batch rows [(0, 12), (12, 16)] of 16: expected equal blocks"),
])
def test_batch_rows_refuses_uneven_blocks(rows, message):
    with pytest.raises(sharding.MultiHostError, match=re.escape(message)):
        sharding.batch_rows(_Rows(rows), (16, 8), 0)
    with pytest.raises(sharding.MultiHostError, match=r"^process 1 has no device in the mesh"):
        sharding.batch_rows(_Rows({(0, 0): (0, 16)}), (16, 8), 1)


def test_a_mesh_splitting_the_sequence_still_gives_one_data_shard():
    """mesh.rules={length: [tensor]} splits the batch's second dimension: the data shard was
    worked out from a [batch, 1] layout, which that cannot split (IndivisibleError)."""
    from jaxmoe.train.loop import build_trainer

    trainer = build_trainer(tiny_config("mesh.data=2", "mesh.tensor=4",
                                        "mesh.rules={length: [tensor]}"))
    assert trainer.data_shard == (0, 1)

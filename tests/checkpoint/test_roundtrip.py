"""Save on one mesh, restore on the same mesh, on a different one, and on one device.

The state (every leaf perturbed so that no two arrays are alike, plus a typed PRNG key) is
saved from an fsdp=8 mesh, its buffers are donated right after `save` returns, and it is
restored onto fsdp=8, data=2 x tensor=4 and a single device. Values must be bitwise equal (a restore
is a copy, so no tolerance), every restored array must carry the target sharding, and every
read TensorStore performs must be one device's shard, never a whole sharded array.
"""

from __future__ import annotations

import json

import jax
import pytest

import input_pipeline
from jaxmoe import config as config_lib
from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.run import abstract_state
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import assert_trees_equal, host, perturbed, tiny_config

# tensor=4 needs every head count divisible by 4; batch 8 fills data x fsdp = 8.
BASE = ["model.num_kv_heads=4", "train.batch_size=8"]
MESHES = {
    "fsdp8": (["mesh.data=1", "mesh.fsdp=8"], slice(None)),
    "dp2_tp4": (["mesh.data=2", "mesh.tensor=4"], slice(None)),
    "one_device": (["mesh.data=1"], slice(0, 1)),
}


def trainer_for(name: str):
    overrides, devices = MESHES[name]
    return build_trainer(tiny_config(*BASE, *overrides), jax.devices()[devices])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint manager, host copy of the saved state, data state, config dict)."""
    assert jax.device_count() == 8, "tests/conftest.py must set 8 simulated devices"
    trainer = trainer_for("fsdp8")
    cfg = trainer.cfg
    data = input_pipeline.make_dataset(cfg.data, split="train", batch_size=8, seed=0)
    next(data)
    with trainer.context():
        state = perturbed(trainer.init())
    expected = host(state)
    data_state = json.loads(json.dumps(data.get_state()))
    manager = ckpt.make_manager(tmp_path_factory.mktemp("ckpt"), keep_last=2)
    config = json.loads(json.dumps(config_lib.to_dict(cfg)))  # as stored: tuples -> lists
    ckpt.save(manager, 1, state, config, data.get_state())
    # Training donates the state's buffers right after a save returns; the background write
    # must not see that: the checkpoint has to hold its own copy by now.
    jax.jit(lambda s: jax.tree.map(lambda x: x if x.dtype == state.rng.dtype else x * 0 + 7,
                                   s), donate_argnums=0)(state)
    next(data)
    manager.wait_until_finished()
    return manager, expected, data_state, config


class ReadSpy:
    """Records the shape of every region TensorStore reads during a restore (orbax
    `_read_shard` is the one place a restore reads array bytes)."""

    def __init__(self, monkeypatch):
        from orbax.checkpoint._src.serialization import serialization
        self.shapes: list[tuple[int, ...]] = []
        original = serialization._read_shard

        async def spy(*, t, new_shard_shape, dtype, requested_domain, restricted_domain):
            self.shapes.append(tuple(requested_domain.shape))
            return await original(t=t, new_shard_shape=new_shard_shape, dtype=dtype,
                                  requested_domain=requested_domain,
                                  restricted_domain=restricted_domain)
        monkeypatch.setattr(serialization, "_read_shard", spy)


@pytest.mark.parametrize("name", list(MESHES))
def test_restore_onto_mesh(name, saved, monkeypatch):
    manager, expected, data_state, config = saved
    trainer = trainer_for(name)
    target = abstract_state(trainer)
    spy = ReadSpy(monkeypatch)
    restored = ckpt.restore(manager, None, target)
    assert restored.step == 1 and restored.config == config
    assert restored.data_state == data_state
    assert_trees_equal(restored.state, expected)
    shard_shapes = set()
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding,
                                                                        want.sharding)
        shape = want.sharding.shard_shape(want.shape)
        for shard in got.addressable_shards:
            assert shard.data.shape == shape
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):  # stored as key data
            shape = jax.random.key_data(got).shape
        shard_shapes.add(shape)
    # Every read is exactly one device's shard (orbax reads each distinct shard once).
    assert spy.shapes and set(spy.shapes) <= shard_shapes | {()}
    if name != "one_device":
        full = {tuple(l.shape) for l in jax.tree.leaves(target)
                if l.sharding.shard_shape(l.shape) != tuple(l.shape)}
        assert full and not full & set(spy.shapes), "a sharded array was read whole"


def test_keep_last_and_every(tmp_path):
    """keep_last=2 plus keep_every=4 over saves at 1, 2, ..., 11 keeps the newest two
    (10, 11) and the multiples of 4 (4, 8), by hand; keep_last=1 or 3 would keep 11 alone
    or 9 too."""
    state = {"w": jax.numpy.arange(4.0)}
    manager = ckpt.make_manager(tmp_path, keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 12):
        ckpt.save(manager, step, state, {"step": step})
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [4, 8, 10, 11]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 10, 11]

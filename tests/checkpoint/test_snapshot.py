"""The reused state copy async saves write from on CPU (jaxmoe/checkpoint/snapshot.py).

References: the source arrays themselves (a copy is bit-identical and keeps its sharding),
buffer addresses (a reused buffer keeps its address; a buffer XLA could donate is reused
in place by a step that donates it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.run import RunCheckpointer
from jaxmoe.checkpoint.snapshot import StateSnapshot
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import tiny_config

P = jax.sharding.PartitionSpec


def _address(x: jax.Array) -> int:
    return x.addressable_shards[0].data.unsafe_buffer_pointer()


def test_copies_are_exact_sharded_like_the_source_and_reuse_their_buffers():
    mesh = jax.make_mesh((8,), ("d",))
    spread = jax.sharding.NamedSharding(mesh, P("d"))
    one = jax.devices()[0]
    state = {"w": jax.device_put(jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3), spread),
             "m": jax.device_put(jnp.linspace(0, 1, 5, dtype=jnp.bfloat16), one),
             "key": jax.random.key(3), "step": 7}
    snap = StateSnapshot()
    first = snap.take(state)
    addresses = {k: _address(first[k]) for k in ("w", "m")}
    for k in ("w", "m"):
        assert first[k].sharding.is_equivalent_to(state[k].sharding, state[k].ndim)
        np.testing.assert_array_equal(np.asarray(first[k]), np.asarray(state[k]))
        assert _address(first[k]) != _address(state[k])  # a copy, not the array itself
    assert first["key"] is state["key"] and first["step"] == 7  # keys and scalars pass
    # the source moves on: the copy keeps the old values; the next take overwrites it in place
    old = {k: np.array(first[k], copy=True) for k in ("w", "m")}  # a view would pin the buffer
    state = {**state, "w": state["w"] * 2 + 1, "m": state["m"] - 1}
    np.testing.assert_array_equal(np.asarray(first["w"]), old["w"])
    second = snap.take(state)
    for k in ("w", "m"):
        np.testing.assert_array_equal(np.asarray(second[k]), np.asarray(state[k]))
        assert _address(second[k]) == addresses[k], k
    # a different shape gets fresh buffers
    third = snap.take({**state, "w": jnp.zeros((4, 4))})
    np.testing.assert_array_equal(np.asarray(third["w"]), np.zeros((4, 4)))


def test_a_new_shape_on_the_same_device_gets_a_fresh_copy():
    """An (8,) array, then a (4,) one on the same device: the kept buffer does not fit, so the
    copy is made afresh, with the new shape. Reference: the source array itself."""
    one = jax.devices()[0]
    snap = StateSnapshot()
    first = snap.take({"w": jax.device_put(jnp.arange(8, dtype=jnp.float32), one)})
    assert first["w"].shape == (8,)
    smaller = jax.device_put(jnp.arange(10, 14, dtype=jnp.float32), one)
    second = snap.take({"w": smaller})
    assert second["w"].shape == (4,)
    np.testing.assert_array_equal(np.asarray(second["w"]), np.asarray(smaller))


def test_a_step_after_an_async_save_still_donates_its_buffers(tmp_path):
    """Without the copy the save holds a view of the state's buffer, and the next donating
    step must write its result to a fresh buffer (on this host: ~1 s per GB of new pages)."""
    manager = ckpt.make_manager(tmp_path / "ckpt", keep_last=2)
    step = jax.jit(lambda x: x * 1.5 + 1, donate_argnums=0)
    x = jax.device_put(jnp.ones((4096, 4096), jnp.float32), jax.devices()[0])  # 64 MB
    snap = StateSnapshot()
    try:
        for n in (1, 2):  # the second save reuses the copy made for the first
            address = _address(x)
            ckpt.save(manager, n, {"x": x}, {}, writer_priority="normal", snapshot=snap)
            x = step(x)
            assert _address(x) == address  # donated: the result took the input's buffer
        manager.wait_until_finished()
        for n, value in ((1, 1.0), (2, 2.5)):  # each save holds the state it was given
            restored = manager.restore(n, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore()))["state"]
            np.testing.assert_array_equal(np.asarray(restored["x"]),
                                          np.full((4096, 4096), value))
    finally:
        manager.close()


def test_a_run_that_saves_takes_the_copy_when_it_starts(tmp_path, capsys):
    """A host that cannot hold the copy fails at the start of the run, not at its first save;
    `train.checkpoint_snapshot=false` holds none. Reference: the state's own byte count."""
    for snapshot in (True, False):
        cfg = tiny_config("train.checkpoint_every=2", "train.steps=4",
                          f"train.checkpoint_snapshot={str(snapshot).lower()}")
        trainer = build_trainer(cfg, devices=jax.devices()[:1])
        run = RunCheckpointer(tmp_path / f"run_{snapshot}", cfg)
        try:
            state, step = run.restore_or_init(trainer, train_iter=None)
            out = capsys.readouterr().out
            held = run._snapshot.nbytes if run._snapshot is not None else 0
            expected = sum(x.nbytes for x in jax.tree.leaves(state)
                           if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
            assert step == 0 and held == (expected if snapshot else 0)
            assert ("holding a" in out) == snapshot, out
        finally:
            run.close()

"""One of two processes (2 CPU devices each) that save a sharded TrainState together,
restore it onto another mesh, then wait for a preemption notice (SIGTERM to one of them) and
save at the step they agree on. Usage: _multihost_worker.py PORT PROCESS_ID CHECKPOINT_DIR."""

from __future__ import annotations

import sys
import time

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, process_id: int, directory: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxmoe import config as config_lib
    from jaxmoe.checkpoint import manager as ckpt
    from jaxmoe.checkpoint.preemption import PreemptionGuard
    from jaxmoe.checkpoint.run import abstract_state
    from jaxmoe.checkpoint.snapshot import StateSnapshot
    from jaxmoe.train.loop import build_trainer
    from tests.checkpoint._helpers import perturbed, tiny_config

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    base = ["model.num_kv_heads=4"]
    saver = build_trainer(tiny_config(*base, "mesh.data=1", "mesh.fsdp=4"))
    with saver.context():
        state = perturbed(saver.init())
    manager = ckpt.make_manager(directory)
    # as `jaxmoe train` saves on CPU: from a copy, made by both processes together
    ckpt.save(manager, 5, state, config_lib.to_dict(saver.cfg),
              {"process": process_id, "batches": 10 + process_id}, snapshot=StateSnapshot())
    manager.wait_until_finished()

    def gathered(tree):
        """Every leaf as a full NumPy array on this host (typed keys as key data)."""
        def one(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.tree.map(one, tree)

    expected = gathered(state)
    loader = build_trainer(tiny_config(*base, "mesh.data=2", "mesh.tensor=2"))
    target = abstract_state(loader)
    restored = ckpt.restore(manager, None, target)
    assert restored.step == 5
    assert restored.data_state == {"process": process_id, "batches": 10 + process_id}, \
        restored.data_state
    checked = 0
    for got, want, full in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target),
                               jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
            got = jax.random.key_data(got)
        for shard in got.addressable_shards:  # this process's shards only
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
            checked += 1
    print(f"OK process {process_id}: {checked} shards equal", flush=True)

    # Preemption: the test sends SIGTERM to process 1 only; JAX's preemption service must
    # make both processes stop at the same step, where they save together.
    with PreemptionGuard() as guard:
        print("looping", flush=True)
        for step in range(6, 6 + 30_000):
            time.sleep(0.01)  # a "training step"; the processes are not in lock step
            if guard.should_stop(step):
                break
        else:
            raise AssertionError("no preemption notice within 300 s")
    ckpt.save(manager, step, restored.state, config_lib.to_dict(saver.cfg),
              {"process": process_id})
    manager.wait_until_finished()
    manager.close()
    print(f"preempted by {guard.signal_name} at step {step}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Checkpoint writer threads move to SCHED_IDLE during an async save, and the checkpoint is
still complete and exact. Runs in a subprocess: thread policies stick to the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from jaxmoe.checkpoint import priority

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp, numpy as np
    from jaxmoe.checkpoint import manager as ckpt, priority

    m = ckpt.make_manager(sys.argv[1])
    x = np.random.default_rng(0).normal(size=(16, 512, 512)).astype(np.float32)
    ckpt.save(m, 1, {"x": jnp.asarray(x)}, {"k": 1})  # writer_priority="idle"
    moved = priority.deprioritize_writers()
    tids = priority.writer_threads()
    assert tids, "no TensorStore writer threads found (renamed?)"
    policies = {os.sched_getscheduler(t) for t in tids}
    m.wait_until_finished()
    got = ckpt.restore(m, 1, {"x": jnp.zeros_like(x)}).state["x"]
    np.testing.assert_array_equal(np.asarray(got), x)
    print("policies", sorted(policies), "idle", os.SCHED_IDLE, "threads", len(tids))
    assert policies == {os.SCHED_IDLE}, policies
""")


@pytest.mark.skipif(not priority.supported(), reason="SCHED_IDLE is Linux-only")
def test_writer_threads_run_at_idle_priority(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ck")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bad_writer_priority_is_one_line(tmp_path):
    from jaxmoe.checkpoint import manager as ckpt

    m = ckpt.make_manager(tmp_path / "ck")
    with pytest.raises(ValueError, match="writer_priority='low': expected 'idle' or 'normal'"):
        ckpt.save(m, 1, {}, {}, writer_priority="low")
    m.close()

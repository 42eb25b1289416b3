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
    seen, checked = set(), 0
    while True:  # threads appear lazily: check those that existed before each call
        tids = priority.writer_threads()
        priority.deprioritize_writers()
        for t in tids:
            try:
                policy = os.sched_getscheduler(t)
            except OSError:  # exited
                continue
            assert policy == os.SCHED_IDLE, (t, policy)
            checked += 1
        seen |= set(tids)
        if not m.is_saving_in_progress():
            break
    assert seen, "no TensorStore writer threads found (renamed?)"
    m.wait_until_finished()
    got = ckpt.restore(m, 1, {"x": jnp.zeros_like(x)}).state["x"]
    np.testing.assert_array_equal(np.asarray(got), x)
    # save() itself must lower them: put the pooled threads back to normal, save again and
    # look, without calling deprioritize_writers here, right after save() returns.
    pool = priority.writer_threads()
    for t in pool:
        os.sched_setscheduler(t, os.SCHED_OTHER, os.sched_param(0))
    ckpt.save(m, 2, {"x": jnp.asarray(x)}, {"k": 2})
    policies = {}
    for t in pool:
        try:
            policies[t] = os.sched_getscheduler(t)
        except OSError:
            pass
    assert policies and set(policies.values()) == {os.SCHED_IDLE}, policies
    m.wait_until_finished()
    print("writer threads", len(seen), "checks", checked, "pooled", len(policies))
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

"""A process SIGKILLed while an async save is being written leaves the previous checkpoint
usable; the partial one is ignored (and removed) on resume, with a log line saying so.
Also: SIGTERM / SIGINT handling of `PreemptionGuard` in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.preemption import PreemptionGuard
from jaxmoe.checkpoint.run import RunCheckpointer
from tests.checkpoint._helpers import ROOT, subprocess_env, tiny_config

WORKER = ROOT / "tests" / "checkpoint" / "_save_worker.py"


def test_sigkill_during_async_save(tmp_path, capsys):
    run_dir = tmp_path / "run"
    directory = ckpt.checkpoint_dir(run_dir)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(directory)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        assert proc.stdout.readline().strip() == "saving 2"
        proc.send_signal(signal.SIGKILL)  # while step 2's bytes are being written
    finally:
        proc.kill()
        proc.wait(timeout=60)
    partial = ckpt.incomplete_checkpoints(directory)
    assert partial, "step 2 finished saving before the kill; make the worker's arrays larger"
    assert not (directory / "2").exists()

    checkpoints = RunCheckpointer(run_dir, tiny_config())
    log = capsys.readouterr().out
    assert f"ignoring incomplete checkpoint {partial[0]}" in log, log
    assert not ckpt.incomplete_checkpoints(directory), "the partial save was not removed"
    assert list(checkpoints.manager.all_steps()) == [1]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4, 16 * 1024 * 1024), np.float32, sharding=sharding),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding)}
    restored = ckpt.restore(checkpoints.manager, None, target)
    assert restored.step == 1 and restored.data_state == {"batches": 1}
    assert int(restored.state["step"]) == 1
    w = np.asarray(restored.state["w"])
    assert w.min() == w.max() == 1.0
    checkpoints.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard(sig, capfd):
    """The first signal is said on stderr at once and stops at the next step boundary; a
    second one (either kind: a reader or step that never reaches the boundary must still be
    stoppable) interrupts at once."""
    previous = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), sig)
        assert guard.should_stop(2) and guard.signal_name == signal.Signals(sig).name
        name = signal.Signals(sig).name
        assert f"{name}: saving a checkpoint at the next step boundary" in capfd.readouterr().err
        for second in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), second)
    assert signal.getsignal(sig) is previous


def test_preemption_guard_stops_even_when_stderr_is_gone(monkeypatch):
    """`jaxmoe train ... 2>&1 | tee log` whose tee died first: saying the signal on a
    closed pipe fails, and must not raise out of the handler (that aborted the run unsaved)."""
    import jaxmoe.checkpoint.preemption as preemption

    def broken_pipe(fd, data):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(preemption.os, "write", broken_pipe)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(1) and guard.signal_name == "SIGTERM"

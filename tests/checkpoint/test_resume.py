"""Exact resume of `jaxmoe train` after SIGKILL and after SIGTERM (training subprocesses).

The reference is one uninterrupted run. A run killed with SIGKILL after a periodic async
checkpoint, then started again in the same run directory, must log the same loss at every
step, bitwise (same CPU, same compiled program: parameters, Adam moments, router biases,
RNG and the data iterator's position all come back exactly). A run sent SIGTERM saves the
step it is at, exits 0, and its resumption again matches the reference.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.checkpoint._helpers import (
    logged_steps,
    metric_rows,
    run_training,
    start_training,
    train_losses,
    wait_for,
)

STEPS = 24  # steps take ~0.05 s here: a signal sent at step 3-4 lands well before the end
COMMON = [f"train.steps={STEPS}"]


class Reference:
    """The uninterrupted run, started in the background so that it compiles while the first
    test's run does (the machine has 2 cores and each run is mostly single-threaded)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.proc = start_training(run_dir, *COMMON)
        self._losses: dict[int, float] | None = None

    def losses(self) -> dict[int, float]:
        if self._losses is None:
            rc = self.proc.wait(timeout=300)
            assert rc == 0, self.run_dir.with_suffix(".log").read_text()[-3000:]
            self._losses = train_losses(self.run_dir)
            assert sorted(self._losses) == list(range(1, STEPS + 1))
            assert self._losses[STEPS] < self._losses[1]  # it trained
        return self._losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    ref.proc.kill()
    ref.proc.wait()


def resumed_step(output: str) -> int:
    match = re.search(r"resumed from \S+ \(step (\d+)\)", output)
    assert match, f"no 'resumed from' line in:\n{output[-3000:]}"
    return int(match.group(1))


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*COMMON, "train.checkpoint_every=4"]
    proc = start_training(run_dir, *overrides)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "4").is_dir(), proc, 240,
                 "checkpoint 4 was complete")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert logged_steps(run_dir) < STEPS, "the run finished before it was killed"

    output = run_training(run_dir, *overrides)
    start = resumed_step(output)
    assert 4 <= start < STEPS and start % 4 == 0
    train_steps = [r["step"] for r in metric_rows(run_dir) if r["split"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # replayed steps are not logged twice
    losses, expected = train_losses(run_dir), reference.losses()
    assert losses == expected, {s: (losses.get(s), expected[s]) for s in expected
                                if losses.get(s) != expected[s]}


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_0(reference, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start_training(run_dir, *COMMON, log=log)  # no periodic checkpoints
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3, proc, 240, "step 3 was logged")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    output = log.read_text()
    assert rc == 0, output[-3000:]
    match = re.search(r"SIGTERM received; saved step (\d+) to (\S+); exiting", output)
    assert match, output[-3000:]
    stopped = int(match.group(1))
    assert 3 <= stopped < STEPS, stopped
    # The checkpoint is the step training stopped at: nothing was trained after it.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(stopped)]
    assert logged_steps(run_dir) == stopped

    output = run_training(run_dir, *COMMON)
    assert resumed_step(output) == stopped
    assert train_losses(run_dir) == reference.losses()

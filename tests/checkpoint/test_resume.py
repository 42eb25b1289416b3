"""Exact resume of `jaxmoe train` after SIGKILL and after SIGTERM (training subprocesses).

The reference is one uninterrupted run. A run killed with SIGKILL after a periodic async
checkpoint, then started again in the same run directory, must log the same loss at every
step, bitwise (same CPU, same compiled program: parameters, Adam moments, router biases,
RNG and the data iterator's position all come back exactly). A run sent SIGTERM saves the
step it is at, exits 0, and its resumption again matches the reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.checkpoint.damage import CheckpointError, CheckpointMismatch
from jaxmoe.checkpoint.run import RunCheckpointer, config_diff
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import (
    DataIterator,
    assert_trees_equal,
    host,
    logged_steps,
    metric_rows,
    perturbed,
    run_training,
    start_training,
    tiny_config,
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
    summary = json.loads((run_dir / "summary.json").read_text())  # the whole run, not the resume
    assert [r["step"] for r in summary["train"]] == train_steps
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


# ----------------------------------------------------------------------------- in-process


def at_step(state, step: int):
    return dataclasses.replace(state, step=jnp.asarray(step, state.step.dtype))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """(run dir holding complete checkpoints 1 and 2, trainer, {step: host copy of state}).

    The two steps hold different values in every array (not only the step), so a test can
    tell which folder a restore read."""
    cfg = tiny_config("mesh.data=1")
    trainer = build_trainer(cfg, jax.devices()[:1])
    with trainer.context():
        init = trainer.init()
    states = {step: at_step(perturbed(init, step), step) for step in (1, 2)}
    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    checkpoints = RunCheckpointer(run_dir, cfg, async_save=False)
    for step in (1, 2):
        checkpoints.save(step, states[step], DataIterator(10 * step), wait=True)
    checkpoints.close()
    saved = {step: host(state) for step, state in states.items()}
    for a, b, c in zip(*(jax.tree.leaves(t) for t in (saved[1], saved[2], host(init)))):
        assert not np.array_equal(a, b) and not np.array_equal(a, c)
    return run_dir, trainer, saved


def copy_run(two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps[0], run_dir)
    return run_dir


def resume(run_dir, trainer, capsys=None, data=None):
    """(RunCheckpointer, state, step, data iterator, log) of a resumption in `run_dir`."""
    checkpoints = RunCheckpointer(run_dir, trainer.cfg)
    data = DataIterator() if data is None else data
    try:
        state, step = checkpoints.restore_or_init(trainer, data)
    except BaseException:
        checkpoints.close()
        raise
    log = capsys.readouterr().out if capsys else ""
    return checkpoints, state, step, data, log


@pytest.mark.parametrize("damage, skipped, resumed", [
    ("empty step folder", 3, 2),             # an interrupted copy created checkpoints/3/
    ("no _CHECKPOINT_METADATA", 2, 1),
    ("no state/_METADATA", 2, 1),
])
def test_unfinished_newest_step_is_set_aside(two_steps, tmp_path, capsys, damage, skipped,
                                             resumed):
    run_dir = copy_run(two_steps, tmp_path)
    folder = run_dir / "checkpoints" / str(skipped)
    if damage == "empty step folder":
        folder.mkdir()
    elif damage == "no _CHECKPOINT_METADATA":
        (folder / "_CHECKPOINT_METADATA").unlink()
    else:
        (folder / "state" / "_METADATA").unlink()
    capsys.readouterr()
    checkpoints, state, step, data, log = resume(run_dir, two_steps[1], capsys)
    assert step == resumed and data.get_state() == {"batches": 10 * resumed}
    assert_trees_equal(state, two_steps[2][resumed])
    skip_lines = [line for line in log.splitlines() if "ignoring incomplete checkpoint" in line]
    assert len(skip_lines) == 1 and f" {folder} (" in skip_lines[0], log
    assert f"moved it to {folder}.incomplete" in skip_lines[0], log
    assert (run_dir / "checkpoints" / f"{skipped}.incomplete").is_dir()
    # The skipped step can be saved again (Orbax no longer takes the folder for a step).
    checkpoints.save(skipped, state, data, wait=True)
    assert list(checkpoints.manager.all_steps())[-1] == skipped
    checkpoints.close()


def test_damaged_newest_step_names_older_checkpoints(two_steps, tmp_path):
    """A damaged newest checkpoint (here its array metadata is cut short, e.g. by a full
    disk during a copy; truncated data files are covered by test_damage.py) is not skipped
    silently: the error names the older complete checkpoints and what to do."""
    run_dir = copy_run(two_steps, tmp_path)
    newest = run_dir / "checkpoints" / "2"
    metadata = newest / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:  # no silent fall-back to step 1
        resume(run_dir, two_steps[1])
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"checkpoint {newest}: item state: "), message
    assert "; older complete checkpoints: [1]; " in message, message
    assert f"move {newest} aside" in message and message.endswith("to resume from step 1")
    newest.rename(newest.with_name("2.damaged"))  # what the message says to do
    checkpoints, state, step, _, _ = resume(run_dir, two_steps[1])
    assert step == 1
    assert_trees_equal(state, two_steps[2][1])
    checkpoints.close()


def test_damaged_only_step_has_no_advice(two_steps, tmp_path):
    run_dir = copy_run(two_steps, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "1")
    shutil.rmtree(run_dir / "checkpoints" / "2" / "config")
    with pytest.raises(CheckpointError) as err:
        resume(run_dir, two_steps[1])
    assert str(err.value) == (f"checkpoint {run_dir / 'checkpoints' / '2'}: item config is "
                              "missing (no folder config/); the checkpoint is incomplete or "
                              "damaged")


def test_array_step_differs_from_folder(two_steps, tmp_path):
    run_dir = copy_run(two_steps, tmp_path)
    checkpoints = RunCheckpointer(run_dir, two_steps[1].cfg, async_save=False)
    with two_steps[1].context():
        state = two_steps[1].init()
    checkpoints.save(3, at_step(state, 7), DataIterator(), wait=True)  # a mislabelled copy
    checkpoints.close()
    with pytest.raises(CheckpointError) as err:
        resume(run_dir, two_steps[1])
    assert str(err.value) == (
        f"checkpoint {run_dir / 'checkpoints' / '3'}: array step holds 7, expected 3; the "
        "checkpoint is damaged; older complete checkpoints: [1, 2]; move "
        f"{run_dir / 'checkpoints' / '3'} aside (e.g. rename it to 3.damaged) to resume from "
        "step 2"), err.value  # the newest older step, not the oldest


def test_config_mismatch_gets_no_fallback_advice(two_steps, tmp_path):
    """Older checkpoints of the run would not fit the config either."""
    other = build_trainer(tiny_config("mesh.data=1", "model.qk_norm=true"), jax.devices()[:1])
    with pytest.raises(CheckpointMismatch) as err:
        resume(copy_run(two_steps, tmp_path), other)
    assert "missing from the checkpoint" in str(err.value)
    assert "older complete" not in str(err.value), err.value


def test_a_refused_resume_reads_no_array(two_steps, tmp_path, monkeypatch):
    """A changed data stream is refused once the checkpoint's config and data position are
    read, before its arrays are (which takes minutes for a large model); an accepted resume
    reads them. Reference: the items orbax is asked to restore, in order."""
    from jaxmoe.checkpoint import manager as ckpt

    read: list[str] = []
    original = ckpt._restore_item

    def recording(manager, step, item, args):
        read.append(item)
        return original(manager, step, item, args)

    monkeypatch.setattr(ckpt, "_restore_item", recording)
    trainer = two_steps[1]
    run_dir = copy_run(two_steps, tmp_path)
    seeded = dataclasses.replace(trainer.cfg, data=dataclasses.replace(trainer.cfg.data,
                                                                       seed=5))
    checkpoints = RunCheckpointer(run_dir, seeded)
    with pytest.raises(CheckpointMismatch, match="data.seed=0 -> 5: expected the run's data"):
        checkpoints.restore_or_init(trainer, DataIterator())
    checkpoints.close()
    assert read == ["config", "data"]
    read.clear()
    resume(run_dir, trainer)[0].close()
    assert read == ["config", "data", "state"]


def test_resume_logs_config_differences(two_steps, tmp_path, capsys):
    trainer = two_steps[1]
    changed = dataclasses.replace(trainer.cfg, train=dataclasses.replace(trainer.cfg.train,
                                                                         steps=99))
    capsys.readouterr()
    checkpoints = RunCheckpointer(copy_run(two_steps, tmp_path), changed)
    _, step = checkpoints.restore_or_init(trainer, DataIterator())
    checkpoints.close()
    assert step == 2
    log = capsys.readouterr().out
    assert f"config differs from the checkpoint's: train.steps: {trainer.cfg.train.steps!r} " \
           "-> 99" in log, log


class RefusingIterator(DataIterator):
    """A data iterator whose `set_state` refuses the stored state with `error`."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def set_state(self, state: dict) -> None:
        raise self.error


@pytest.mark.parametrize("error, shown", [
    (KeyError("grain"), "KeyError: 'grain'"),
    (TypeError("list indices must be integers"), "TypeError: list indices must be integers"),
    (ValueError("expected 3 sources, got 2"), "ValueError: expected 3 sources, got 2"),
], ids=["KeyError", "TypeError", "ValueError"])
def test_data_state_that_does_not_fit_is_a_mismatch(two_steps, tmp_path, error, shown):
    """The data config changed so that the stored iterator state no longer fits: one line
    naming the step folder (a CheckpointMismatch: older checkpoints would not fit either)."""
    run_dir = copy_run(two_steps, tmp_path)
    with pytest.raises(CheckpointMismatch) as err:
        resume(run_dir, two_steps[1], data=RefusingIterator(error))
    assert str(err.value) == (f"checkpoint {run_dir / 'checkpoints' / '2'}: the data-iterator "
                              f"state does not fit this data config ({shown})")
    assert err.value.__cause__ is error


def test_process_count_change_restarts_the_data(two_steps, tmp_path, capsys):
    """Step 2 saved by 2 processes (only process_0-of-2.json), resumed by 1: the state is
    step 2's, the data iterator is left at its beginning, and a line says so."""
    run_dir = copy_run(two_steps, tmp_path)
    data_dir = run_dir / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*")) == ["process_0-of-1.json"]
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    capsys.readouterr()
    checkpoints, state, step, data, log = resume(run_dir, two_steps[1], capsys)
    checkpoints.close()
    assert step == 2 and data.get_state() == {"batches": 0}  # as DataIterator() starts
    assert_trees_equal(state, two_steps[2][2])
    path = run_dir.absolute() / "checkpoints" / "2"
    assert f"checkpoint: {path} holds the data-iterator states of 2 processes, this run has " \
           "1; the data restarts from its beginning, so batches differ from the interrupted " \
           "run" in log.splitlines(), log
    assert sorted(p.name for p in data_dir.glob("process_*")) == ["process_0-of-2.json"]


class FingerprintedData(DataIterator):
    """A data iterator whose state carries a fingerprint of its inputs, as the real one."""

    def __init__(self, tokenizer: str, batches: int = 0):
        super().__init__(batches)
        self.inputs = {"tokenizer": tokenizer, "files": 0, "files_sha256": "none"}
        self.state["inputs"] = self.inputs


class ShardedData(DataIterator):
    """A data iterator that reads data shard `shard` = (index, count), as the real one."""

    def __init__(self, shard: tuple[int, int], batches: int = 0):
        super().__init__(batches)
        self.shard = shard
        self.state["shard"] = list(shard)


def test_a_position_of_another_data_shard_restarts_the_data(two_steps, tmp_path, capsys):
    """The mesh decides which data shard a process reads (tensor parallelism across hosts:
    both processes read shard 0 of 1). Resumed on a mesh where they read shards 0 and 1 of
    2, the saved position of the other partition of the records was restored, with no
    word; the data now restarts, said in one line. The same shard resumes its position."""
    run_dir = copy_run(two_steps, tmp_path)
    trainer = two_steps[1]
    checkpoints, state, _, _, _ = resume(run_dir, trainer)
    checkpoints.save(3, at_step(state, 3), ShardedData((0, 1), batches=7), wait=True)
    checkpoints.close()
    capsys.readouterr()
    checkpoints, _, step, data, log = resume(run_dir, trainer, capsys, ShardedData((0, 2)))
    checkpoints.close()
    assert step == 3 and data.state["batches"] == 0  # not restored
    assert (f"{run_dir.absolute() / 'checkpoints' / '3'} holds the data position of data "
            "shard [0, 1] (shard, shards), this run reads [0, 2]; the data restarts from its "
            "beginning") in log, log
    checkpoints, _, _, data, _ = resume(run_dir, trainer, capsys, ShardedData((0, 1)))
    checkpoints.close()
    assert data.state["batches"] == 7


def test_a_changed_tokenizer_is_refused_after_a_process_count_change(two_steps, tmp_path):
    """Without its own data state (saved by 2 processes, resumed by 1) a process still
    compares the tokenizer's contents, with any process's fingerprint (they were skipped)."""
    run_dir = copy_run(two_steps, tmp_path)
    trainer = two_steps[1]
    checkpoints, state, _, _, _ = resume(run_dir, trainer)
    checkpoints.save(3, at_step(state, 3), FingerprintedData("sha256:aaaa"), wait=True)
    checkpoints.close()
    data_dir = run_dir / "checkpoints" / "3" / "data"
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    checkpoints, _, step, _, _ = resume(run_dir, trainer, data=FingerprintedData("sha256:aaaa"))
    checkpoints.close()
    assert step == 3
    with pytest.raises(CheckpointMismatch) as err:
        resume(run_dir, trainer, data=FingerprintedData("sha256:bbbb"))
    assert "its contents differ from the run's (sha256:aaaa -> sha256:bbbb)" in str(err.value)


def test_an_older_checkpoint_compares_the_tokenizer_by_its_path(two_steps, tmp_path):
    """A data state saved before fingerprints (no `inputs`): data.tokenizer is compared by
    its path."""
    run_dir = copy_run(two_steps, tmp_path)
    trainer = two_steps[1]
    cfg = dataclasses.replace(trainer.cfg, data=dataclasses.replace(
        trainer.cfg.data, tokenizer="/elsewhere/tok.json"))
    checkpoints = RunCheckpointer(run_dir, cfg)
    with pytest.raises(CheckpointMismatch) as err:
        checkpoints.restore_or_init(trainer, FingerprintedData("sha256:aaaa"))
    checkpoints.close()
    assert str(err.value) == (
        f"checkpoint {run_dir.absolute() / 'checkpoints' / '2'}: data.tokenizer='byte' -> "
        "'/elsewhere/tok.json': expected the run's tokenizer settings (the model's token ids "
        "would change meaning; a tokenizer file is compared by its path); a new tokenizer "
        "needs a new --run-dir")


def test_config_diff():
    stored = {"model": {"dim": 64, "sizes": [1, 2], "old": 1}, "seed": 0}
    current = {"model": {"dim": 128, "sizes": (1, 2), "new": "x"}, "seed": 0}
    assert config_diff(stored, current) == [
        "model.dim: 64 -> 128",
        "model.new: '<absent>' -> 'x'",
        "model.old: 1 -> '<absent>'",
    ]  # a tuple equals the list JSON made of it; keys are sorted
    assert config_diff(stored, stored) == []

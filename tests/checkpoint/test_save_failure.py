"""A checkpoint save that cannot be written (full disk, read-only folder): one line, exit 1,
the earlier checkpoints kept. (It printed several hundred lines of Orbax tracebacks from its
writer threads and exited 1 through an uncaught ValueError/OSError.)"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import jax

from jaxmoe.checkpoint.damage import flat_names
from jaxmoe.checkpoint.inspect import restore_params
from jaxmoe.checkpoint.save_failure import reason
from jaxmoe.cli import main
from tests.checkpoint._helpers import fake_step_folder

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "--config", "configs/tiny_moe.yaml", "--no-progress",
        "train.checkpoint_every=2", "train.sample_tokens=0", "train.eval_batches=1"]


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path,
                                                                                 capsys):
    """Reference: the tiny model's state is ~12 MB, so a 2 MB limit on a file's size
    (RLIMIT_FSIZE, in the child only: EFBIG as on a full disk) fails the save of step 4
    after step 2 was saved without the limit."""
    run_dir = tmp_path / "run"
    assert main(ARGS + ["--run-dir", str(run_dir), "train.steps=2"]) == 0
    capsys.readouterr()
    before = flat_names(restore_params(run_dir / "checkpoints" / "2"))

    # The limit is set by the child itself (a preexec_fn would fork this JAX process).
    limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
               "(2 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
               "runpy.run_module('jaxmoe.cli', run_name='__main__')")
    env = {**os.environ, "JAXMOE_HUGEPAGES": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", limited, *ARGS, "--run-dir", str(run_dir),
                          "train.steps=4"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    where = run_dir / "checkpoints"
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr == (f"jaxmoe: checkpoint step 4 to {where} failed: File too large (EFBIG, "
                          f"errno 27); the latest complete checkpoint is step 2 ({where / '2'})"
                          "\n"), run.stderr[-3000:]
    after = flat_names(restore_params(where / "2"))  # still there, and readable
    assert after.keys() == before.keys()
    assert all((jax.device_get(after[k]) == jax.device_get(before[k])).all() for k in before)
    assert not (where / "4").exists()


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(
        tmp_path, capsys, monkeypatch):
    """A read-only mount (simulated: making the probe folder fails with EROFS, as root
    ignores a folder's mode bits) is refused before any step, not at the first save."""
    from jaxmoe.checkpoint import save_failure

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
    monkeypatch.setattr(save_failure.tempfile, "mkdtemp", read_only)
    run_dir = tmp_path / "run"
    assert main(ARGS + ["--run-dir", str(run_dir), "train.steps=2"]) == 1
    err = capsys.readouterr().err
    assert err == (f"jaxmoe: checkpoint directory {run_dir / 'checkpoints'}: cannot be written "
                   "(Read-only file system (EROFS)); expected a writable folder (a run that "
                   "cannot save would lose its training)\n"), err
    assert not (run_dir / "metrics.jsonl").exists() or \
        (run_dir / "metrics.jsonl").read_text() == ""
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_reason_reads_the_os_error_tensorstore_reports():
    """Reference: TensorStore's text of a failed write (seen on a full 30 MB tmpfs)."""
    text = ('RESOURCE_EXHAUSTED: Error writing "params.x/c" in OCDBT database at local file '
            '"/r/checkpoints/6.orbax-checkpoint-tmp/": Failed to write 1527808 bytes to file '
            "19: No space left on device [os_error_code=28]")
    assert reason(ValueError(text)) == "No space left on device (ENOSPC, errno 28)"
    assert reason(OSError(errno.EROFS, "Read-only file system")) == \
        "Read-only file system (EROFS, errno 30)"


def test_step_folders_are_ordered_by_number(tmp_path):
    """Steps 9 and 10 sort as numbers, not as text ("10" < "9"): the newest complete
    checkpoint a failed save names is step 10. Reference: the folders made here by hand,
    with the files Orbax's finished saves hold (`manager.STEP_FILES`)."""
    from jaxmoe.checkpoint.manager import STEP_FILES, complete_steps, unfinished_steps
    from jaxmoe.checkpoint.save_failure import save_error

    for step in (10, 2, 9):
        fake_step_folder(tmp_path, step)
    fake_step_folder(tmp_path, 11, STEP_FILES[:1])  # 11 lacks its state metadata
    (tmp_path / "012").mkdir()  # not a name Orbax takes for a step
    (tmp_path / "3.orbax-checkpoint-tmp-1").mkdir()  # a save in flight
    assert complete_steps(tmp_path) == [2, 9, 10]
    assert unfinished_steps(tmp_path) == [(tmp_path / "11", "no state/_METADATA")]
    error = save_error(OSError(errno.ENOSPC, "No space left on device"), 12, tmp_path)
    assert str(error) == (
        f"checkpoint step 12 to {tmp_path} failed: No space left on device (ENOSPC, errno 28); "
        f"the latest complete checkpoint is step 10 ({tmp_path / '10'})")

"""The run directory: a config.yaml that is not a jaxmoe run's is refused, and a second
`jaxmoe train` on a directory a running one holds is refused in one line.

References: the files left in the directory, byte for byte; the lock held by another
process (a subprocess that takes it and waits), which the kernel drops when it dies."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmoe.cli import main
from jaxmoe.config_schema import ConfigError
from jaxmoe.train.run_dir import run_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys; from pathlib import Path; from jaxmoe.train.run_dir import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()")


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("text, why", [
    ("lr: 0.1\nmodel: resnet\n",
     "top-level keys ['lr', 'model'], expected ['data', 'mesh', 'model', 'train']"),
    ("hello: [\n", "unreadable as YAML (ParserError)"),
    ("- a\n- b\n", "a YAML list, not a mapping of config sections"),
])
def test_a_config_yaml_of_something_else_is_not_overwritten(tmp_path, capsys, text, why):
    (tmp_path / "config.yaml").write_text(text)
    (tmp_path / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(tmp_path),
                 "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"jaxmoe: config error: --run-dir {tmp_path}: its config.yaml is not a "
                   f"jaxmoe run's ({why}); expected a new or empty directory, or a run to "
                   "resume")
    assert _files(tmp_path) == before


def test_a_checkpoints_file_in_a_run_is_named(tmp_path, capsys):
    """A file named `checkpoints` in a run gave orbax's NotADirectoryError traceback."""
    (tmp_path / "config.yaml").write_text("model:\n  num_layers: 2\n")
    (tmp_path / "checkpoints").write_text("not a folder")
    before = _files(tmp_path)
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(tmp_path),
                 "train.steps=1"]) == 2
    assert capsys.readouterr().err == (
        f"jaxmoe: config error: --run-dir {tmp_path}: {tmp_path / 'checkpoints'} is a file; "
        "expected the run's checkpoints folder\n")
    assert _files(tmp_path) == before


def _holder(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_directory_is_refused(tmp_path, capsys, monkeypatch):
    """Another process holds the lock: `jaxmoe train` there exits 2 with one line naming
    that process, before it builds anything, and leaves the directory as it was; once the
    holder exits normally, or is killed with SIGKILL, the lock can be taken again."""
    from jaxmoe.train import loop

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                 "--no-progress", "train.steps=1", "model.num_layers=1", "data.seq_len=32",
                 "train.batch_size=8", "train.eval_batches=1", "train.sample_tokens=0",
                 "train.tensorboard=false", "data.num_documents=100"]) == 0
    capsys.readouterr()
    for stop in ("exit", "kill"):
        holder = _holder(run_dir)
        try:
            before = _files(run_dir)
            with monkeypatch.context() as m:
                m.setattr(loop, "build_trainer", lambda *a, **k: pytest.fail("built"))
                assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir",
                             str(run_dir), "train.steps=2"]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"jaxmoe: config error: --run-dir {run_dir}: another jaxmoe train "
                           f"is running in it (pid {holder.pid} holds {run_dir}/run.lock); "
                           "expected one run per directory")
            assert _files(run_dir) == before
            with pytest.raises(ConfigError):
                with run_lock(run_dir):
                    pass
        finally:
            if stop == "exit":
                holder.communicate("", timeout=30)
            else:
                holder.send_signal(signal.SIGKILL)
                holder.wait(timeout=30)
        with run_lock(run_dir):  # released with its holder
            assert (run_dir / "run.lock").read_text() == f"{os.getpid()}\n"


def test_a_directory_holding_only_a_lock_file_is_a_new_run(tmp_path):
    """A run that died between taking its lock and writing config.yaml leaves run.lock
    alone: that folder is not "other files" (it was refused for ever)."""
    from jaxmoe.train.run_dir import check_run_dir

    (tmp_path / "run.lock").write_text("123\n")
    check_run_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files and no jaxmoe run"):
        check_run_dir(tmp_path)

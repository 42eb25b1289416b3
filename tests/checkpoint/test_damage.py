"""Damaged checkpoints and mismatched configs fail with one line naming the checkpoint, the
array and the problem; nothing is unpickled while reading a checkpoint."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import jax
import pytest

from jaxmoe import cli
from jaxmoe import config as config_lib
from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.damage import CheckpointError, CheckpointMismatch, flat_names
from jaxmoe.checkpoint.inspect import describe
from jaxmoe.checkpoint.run import abstract_state
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import assert_trees_equal, host, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoints dir, host copy of the state, the trainer) for a 1-device tiny model."""
    trainer = build_trainer(tiny_config("mesh.data=1"), jax.devices()[:1])
    with trainer.context():
        state = trainer.init()
    directory = tmp_path_factory.mktemp("damage") / "checkpoints"
    manager = ckpt.make_manager(directory)
    ckpt.save(manager, 3, state, config_lib.to_dict(trainer.cfg), {"batches": 3})
    manager.close()
    return directory, host(state), trainer


def copy(saved, tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved[0], directory)
    return directory


def restore(directory: Path, target):
    return ckpt.restore(ckpt.make_manager(directory, read_only=True), None, target)


def data_files(directory: Path) -> list[Path]:
    """The OCDBT data files of step 3's arrays, largest first."""
    files = [p for p in (directory / "3" / "state").rglob("d/*") if p.is_file()]
    assert files, "no OCDBT data files found"
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def assert_one_line(err: CheckpointError, *parts: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def named_array(message: str, directory: Path) -> str:
    """The array a message names, checked against the arrays the checkpoint holds."""
    name = message.split("array ", 1)[1].split(":", 1)[0]
    manager = ckpt.make_manager(directory, read_only=True)
    stored = flat_names(ckpt.stored_metadata(manager, 3))
    assert name in stored, f"{name} is not an array of the checkpoint"
    return name


def test_intact_copy_restores(saved, tmp_path):
    directory = copy(saved, tmp_path)
    restored = restore(directory, abstract_state(saved[2]))
    assert_trees_equal(restored.state, saved[1])


# When one read fails, orbax abandons the other reads' coroutines in its closed event loop;
# Python reports them as unraisable. They are orbax's clean-up noise, not test failures.
ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ABANDONED_READS
def test_truncated_array_file(saved, tmp_path):
    directory = copy(saved, tmp_path)
    victim = data_files(directory)[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError) as err:
        restore(directory, abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {directory / '3'}: array ", "truncated")
    named_array(str(err.value), directory)


@ABANDONED_READS
def test_export_of_a_damaged_newest_checkpoint_names_the_older_ones(saved, tmp_path):
    """export-params / restore_params of a run whose newest checkpoint is damaged: the line
    also names the older complete checkpoints and one to give instead (as `train` does)."""
    from jaxmoe.checkpoint.inspect import restore_params

    directory = copy(saved, tmp_path)
    shutil.copytree(directory / "3", directory / "2")
    for victim in data_files(directory):  # all: which file holds the params varies by run
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError) as err:
        restore_params(tmp_path)  # the run directory: its newest checkpoint, 3
    assert_one_line(err.value, f"checkpoint {directory / '3'}: array ", "truncated")
    assert str(err.value).endswith(
        f"; older complete checkpoints: [2], e.g. {directory / '2'}")
    restore_params(directory / "2")  # the one named reads


@ABANDONED_READS
def test_missing_array_file(saved, tmp_path):
    directory = copy(saved, tmp_path)
    data_files(directory)[0].unlink()
    with pytest.raises(CheckpointError) as err:
        restore(directory, abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {directory / '3'}: array ", "missing")
    named_array(str(err.value), directory)


def test_missing_metadata_file(saved, tmp_path):
    directory = copy(saved, tmp_path)
    (directory / "3" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointError) as err:
        restore(directory, abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {directory / '3'}: file state/_METADATA is "
                               "missing")


@pytest.mark.parametrize("override, array, stored, expected", [
    ("model.embed_dim=64", "params.embedder.embedding.value", "(512, 128)", "(512, 64)"),
    ("model.num_experts=8", "params.moe.units.block0.ffn.router.kernel.value",
     "(1, 128, 4)", "(1, 128, 8)"),
])
def test_mismatched_config(saved, override, array, stored, expected):
    other = build_trainer(tiny_config("mesh.data=1", override), jax.devices()[:1])
    with pytest.raises(CheckpointError) as err:
        restore(saved[0], abstract_state(other))
    assert_one_line(err.value, f"checkpoint {saved[0] / '3'}: array {array}: stored shape "
                               f"{stored} but the config expects {expected}",
                    "more mismatches")


def test_missing_array_in_checkpoint(saved):
    """A model with an extra layer needs arrays the checkpoint does not have."""
    other = build_trainer(tiny_config("mesh.data=1", "model.qk_norm=true"), jax.devices()[:1])
    with pytest.raises(CheckpointError) as err:
        restore(saved[0], abstract_state(other))
    assert_one_line(err.value, "missing from the checkpoint", "norm")


def test_extra_array_in_checkpoint(saved, tmp_path):
    """A checkpoint of a model with query/key norms restored into one without them."""
    trainer = build_trainer(tiny_config("mesh.data=1", "model.qk_norm=true"), jax.devices()[:1])
    with trainer.context():
        state = trainer.init()
    manager = ckpt.make_manager(tmp_path / "checkpoints", async_save=False)
    ckpt.save(manager, 3, state, config_lib.to_dict(trainer.cfg))
    manager.close()
    extra = sorted(set(flat_names(abstract_state(trainer))) -
                   set(flat_names(abstract_state(saved[2]))))
    assert extra and all("norm" in name for name in extra), extra
    with pytest.raises(CheckpointError) as err:
        restore(tmp_path / "checkpoints", abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {tmp_path / 'checkpoints' / '3'}: array {extra[0]}: "
                               "in the checkpoint but not in the model this config builds (and "
                               f"{len(extra) - 1} more mismatches); the config does not match")


def test_mismatched_dtype(saved):
    """float32 arrays are not cast to a bfloat16 config's parameters (and optimizer state)."""
    other = build_trainer(tiny_config("mesh.data=1", "model.param_dtype=bfloat16"),
                          jax.devices()[:1])
    with pytest.raises(CheckpointMismatch) as err:
        restore(saved[0], abstract_state(other))
    assert_one_line(err.value, f"checkpoint {saved[0] / '3'}: array "
                               "params.embedder.embedding.value: stored as float32 but the config "
                               "expects bfloat16 (and ",
                    "resume with model.param_dtype=float32",
                    f"jaxmoe checkpoint export-params {saved[0] / '3'} OUT --dtype bfloat16")


def test_missing_config_item(saved, tmp_path):
    directory = copy(saved, tmp_path)
    shutil.rmtree(directory / "3" / "config")
    with pytest.raises(CheckpointError) as err:
        restore(directory, abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {directory / '3'}: item config is missing")


@pytest.mark.parametrize("item, file", [("config", "metadata"),
                                        ("data", "process_0-of-1.json")])
def test_damaged_json_item(saved, tmp_path, item, file):
    """A JSON item cut short names the item and json's error, not the decoder's internal
    StopIteration('10') the chain ends with (which was reported as "item data: 10").
    Reference: json.loads('{"model": ') says "Expecting value: line 1 column 11 (char 10)"."""
    directory = copy(saved, tmp_path)
    (directory / "3" / item / file).write_text('{"model": ')
    with pytest.raises(CheckpointError) as err:
        restore(directory, abstract_state(saved[2]))
    assert_one_line(err.value, f"checkpoint {directory / '3'}: item {item}: not valid JSON "
                               "(Expecting value: line 1 column 11 (char 10))")


def test_cli_reports_one_line(saved, tmp_path, capsys):
    directory = copy(saved, tmp_path)
    (directory / "3" / "state" / "_METADATA").unlink()
    assert cli.main(["checkpoint", "inspect", str(directory)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxmoe: checkpoint ") and "\n" not in err, err


@pytest.mark.parametrize("file", ["config/metadata", "data/process_0-of-1.json"])
def test_cli_inspect_of_damaged_json_names_the_file(saved, tmp_path, capsys, file):
    """`checkpoint inspect` of a checkpoint whose config or data position is cut short: one
    line naming the file and json's error, exit 1 like other damage (it was a traceback).
    Reference: json.loads('{"model": ') says "Expecting value: line 1 column 11 (char 10)"."""
    directory = copy(saved, tmp_path)
    (directory / "3" / file).write_text('{"model": ')
    assert cli.main(["checkpoint", "inspect", str(directory)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"jaxmoe: checkpoint {directory / '3'}: file {file}: not valid JSON "
                   "(Expecting value: line 1 column 11 (char 10)); the checkpoint is damaged")


def test_cli_export_of_a_truncated_checkpoint_prints_one_line(saved, tmp_path):
    """In a fresh process (as a user runs it): stderr is the one error line. (A review saw
    orbax's abandoned reads add "Exception ignored in: <coroutine ...>" pages in about one
    run in ten; not reproduced here: the filter is tested on its own below.)"""
    import os
    import subprocess
    import sys

    directory = copy(saved, tmp_path)
    for victim in data_files(directory):  # all: which file holds the params varies by run
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmoe.cli", "checkpoint", "export-params", str(directory),
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxmoe: checkpoint "), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_abandoned_orbax_reads_are_not_reported(monkeypatch, caplog):
    """cli._drop_abandoned_reads: a suspended coroutine of orbax's that raises when it is
    closed is not reported, nor asyncio's "Task exception was never retrieved" (the form a
    fresh-clone run of the test above printed, 8 lines); any other unraisable exception and
    asyncio message still are."""
    import logging
    import sys

    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    cli._drop_abandoned_reads()
    hook = sys.unraisablehook
    cli._drop_abandoned_reads()  # a second checkpoint error in the process: not wrapped again
    assert sys.unraisablehook is hook

    class Suspend:
        def __await__(self):
            yield

    def abandoned(filename):
        code = ("async def read():\n    try:\n        await Suspend()\n"
                "    finally:\n        raise ValueError('read failed')\n")
        namespace = {"Suspend": Suspend}
        exec(compile(code, filename, "exec"), namespace)
        coroutine = namespace["read"]()
        coroutine.send(None)  # suspended, as when orbax's event loop was closed
        del coroutine  # collected: closing it raises in the finally, an unraisable error

    abandoned("/site-packages/orbax/checkpoint/serialization.py")
    assert reported == []
    abandoned("/elsewhere/mine.py")
    assert len(reported) == 1 and str(reported[0].exc_value) == "read failed"
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task ...>")
        asyncio_log.error("Executing <Task ...> took 1.2 seconds")
    assert [r.getMessage() for r in caplog.records] == ["Executing <Task ...> took 1.2 seconds"]


def test_nothing_is_unpickled(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint read called pickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    restored = restore(saved[0], abstract_state(saved[2]))
    assert_trees_equal(restored.state, saved[1])
    assert "params.lm_head.value" in describe(saved[0])

"""One-line errors of the checkpoint API, compared in full: restoring from a directory with
no complete checkpoint or a step it lacks, a keep-nothing manager, inspecting a run with
only unfinished saves, setting a step folder aside next to an earlier one (nothing is
overwritten), logits asked with segment ids of the wrong shape; and the steps such
lines name: the newest found by number, the older ones shortened to the newest five.

Arrays are a small dict saved with `async_save=False` (nothing compiles); the model of the
logits test holds abstract parameters (the shapes are checked before any forward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.damage import CheckpointError, older_steps_text
from jaxmoe.checkpoint.inspect import resolve_step_dir
from jaxmoe.convert.api import LoadedModel
from jaxmoe.model import MoETransformer
from tests.checkpoint._helpers import fake_step_folder
from tests.convert.helpers import jaxmoe_config

TARGET = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}


def test_restore_without_a_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = ckpt.make_manager(directory, async_save=False)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(manager, None, TARGET)
    manager.close()
    assert str(err.value) == f"checkpoint directory {directory}: no complete checkpoint"


def test_restore_of_a_missing_step_lists_the_complete_ones(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = ckpt.make_manager(directory, async_save=False)
    for step in (3, 7):
        ckpt.save(manager, step, {"w": jnp.full((3,), float(step))}, {"c": 1}, {"b": step})
    manager.wait_until_finished()
    (directory / "5").mkdir()  # a step folder that is not a checkpoint is not listed
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(manager, 4, TARGET)
    assert str(err.value) == (f"checkpoint {directory / '4'}: no such checkpoint (complete "
                              "steps: [3, 7])")
    restored = ckpt.restore(manager, 3, TARGET)  # the steps it names do restore
    manager.close()
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), [3.0, 3.0, 3.0])


def test_manager_must_keep_a_checkpoint(tmp_path):
    with pytest.raises(ValueError) as err:
        ckpt.make_manager(tmp_path / "checkpoints", keep_last=0)
    assert str(err.value) == "keep_last=0: expected >= 1"
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was created


def test_inspect_with_only_unfinished_saves(tmp_path):
    """Saves that never finished are named (sorted); a set-aside folder and a step folder
    without state/ are neither checkpoints nor unfinished saves."""
    run_dir = tmp_path / "run"
    directory = run_dir / "checkpoints"
    for name in ("5.orbax-checkpoint-tmp-2", "3.orbax-checkpoint-tmp-17", "4.incomplete", "6"):
        (directory / name).mkdir(parents=True)
    expected = ("no complete checkpoint (expected a run directory, its checkpoints/ folder, a "
                "step folder holding state/, or an export)")
    for path in (run_dir, str(directory)):
        with pytest.raises(CheckpointError) as err:
            resolve_step_dir(path)
        assert str(err.value) == (f"{path}: {expected}; incomplete saves: "
                                  "3.orbax-checkpoint-tmp-17, 5.orbax-checkpoint-tmp-2")
    for name in ("5.orbax-checkpoint-tmp-2", "3.orbax-checkpoint-tmp-17"):
        (directory / name).rmdir()
    with pytest.raises(CheckpointError) as err:
        resolve_step_dir(run_dir)
    assert str(err.value) == f"{run_dir}: {expected}"


def test_a_file_or_missing_path_is_named_as_such(tmp_path):
    """`jaxmoe checkpoint inspect c1.json` said "no such directory" for a file; the
    conversion reader (load_checkpoint, to-hf) likewise."""
    from jaxmoe.convert.orbax_io import CheckpointFormatError, resolve_checkpoint

    a_file = tmp_path / "c1.json"
    a_file.write_text("{}")
    for resolve, error in ((resolve_step_dir, CheckpointError),
                           (resolve_checkpoint, CheckpointFormatError)):
        with pytest.raises(error) as err:
            resolve(a_file)
        assert str(err.value) == f"{a_file}: is a file; expected a directory"
        with pytest.raises(error) as err:
            resolve(tmp_path / "none")
        assert str(err.value) == f"{tmp_path / 'none'}: no such directory"


def test_the_newest_step_is_found_by_number(tmp_path):
    """Steps 9 and 10: step 10 is the newest ("10" sorts before "9" as text). Reference: the
    folders made here by hand, with the files Orbax's finished saves hold
    (`manager.STEP_FILES`)."""
    for step in (9, 10):
        fake_step_folder(tmp_path, step)
    assert resolve_step_dir(tmp_path) == tmp_path / "10"


def test_older_steps_text_shows_the_newest_five():
    """Reference: the lists written out by hand (the newest five steps, after "...")."""
    assert older_steps_text(list(range(1, 9))) == \
        "older complete checkpoints: [..., 4, 5, 6, 7, 8]"
    assert older_steps_text([2, 4, 6, 8, 10]) == "older complete checkpoints: [2, 4, 6, 8, 10]"
    assert older_steps_text([3]) == "older complete checkpoints: [3]"


@pytest.mark.parametrize("command", ["inspect", "export-params"])
def test_a_path_that_names_no_checkpoint_is_bad_input(tmp_path, capsys, command):
    """A missing path, a file, or an empty folder: one line, exit 2 (bad input, as convert
    gives), not the exit 1 of a damaged checkpoint. Reference: the messages in full."""
    from jaxmoe import cli

    a_file = tmp_path / "c1.json"
    a_file.write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, why in ((tmp_path / "none", "no such directory"),
                      (a_file, "is a file; expected a directory"),
                      (empty, "no complete checkpoint (expected a run directory, its "
                              "checkpoints/ folder, a step folder holding state/, or an "
                              "export)")):
        extra = [str(tmp_path / "out")] if command == "export-params" else []
        assert cli.main(["checkpoint", command, str(path), *extra]) == 2
        assert capsys.readouterr().err == f"jaxmoe: {path}: {why}\n"


def test_set_aside_never_overwrites(tmp_path):
    """`3/` set aside twice while `3.incomplete/` (from an earlier run) exists: the next free
    names `.incomplete-2`, `.incomplete-3` are taken; every folder keeps its own files."""
    earlier = tmp_path / "3.incomplete"
    earlier.mkdir()
    (earlier / "marker").write_text("earlier")
    for n, text in ((2, "second"), (3, "third")):
        step = tmp_path / "3"
        step.mkdir()
        (step / "marker").write_text(text)
        assert ckpt.set_aside(step) == tmp_path / f"3.incomplete-{n}"
        assert not step.exists()
    assert {p.name: (p / "marker").read_text() for p in tmp_path.iterdir()} == {
        "3.incomplete": "earlier", "3.incomplete-2": "second", "3.incomplete-3": "third"}


@pytest.fixture(scope="module")
def model():
    """The conversion tests' tiny Mixtral as `load_checkpoint` returns it, but with abstract
    parameters (nothing is initialised or read)."""
    cfg = jaxmoe_config("mixtral")
    abstract = nnx.eval_shape(lambda: MoETransformer(cfg.model, nnx.Rngs(0)))
    return LoadedModel(cfg, *nnx.split(abstract, nnx.Param, ...))


@pytest.mark.parametrize("tokens, segment_ids, shapes", [
    ([[1, 2, 3]], [[1, 1]], "(1, 2): expected (1, 3)"),
    ([[1, 2, 3]], [1, 1, 1], "(3,): expected (1, 3)"),  # not broadcast
    ([[1, 2, 3], [4, 5, 6]], [[1, 1], [1, 1], [1, 1]], "(3, 2): expected (2, 3)"),
], ids=["short", "unbatched", "transposed"])
def test_logits_segment_ids_must_match_tokens(model, tokens, segment_ids, shapes):
    with pytest.raises(ValueError) as err:
        model.logits(tokens, segment_ids)
    assert str(err.value) == f"segment_ids shape {shapes}"


@pytest.mark.parametrize("stored_data, change, refused", [
    # the synthetic corpus: its seed, size and held-out fraction decide the train stream
    ({"source": "synthetic"}, {"seed": 5}, ["data.seed=0 -> 5"]),
    ({"source": "synthetic"}, {"eval_fraction": 0.1}, ["data.eval_fraction=0.05 -> 0.1"]),
    ({"source": "synthetic"}, {"shuffle": False}, ["data.shuffle=True -> False"]),
    # packing and worker processes: grain's saved state has another shape (KeyError before)
    ({"source": "synthetic"}, {"packing": False}, ["data.packing=True -> False"]),
    ({"source": "synthetic"}, {"num_workers": 1}, ["data.num_workers=0 -> 1"]),
    # read-ahead and row length: the saved position still fits
    ({"source": "synthetic"}, {"num_threads": 2, "prefetch_buffer_size": 8, "seq_len": 64,
                               "worker_buffer_size": 4}, []),
    # files: the synthetic seed/size play no part; with held-out files neither does the
    # fraction, and moving them elsewhere leaves the train stream alone
    ({"source": "jsonl", "paths": ["a.jsonl"]}, {"seed": 5, "num_documents": 9}, []),
    ({"source": "jsonl", "paths": ["a.jsonl"], "eval_paths": ["e.jsonl"]},
     {"eval_fraction": 0.1, "eval_paths": ["/moved/e.jsonl"]}, []),
    ({"source": "jsonl", "paths": ["a.jsonl"], "eval_paths": ["e.jsonl"]},
     {"eval_paths": []}, ["data.eval_paths=['e.jsonl'] -> []"]),
    ({"source": "jsonl", "paths": ["a.jsonl"]}, {"paths": ["b.jsonl"]},
     ["data.paths=['a.jsonl'] -> ['b.jsonl']"]),
])
def test_data_settings_a_resume_must_keep(stored_data, change, refused):
    """run.stream_keys / fixed_setting_changes: the changes of the data settings that decide
    the train stream (refused on resume without train.restart_data), and only those.
    Reference: the expected refusals written out per case."""
    from jaxmoe import config as config_lib
    from jaxmoe.checkpoint.run import fixed_setting_changes, stream_keys

    base = config_lib.to_dict(config_lib.load_config(None, []))
    stored = {**base, "data": {**base["data"], **stored_data}}
    current = {**stored, "data": {**stored["data"], **change}}
    got = fixed_setting_changes(stored, current, stream_keys(stored["data"]))
    assert got == refused


def test_checkpoint_dir_is_absolute_and_normalised(tmp_path, monkeypatch):
    """Printed checkpoint paths carry no `..` (`--run-dir ../runs/x` printed
    `/work/repo/../runs/x/checkpoints/40`); symlinks are kept as named, not resolved."""
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert ckpt.checkpoint_dir("../runs/x") == tmp_path / "runs" / "x" / "checkpoints"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "repo")
    assert ckpt.checkpoint_dir(link / "run") == link / "run" / "checkpoints"
    (tmp_path / "export").mkdir()  # what inspect, export-params and init_from read
    (tmp_path / "export" / "export.json").write_text("{}")
    assert resolve_step_dir("../export") == tmp_path / "export"


def test_write_problem_drops_a_spec_with_brackets_of_its_own():
    """The OS reason comes first even when TensorStore's spec, which holds brackets of its
    own, sits before it (the spec's tail was taken for the reason: `[0,0]}}'] (errno 27)`,
    in about 1 of 6 full-disk test runs). Reference: the message written here."""
    from jaxmoe.checkpoint.damage import write_problem

    spec = ('{"driver":"zarr3","metadata":{"chunk_grid":{"configuration":'
            '{"chunk_shape":[0,0]}}}}')
    message = ('OUT_OF_RANGE: Error writing "a/zarr.json": Failed writing: "/x/f": File too '
               f"large [tensorstore_spec='{spec}'] [os_error_code='27']")
    assert write_problem(OSError(message)) == (
        'File too large (errno 27): OUT_OF_RANGE: Error writing "a/zarr.json": Failed '
        'writing: "/x/f": File too large [os_error_code=\'27\']')


class _Position:
    """A data iterator's state, as the checkpointer asks for it."""

    def get_state(self) -> dict:
        return {"position": 3}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_state_holding_nan_or_inf_is_not_saved(tmp_path, bad):
    """keep_checkpoints=1: a diverged state (one NaN or inf in a bfloat16 leaf) after a good
    step 1 is refused before anything is written, so step 1 is not rotated out. Reference:
    the steps on disk and the whole message."""
    from jaxmoe.checkpoint.run import RunCheckpointer
    from tests.checkpoint._helpers import tiny_config

    run = RunCheckpointer(tmp_path, tiny_config("train.keep_checkpoints=1"))
    good = {"w": jnp.ones((4,), jnp.float32), "m": jnp.ones((2,), jnp.bfloat16),
            "count": jnp.arange(3)}
    try:
        run.save(1, good, _Position(), wait=True)
        diverged = {**good, "m": jnp.asarray([1.0, bad], jnp.bfloat16)}
        with pytest.raises(FloatingPointError) as e:
            run.save(2, diverged, _Position())
        assert str(e.value) == (
            f"step 2: the train state holds NaN or inf; not saved (the latest checkpoint, "
            f"{run.path(1)}, is kept); expected finite values: lower "
            "train.optimizer.learning_rate or check the data")
        run.save(3, {**good, "w": good["w"] * 2}, _Position(), wait=True)  # finite: saved
    finally:
        run.close()
    assert ckpt.make_manager(run.directory, keep_last=1).all_steps() == [3]

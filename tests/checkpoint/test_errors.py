"""One-line errors of the checkpoint API, compared in full: restoring from a directory with
no complete checkpoint or a step it lacks, a keep-nothing manager, inspecting a run with
only unfinished saves, setting a step folder aside next to an earlier one (nothing is
overwritten), and logits asked with segment ids of the wrong shape.

Arrays are a small dict saved with `async_save=False` (nothing compiles); the model of the
logits test holds abstract parameters (the shapes are checked before any forward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.damage import CheckpointError
from jaxmoe.checkpoint.inspect import resolve_step_dir
from jaxmoe.convert.api import LoadedModel
from jaxmoe.model import MoETransformer
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

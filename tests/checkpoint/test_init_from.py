"""`train.init_from`: a fresh run starts from another checkpoint's parameters.

Reference: the arrays saved here (a seeded random "trained" state), compared bitwise; the
fresh state `trainer.init()` builds for what must stay fresh (optimizer, step).
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from jaxmoe.checkpoint.damage import CheckpointMismatch
from jaxmoe.checkpoint.inspect import export_params
from jaxmoe.checkpoint.run import RunCheckpointer
from jaxmoe.cli import main
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import (
    DataIterator,
    assert_trees_equal,
    host,
    perturbed,
    tiny_config,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir with a checkpoint at step 3, its params-only export, the saved state)."""
    cfg = tiny_config()
    trainer = build_trainer(cfg, jax.devices()[:1])
    with trainer.context():
        state = perturbed(trainer.init(), seed=7)
    state = dataclasses.replace(state, step=jax.numpy.asarray(3, state.step.dtype))
    root = tmp_path_factory.mktemp("init_from")
    checkpoints = RunCheckpointer(root / "run", cfg, async_save=False)
    checkpoints.save(3, state, DataIterator(3), wait=True)
    checkpoints.close()
    export_params(root / "run", root / "export")
    return root / "run", root / "export", host(state)


def _start(run_dir, source, capsys, *overrides, devices=1):
    """(state, step, log) of a fresh run in `run_dir` with train.init_from=source."""
    cfg = tiny_config(f"train.init_from={source}", *overrides)
    trainer = build_trainer(cfg, jax.devices()[:devices])
    checkpoints = RunCheckpointer(run_dir, cfg, async_save=False)
    try:
        state, step = checkpoints.restore_or_init(trainer, DataIterator())
    finally:
        checkpoints.close()
    with trainer.context():
        fresh = host(trainer.init())
    return state, step, capsys.readouterr().out, fresh


@pytest.mark.parametrize("source", ["export", "run"])
def test_a_fresh_run_starts_from_the_checkpoints_parameters(trained, tmp_path, capsys, source):
    """Params and router biases are the saved ones, bitwise, read onto a 2-device FSDP mesh
    (the source was saved from one device); step and optimizer state are fresh."""
    run, export, saved = trained
    path = export if source == "export" else run
    state, step, log, fresh = _start(tmp_path / "new", path, capsys, "mesh.data=1",
                                     "mesh.fsdp=2", devices=2)
    assert step == 0
    assert_trees_equal(state.params, saved.params)
    assert_trees_equal(state.rest, saved.rest)
    assert_trees_equal(state.opt_state, fresh.opt_state)
    assert int(state.step) == 0
    sharded = [x for x in jax.tree.leaves(state.params) if len(x.sharding.device_set) == 2]
    assert sharded, "nothing was read onto the FSDP mesh"
    where = export if source == "export" else run / "checkpoints" / "3"
    assert (f"checkpoint: initialised the parameters from {where.absolute()}; the optimizer "
            "starts afresh") in log


def test_a_bfloat16_export_is_cast_to_the_models_dtype(trained, tmp_path, capsys):
    """Reference: the saved float32 values rounded to bfloat16 (by numpy via ml_dtypes)."""
    run, _, saved = trained
    export_params(run, tmp_path / "bf16", dtype="bfloat16")
    state, _, _, _ = _start(tmp_path / "new", tmp_path / "bf16", capsys)
    for got, want in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(saved.params)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(jax.numpy.bfloat16).astype(np.float32))


def test_a_checkpoint_of_another_model_is_refused_in_one_line(trained, tmp_path, capsys):
    _, export, _ = trained
    with pytest.raises(CheckpointMismatch) as err:
        _start(tmp_path / "new", export, capsys, "model.num_experts=8")
    message = str(err.value)
    assert message.startswith(f"train.init_from={export}: checkpoint {export.absolute()}: "
                              "array ") and "stored shape" in message and "\n" not in message


def test_a_resumed_run_ignores_init_from(trained, tmp_path, capsys):
    """The run's own checkpoint wins (a job script that keeps the flag must not reset it)."""
    run, export, saved = trained
    state, step, log, _ = _start(run, export, capsys)
    assert step == 3 and "train.init_from=" in log and "ignored" in log
    assert_trees_equal(state.opt_state, saved.opt_state)


def test_cli_refuses_a_bad_init_from_before_starting_and_a_resume_ignores_it(tmp_path,
                                                                              capsys):
    """A missing folder or one without a checkpoint: one config-error line (exit 2) before
    the run directory is made. A run that resumes does not read it (its source may be gone
    by the time a preempted job resumes): a missing one was refused and blocked the resume."""
    base = ["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(tmp_path / "r"),
            "--no-progress", "train.sample_tokens=0", "train.eval_batches=1",
            "train.batch_size=8", "data.seq_len=64"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, why in ((tmp_path / "none", "no such directory"),
                     (empty, "no complete checkpoint (expected a run directory, its "
                             "checkpoints/ folder, a step folder holding state/, or an "
                             "export)")):
        assert main(base + ["train.steps=1", f"train.init_from={bad}"]) == 2
        assert capsys.readouterr().err == f"jaxmoe: config error: train.init_from: {bad}: {why}\n"
        assert not (tmp_path / "r").exists()
    assert main(base + ["train.steps=1"]) == 0
    capsys.readouterr()
    assert main(base + ["train.steps=2", f"train.init_from={tmp_path / 'none'}"]) == 0
    assert f"train.init_from={tmp_path / 'none'} ignored" in capsys.readouterr().out


def test_cli_refuses_another_models_checkpoint_before_starting(trained, tmp_path, capsys):
    """A source whose shapes are not the config's model (a run with an older step too):
    exit 2, one line naming train.init_from and the first mismatching array, no "older
    complete checkpoints" hint (they would not fit either), and no run directory left
    behind (it was made before the parameters were read, and the exit code was 1)."""
    run, _, _ = trained
    source = tmp_path / "source"
    shutil.copytree(run, source)
    shutil.copytree(source / "checkpoints" / "3", source / "checkpoints" / "2")
    run_dir = tmp_path / "r"
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                 "--no-progress", "train.steps=1", "model.num_experts=8",
                 f"train.init_from={source}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxmoe: train.init_from={source}: checkpoint "
                          f"{source.absolute() / 'checkpoints' / '3'}: array "), err
    assert err.endswith("the config does not match the checkpoint\n") and err.count("\n") == 1
    assert not run_dir.exists()


def test_an_imported_hugging_face_model_starts_a_run(tmp_path, capsys):
    """Fine-tuning a `jaxmoe convert from-hf` output: its config.json is the run's config,
    its arrays the start. Reference: the same arrays as `load_checkpoint` reads them."""
    from jaxmoe.config import load_config
    from jaxmoe.convert import from_hf, load_checkpoint
    from tests.convert.helpers import save_random_hf

    imported = tmp_path / "imported"
    from_hf(save_random_hf("mixtral", tmp_path / "hf"), imported)
    cfg = load_config(imported / "config.json", [f"train.init_from={imported}"])
    trainer = build_trainer(cfg, jax.devices()[:1])
    checkpoints = RunCheckpointer(tmp_path / "run", cfg, async_save=False)
    state, step = checkpoints.restore_or_init(trainer, DataIterator())
    checkpoints.close()
    assert step == 0
    assert_trees_equal(state.params, load_checkpoint(imported).params)


def test_other_model_numerics_load_and_are_named(trained, tmp_path, capsys):
    """Same names and shapes, another rope_theta: it loads (the user may mean it) and the
    log names the difference against the source's stored config (it loaded silently)."""
    _, export, saved = trained
    state, _, log, _ = _start(tmp_path / "new", export, capsys, "model.rope_theta=500000")
    assert_trees_equal(state.params, saved.params)
    assert (f"checkpoint: model settings differ from {export.absolute()}'s: model.rope_theta: "
            "10000.0 -> 500000.0") in log.splitlines()
    _, _, same, _ = _start(tmp_path / "same", export, capsys)
    assert "model settings differ" not in same

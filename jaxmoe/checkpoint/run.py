"""Checkpointing policy of one training run: resume, periodic async saves, preemption.

The training loop calls, in order:
    ckpt = RunCheckpointer(run_dir, cfg)          # logs and removes unfinished saves, sets
                                                  # aside step folders that are not complete
    state, start = ckpt.restore_or_init(trainer, train_iter)
    with PreemptionGuard() as guard:
        for step in range(start + 1, steps + 1):
            ...train...
            ckpt.maybe_save(step, state, train_iter)     # every train.checkpoint_every (async)
            if guard.should_stop(step):
                ckpt.save(step, state, train_iter, wait=True); return
    ckpt.save(steps, state, train_iter, wait=True); ckpt.close()
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.fingerprint import changes as input_changes
from jaxmoe import config as config_lib
from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint import priority
from jaxmoe.checkpoint.damage import CheckpointError, CheckpointMismatch, older_steps_text
from jaxmoe.checkpoint.init_from import init_from
from jaxmoe.checkpoint.inspect import read_config
from jaxmoe.checkpoint.save_failure import QuietSaveFailures, check_writable, save_error
from jaxmoe.checkpoint.snapshot import StateSnapshot


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"checkpoint: {message}", flush=True)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`["train.steps: 10 -> 20", ...]`: the dotted keys whose values differ."""
    # Through JSON first: the stored config went through it (tuples became lists).
    a, b = _flat(json.loads(json.dumps(stored))), _flat(json.loads(json.dumps(current)))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


# Settings a resumed run shares with its checkpoint. The tokenizer's: under another one the
# trained model's token ids change meaning. The data stream's: the saved iterator position
# belongs to that stream (train.restart_data=true reads the new stream from its beginning);
# packing and the worker count also change the shape of grain's saved state.
TOKENIZER_KEYS = ("data.tokenizer", "data.pad_token", "data.bos_token", "data.eos_token",
                  "data.add_bos", "data.add_eos")
STREAM_KEYS = ("data.source", "data.paths", "data.sources", "data.text_field", "data.shuffle",
               "data.packing", "data.num_workers", "train.seed")


def stream_keys(data: dict[str, Any]) -> tuple[str, ...]:
    """The settings that decide the train stream of the data config `data` (as stored):
    the synthetic corpus's seed and size only when it is read; which files are held out only
    as far as there are held-out files at all; the held-out fraction only without them."""
    sources = data.get("sources") or [data]
    keys = list(STREAM_KEYS) + ["data.eval_paths?"]
    if any(s.get("source") == "synthetic" for s in sources):
        keys += ["data.seed", "data.num_documents"]
    if any(not s.get("eval_paths") for s in sources):
        keys.append("data.eval_fraction")
    return tuple(keys)


def fixed_setting_changes(stored: dict[str, Any], current: dict[str, Any],
                          keys: tuple[str, ...]) -> list[str]:
    """`config_diff` lines of `keys` whose value the checkpoint's config holds and this one
    changes (a key an older checkpoint lacks is not a change). A key ending in `?` compares
    only whether the value is empty."""
    a, b = _flat(json.loads(json.dumps(stored))), _flat(json.loads(json.dumps(current)))
    out = []
    for key in keys:
        k, emptiness = key.rstrip("?"), key.endswith("?")
        if k in a and ((bool(a[k]) != bool(b.get(k))) if emptiness else a[k] != b.get(k)):
            out.append(f"{k}={a[k]!r} -> {b.get(k)!r}")
    return out


def abstract_state(trainer: Any) -> Any:
    """ShapeDtypeStructs (with the trainer's shardings) of the state `trainer.init` builds."""
    abstract = jax.eval_shape(trainer.init)
    missing = [a for a in jax.tree.leaves(abstract) if getattr(a, "sharding", None) is None]
    if missing:
        raise CheckpointError(f"trainer.init: {len(missing)} outputs have no sharding; "
                              "expected a jit with out_shardings")
    return abstract


@jax.jit
def _all_finite(state: Any) -> jax.Array:
    """True when every floating-point array of `state` is free of NaN and inf (a scalar)."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _other_shard(data_state: dict[str, Any], train_iter: Any) -> bool:
    """Whether a saved data position belongs to another data shard than the iterator's
    (states saved before shards were recorded: assumed the same)."""
    saved, current = data_state.get("shard"), getattr(train_iter, "shard", None)
    return saved is not None and current is not None and list(saved) != list(current)


class RunCheckpointer:
    """Saves and restores the checkpoints of one run directory (`run_dir/checkpoints`)."""

    def __init__(self, run_dir: str | Path, cfg: config_lib.Config, *,
                 async_save: bool = True):
        self.directory = ckpt.checkpoint_dir(run_dir)
        self.cfg = cfg
        # Refused now, not at the first save after hours of training (every process says so)
        problem = check_writable(self.directory) if jax.process_index() == 0 else ""
        if jax.process_count() > 1:
            from sharding.multihost import said_by
            problem = said_by(problem)
        if problem:
            raise CheckpointError(problem)
        self._config = config_lib.to_dict(cfg)
        for path in ckpt.incomplete_checkpoints(self.directory):
            _log(f"ignoring incomplete checkpoint {path} (its save never finished, e.g. the "
                 "process was killed while writing); removing it")
            if jax.process_index() == 0:  # now, not in orbax's background clean-up
                shutil.rmtree(path, ignore_errors=True)
        # A folder named by a step number but lacking a file every finished save writes (an
        # interrupted copy) would be taken for the latest checkpoint, and block saving that
        # step again: it is renamed to `<step>.incomplete`, which Orbax does not read.
        for path, lack in ckpt.unfinished_steps(self.directory):
            if jax.process_index() == 0:
                aside = ckpt.set_aside(path)
                _log(f"ignoring incomplete checkpoint {path} ({lack}; not a finished save, "
                     f"e.g. an interrupted copy); moved it to {aside}")
        if jax.process_count() > 1:  # every process lists the steps after the renames
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxmoe: unfinished checkpoints set aside")
        t = cfg.train
        self.manager = ckpt.make_manager(self.directory, keep_last=t.keep_checkpoints,
                                         keep_every=t.keep_every, async_save=async_save)
        self._snapshot = StateSnapshot() if async_save and t.checkpoint_snapshot else None
        self.last_saved = self.manager.latest_step()
        self._pending: int | None = None  # the step an async save is writing
        self._quiet = QuietSaveFailures()  # its failure is raised here, in one line
        self._quiet.install()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def restore_or_init(self, trainer: Any, train_iter: Any) -> tuple[Any, int]:
        """(state, step): the latest complete checkpoint, or a fresh `trainer.init()` at 0.

        The data iterator is moved to where the checkpointed run stood, so the resumed run
        sees exactly the batches the uninterrupted run would have seen. When async saves
        will read a copy of the state (snapshot.py), its memory is taken now: a host that
        cannot hold it fails here, not at the first save hours later."""
        state, step = self._restore_or_init(trainer, train_iter)
        if self._snapshot is not None and self.cfg.train.checkpoint_every \
                and step < self.cfg.train.steps:
            self._snapshot.take(state)
            if self._snapshot.nbytes:
                _log(f"holding a {self._snapshot.nbytes / 1e9:.2f} GB copy of the train state "
                     "for async saves to write from (train.checkpoint_snapshot=false: none)")
        return state, step

    def _restore_or_init(self, trainer: Any, train_iter: Any) -> tuple[Any, int]:
        step = self.manager.latest_step()
        if step is None:
            return self._fresh_state(trainer), 0
        changed: list[str] = []  # the settings of the train stream that differ
        arrays_fit = []  # set once the stored arrays' names and shapes were found to fit

        def check(config: dict[str, Any], data_state: dict[str, Any] | None) -> None:
            arrays_fit.append(True)
            changed.extend(self._check_settings(step, config, data_state, train_iter))

        try:
            restored = ckpt.restore(self.manager, step, abstract_state(trainer),
                                    before_state=check)
            stored_step = int(np.asarray(jax.device_get(restored.state.step)))
            if stored_step != step:
                raise CheckpointError(f"checkpoint {self.path(step)}: array step holds "
                                      f"{stored_step}, expected {step}; the checkpoint is "
                                      "damaged")
        except CheckpointMismatch as e:  # the config's fault: older checkpoints would not fit
            if arrays_fit:
                raise
            raise CheckpointMismatch(f"{e}{self._model_changes(step)}") from e
        except CheckpointError as e:  # damaged: no silent fallback, but say what to do
            older = [s for s in self.manager.all_steps() if s < step]
            if not older:
                raise
            raise CheckpointError(
                f"{e}; {older_steps_text(older)}; move "
                f"{self.path(step)} aside (e.g. rename it to {step}.damaged) to resume from "
                f"step {older[-1]}") from e
        restart = self.cfg.train.restart_data
        if restart and not changed:  # a flag left in a job script restarts nothing
            _log("train.restart_data=true ignored: the data settings are the checkpoint's, so "
                 "the data continues from where it stood")
        if restart and changed:
            _log(f"train.restart_data=true: the data starts from its beginning, not from where "
                 f"{self.path(step)} stood")
        elif restored.data_state is not None and _other_shard(restored.data_state, train_iter):
            # The mesh changed which rows this process feeds (e.g. tensor parallelism across
            # hosts added or removed): that position belongs to another shard of the data.
            _log(f"{self.path(step)} holds the data position of data shard "
                 f"{restored.data_state['shard']} (shard, shards), this run reads "
                 f"{list(train_iter.shard)}; the data restarts from its beginning, so "
                 "batches differ from the interrupted run")
        elif restored.data_state is not None:
            try:
                train_iter.set_state(restored.data_state)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointMismatch(
                    f"checkpoint {self.path(step)}: the data-iterator state does not fit "
                    f"this data config ({type(e).__name__}: {e})") from e
        else:
            saved = sorted({n for _, n in ckpt.saved_data_states(self.path(step))})
            counts = " or ".join(map(str, saved))
            what = (f"holds the data-iterator states of {counts} processes, this run has "
                    f"{jax.process_count()}" if saved else "has no data-iterator state")
            _log(f"{self.path(step)} {what}; the data restarts from its beginning, so batches "
                 "differ from the interrupted run")
        diff = config_diff(restored.config, self._config)
        if diff:
            _log(f"config differs from the checkpoint's: {'; '.join(diff)}")
        _log(f"resumed from {self.path(step)} (step {step})")
        if self.cfg.train.init_from:  # a job script that keeps the flag: the run's own wins
            _log(f"train.init_from={self.cfg.train.init_from} ignored: the run resumes from "
                 "its own checkpoint")
        return restored.state, step

    def _model_changes(self, step: int) -> str:
        """`"; model settings differ: model.num_experts: 8 -> 4; ..."`: why the arrays of
        checkpoint `step` do not fit (a name or shape names an array, not the setting), and
        the config to resume with; "" when its stored config cannot be read."""
        try:
            stored = (read_config(self.path(step)) or {}).get("model")
        except Exception:  # a damaged config item: the array mismatch is still the error
            stored = None
        if not isinstance(stored, dict):
            return ""
        diff = config_diff({"model": stored}, {"model": self._config["model"]})
        if not diff:
            return ""
        run_config = self.directory.parent / "config.yaml"
        hint = (f"; to resume the run as it was, use --config {run_config}"
                if run_config.is_file() else "")
        return f"; model settings differ from the checkpoint's: {', '.join(diff)}{hint}"

    def _check_settings(self, step: int, config: dict[str, Any],
                        data_state: dict[str, Any] | None, train_iter: Any) -> list[str]:
        """Refuses (CheckpointMismatch) a resume that changes the tokenizer, or the train
        stream without `train.restart_data`; returns the stream settings that changed."""
        where = f"checkpoint {self.path(step)}"
        # What the stream read (input_pipeline/fingerprint.py): tokenizer contents, train files.
        # Checkpoints from before fingerprints compare the tokenizer by its path.
        stored_inputs = self._stored_inputs(data_state, step)
        inputs = getattr(train_iter, "inputs", None)
        fingerprinted = stored_inputs is not None and inputs is not None
        differ = input_changes(stored_inputs, inputs) if fingerprinted else {}
        tokenizer_keys = tuple(k for k in TOKENIZER_KEYS
                               if not (fingerprinted and k == "data.tokenizer"))
        changed = fixed_setting_changes(config, self._config, tokenizer_keys)
        if "tokenizer" in differ:
            changed.append(f"data.tokenizer={self.cfg.data.tokenizer!r}: {differ['tokenizer']}")
        if changed:
            how = "by its contents" if fingerprinted else "by its path"
            raise CheckpointMismatch(
                f"{where}: {'; '.join(changed)}: expected the run's tokenizer settings (the "
                f"model's token ids would change meaning; a tokenizer file is compared {how})"
                "; a new tokenizer needs a new --run-dir")
        changed = fixed_setting_changes(config, self._config,
                                        stream_keys(config.get("data", {})))
        if "files" in differ:
            changed.append(differ["files"])
        if changed and not self.cfg.train.restart_data:
            raise CheckpointMismatch(
                f"{where}: {'; '.join(changed)}: expected the run's data settings (its saved "
                "data position belongs to that stream); add train.restart_data=true to read "
                "the new data from its beginning")
        return changed

    def _fresh_state(self, trainer: Any) -> Any:
        """`trainer.init()`, with the parameters of `train.init_from` when it is set."""
        with trainer.context():
            state = trainer.init()
        if not self.cfg.train.init_from:
            return state
        state, note, source = init_from(self.cfg.train.init_from, state)
        _log(note)
        # Same shapes, other numerics (rope_theta, norm_eps, top-k, ...) load: say so
        stored = (read_config(source) or {}).get("model")
        diff = config_diff({"model": stored}, {"model": self._config["model"]}) if stored else []
        if diff:
            _log(f"model settings differ from {source}'s: {'; '.join(diff)}")
        return state

    def _stored_inputs(self, data_state: dict[str, Any] | None,
                       step: int) -> dict[str, Any] | None:
        """The fingerprint saved with the data position (input_pipeline/fingerprint.py):
        this process's, or, after a change of the process count, any process's (all
        processes read the same tokenizer and files). None for checkpoints before it."""
        if data_state is not None:
            return data_state.get("inputs")
        for path in ckpt.saved_data_states(self.path(step)).values():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and "inputs" in state:
                return state["inputs"]
        return None

    def maybe_save(self, step: int, state: Any, train_iter: Any) -> bool:
        """Starts an async save when `step` is a multiple of train.checkpoint_every (and keeps
        the writer threads of one in flight at idle CPU priority)."""
        if self.manager.is_saving_in_progress():
            priority.deprioritize_writers()
        every = self.cfg.train.checkpoint_every
        if every and step % every == 0:
            self.save(step, state, train_iter)
            return True
        return False

    def save(self, step: int, state: Any, train_iter: Any, *, wait: bool = False) -> Path:
        """Saves step `step` (unless it already is); `wait` blocks until it is on disk.

        A state holding NaN or inf is refused (FloatingPointError) before anything is
        written: a diverged run must not rotate its good checkpoints out."""
        if step != self.last_saved:  # a save waited for needs no copy to write from
            if not bool(_all_finite(state)):
                kept = (f"the latest checkpoint, {self.path(self.last_saved)}, is kept"
                        if self.last_saved is not None else "no checkpoint was written")
                raise FloatingPointError(
                    f"step {step}: the train state holds NaN or inf; not saved ({kept}); "
                    "expected finite values: lower train.optimizer.learning_rate or check "
                    "the data")
            self._finish()  # the save in flight: a failure of its own names its step
            try:
                ckpt.save(self.manager, step, state, self._config, train_iter.get_state(),
                          snapshot=None if wait else self._snapshot)
            except Exception as e:  # e.g. a read-only folder: the tmp folder is not made
                raise save_error(e, step, self.directory) from e
            self.last_saved = self._pending = step
        if wait:
            self._finish()
        return self.path(step)

    def _finish(self) -> None:
        """Waits for the save in flight; its failure (a full disk) as one CheckpointError.
        Nothing is lost: Orbax renames a step's folder only once it is complete."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise save_error(e, step if step is not None else self.last_saved,
                             self.directory) from e

    def close(self) -> None:
        try:
            self._finish()
            self.manager.close()
            self._quiet.remove()  # kept after a failure: threads of that save may log late
        finally:
            if self._snapshot is not None:
                self._snapshot.release()


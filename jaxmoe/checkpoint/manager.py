"""Orbax checkpoints of a training run: one directory per step under `run_dir/checkpoints/`.

A checkpoint `checkpoints/<step>/` holds three items:
    state/   the TrainState pytree (params, optimizer state, step, RNG key, router biases) as
             TensorStore arrays (OCDBT key-value store, zarr3 shards); each process writes the
             shards it owns, and a restore reads exactly the slices each device needs
    data/    the training data iterator's state, one JSON file per process (its own shard)
    config/  the resolved config as JSON
Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when every process
has finished, so a save that never finished keeps that name (`incomplete_checkpoints`). Orbax
takes any folder named by a bare step number for a complete checkpoint, though, so one that
lacks a file every finished save writes (`STEP_FILES`; e.g. an empty `3/` left by an
interrupted copy) is reported by `unfinished_steps`. Nothing here uses pickle: arrays are raw
bytes + JSON metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from jaxmoe.checkpoint import priority
from jaxmoe.checkpoint.damage import CheckpointError, check_shapes, explain
from jaxmoe.checkpoint.snapshot import StateSnapshot
from jaxmoe.model import logical as L

TMP_MARKER = ".orbax-checkpoint-tmp"
# Files every finished save writes into its step folder (Orbax's step metadata, the array
# metadata of item `state`), and the suffix `set_aside` gives a folder that lacks one.
STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA")
SET_ASIDE_SUFFIX = ".incomplete"
_STEP_NAME = re.compile(r"0|[1-9][0-9]*")  # the step folder names Orbax recognises


# ----------------------------------------------------------------------------- data item

DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # PerProcessJsonHandler's names


def saved_data_states(step_dir: Path) -> dict[tuple[int, int], Path]:
    """{(process index, process count): file} of the data states saved in a step folder."""
    return {(int(m[1]), int(m[2])): p for p in sorted((step_dir / "data").glob("*.json"))
            if (m := DATA_FILE.fullmatch(p.name))}


class PerProcessJsonHandler(ocp.JsonCheckpointHandler):
    """Every process writes its own `process_<i>-of-<n>.json` (its data shard's position)."""

    @staticmethod
    def filename() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def _save_fn(self, x, directory):
        (directory / self.filename()).write_text(json.dumps(x))

    def restore(self, directory, item=None, args=None) -> dict[str, Any] | None:
        """This process's saved state; None when it was saved by a different process count."""
        path = Path(directory) / self.filename()
        if not path.exists():
            return None
        return json.loads(path.read_text())


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ----------------------------------------------------------------------------- manager

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(os.path.abspath(run_dir)) / "checkpoints"  # normalised: no `..` in paths


def make_manager(directory: str | Path, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, compression: bool = False,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (a run's `checkpoints/` folder).

    keep_last: the newest K checkpoints are kept; keep_every: steps that are multiples of M
    are kept forever as well (0: none). async_save: `save` returns once arrays are copied to
    host memory and the bytes are written by a background thread. compression: zstd on each
    chunk (costs CPU time during training; float weights shrink ~10%)."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: expected >= 1")
    policies: list[Any] = [ocm.LatestN(keep_last)]
    if keep_every:
        policies.append(ocm.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=not read_only)
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True,
                                             use_compression=compression),
        "data": PerProcessJsonHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=handlers)


def incomplete_checkpoints(directory: str | Path) -> list[Path]:
    """Step directories whose save never finished (the process died while writing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name)


def _step_folders(directory: str | Path) -> list[tuple[Path, list[str]]]:
    """(folder, the `STEP_FILES` it lacks) for each folder named by a step number that Orbax
    would take for a checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(p, [f for f in STEP_FILES if not (p / f).is_file()]) for p in directory.iterdir()
             if p.is_dir() and _STEP_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda item: int(item[0].name))


def unfinished_steps(directory: str | Path) -> list[tuple[Path, str]]:
    """(folder, what it lacks) for each step folder that lacks a file of `STEP_FILES` (e.g.
    an empty `3/` left by an interrupted copy), oldest first."""
    return [(p, f"no {' or '.join(missing)}") for p, missing in _step_folders(directory)
            if missing]


def complete_steps(directory: str | Path) -> list[int]:
    """The steps whose save finished (every `STEP_FILES` file; a save in flight or failed is
    still in its `.orbax-checkpoint-tmp` folder), oldest first."""
    return [int(p.name) for p, missing in _step_folders(directory) if not missing]


def set_aside(path: Path) -> Path:
    """Renames step folder `path` to `<step>.incomplete` (`-2`, `-3`, ... if taken), a name
    Orbax does not take for a step; returns the new path."""
    target, n = path.with_name(path.name + SET_ASIDE_SUFFIX), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}-{n}")
    path.rename(target)
    return target


def _save_args(state: Any) -> Any:
    """Arrays stacked on a leading `layers` axis (parameters of scanned layer groups and their
    optimizer moments) are stored one layer per chunk, so converters and inspectors can read
    a single layer without reading (or holding) the whole stack."""
    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            axes = tuple(leaf.get_metadata().get("out_sharding") or ())
            stacked = bool(axes) and axes[0] == L.LAYERS and leaf[...].ndim >= 2
            return jax.tree.map(lambda _: ocp.SaveArgs(shard_axes=(0,) if stacked else ()),
                                leaf)
        return ocp.SaveArgs()
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any],
         data_state: dict[str, Any] | None = None, *, writer_priority: str = "idle",
         snapshot: StateSnapshot | None = None) -> None:
    """Starts saving `state` (and the data iterator state, config) as step `step`.

    With an async manager this returns once the arrays are on the host; the write continues
    in the background (`manager.wait_until_finished()` waits for it). `data_state` is copied
    through JSON now, so the iterator may move on immediately. writer_priority "idle" moves
    the TensorStore writer threads to SCHED_IDLE (see priority.py; call
    `priority.deprioritize_writers()` again while the save runs), "normal" leaves them.
    snapshot: the save reads a copy of `state`'s CPU arrays kept there (snapshot.py), after
    any save still in flight (which may read the previous copy) has finished."""
    if writer_priority not in ("idle", "normal"):
        raise ValueError(f"writer_priority={writer_priority!r}: expected 'idle' or 'normal'")
    if snapshot is not None:
        manager.wait_until_finished()
        state = snapshot.take(state)
    items = {"state": ocp.args.PyTreeSave(state, save_args=_save_args(state)),
             "config": ocp.args.JsonSave(json.loads(json.dumps(config)))}
    if data_state is not None:
        items["data"] = PerProcessJsonSave(json.loads(json.dumps(data_state)))
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    if writer_priority == "idle":
        priority.deprioritize_writers()


@dataclasses.dataclass
class Restored:
    """What a checkpoint held: the state pytree, this process's data state, the config."""

    step: int
    state: Any
    data_state: dict[str, Any] | None
    config: dict[str, Any]


def step_path(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(manager.directory) / str(step)


def stored_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    """The stored array metadata tree of item `state` (shapes, dtypes, shardings)."""
    where = step_path(manager, step)
    if not (where / "state" / "_METADATA").is_file():
        raise CheckpointError(f"checkpoint {where}: file state/_METADATA is missing; the "
                              "checkpoint is incomplete or damaged")
    try:
        meta = manager.item_metadata(step)["state"]
    except Exception as e:  # orbax wraps JSON / file errors in several types
        raise explain(e, where) from e
    if meta is None:
        raise CheckpointError(f"checkpoint {where}: item state has no readable metadata")
    return meta


def restore(manager: ocp.CheckpointManager, step: int | None, abstract_state: Any, *,
            data: bool = True,
            before_state: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None
            ) -> Restored:
    """Restores step `step` (None: the latest) onto the shardings of `abstract_state`.

    abstract_state: a pytree of `jax.ShapeDtypeStruct`s with `.sharding` set (e.g.
    `jax.eval_shape` of the jitted init). Each device's shard is read from TensorStore
    directly, so a checkpoint saved on one mesh restores onto any other (and no host ever
    holds a whole array that is sharded). Raises CheckpointError (one line) on a missing step,
    a missing item or damaged files, and its subclass CheckpointMismatch when the config's
    arrays differ from the stored ones (names, shapes or dtypes).

    before_state(config, data_state): called once those small items are read and before the
    arrays are (minutes for a large model), so that a resume it refuses reads no array."""
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"checkpoint directory {manager.directory}: no complete "
                                  "checkpoint")
    where = step_path(manager, step)
    if not where.is_dir():
        raise CheckpointError(f"checkpoint {where}: no such checkpoint (complete steps: "
                              f"{list(manager.all_steps())})")
    check_shapes(where, stored_metadata(manager, step), abstract_state)
    # One item at a time, so that an error names the item that failed.
    config = _restore_item(manager, step, "config", ocp.args.JsonRestore())
    data_state = None
    if data and (where / "data").is_dir():
        data_state = _restore_item(manager, step, "data", PerProcessJsonRestore())
    if before_state is not None:
        before_state(config, data_state)
    state = _restore_item(manager, step, "state", ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
    return Restored(step, state, data_state, config)


def _restore_item(manager: ocp.CheckpointManager, step: int, item: str, args: Any) -> Any:
    where = step_path(manager, step)
    if not (where / item).is_dir():
        raise CheckpointError(f"checkpoint {where}: item {item} is missing (no folder "
                              f"{item}/); the checkpoint is incomplete or damaged")
    try:
        return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:
        raise explain(e, where, item) from e


"""Orbax checkpoints of the training state (parameters, optimizer state, step, RNG, router
biases) plus the resolved config, under `run_dir/checkpoints/<step>/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def make_manager(run_dir: str | Path, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options,
                                 item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(config)))


def restore(manager: ocp.CheckpointManager, step: int | None, abstract_state: Any):
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings)."""
    step = manager.latest_step() if step is None else step
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
    return out.state, out.config

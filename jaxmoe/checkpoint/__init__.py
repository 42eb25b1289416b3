"""Checkpoints on orbax-checkpoint + TensorStore (OCDBT, zarr3): async, sharded, resharding.

Public API (imported lazily, so `jaxmoe --help` does not load orbax):
    CheckpointError                       one-line error: missing, damaged or mismatched
    CheckpointMismatch                    its subclass: the config's arrays differ (names,
                                          shapes, dtypes) from the stored ones
    checkpoint_dir(run_dir)               run_dir/checkpoints
    make_manager(dir, keep_last=, keep_every=, async_save=, compression=, read_only=)
    save(manager, step, state, config, data_state)          async unless async_save=False
    restore(manager, step, abstract_state) -> Restored(step, state, data_state, config)
    incomplete_checkpoints(dir)           saves that never finished
    unfinished_steps(dir)                 step folders lacking a file every save writes
    RunCheckpointer(run_dir, cfg)         the training loop's resume / periodic / final saves
    PreemptionGuard()                     SIGTERM/SIGINT -> save at the step boundary, exit 0
    describe(path), export_params(path, out, dtype=), restore_params(path, dtype=)
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "CheckpointError": "damage",
    "CheckpointMismatch": "damage",
    "checkpoint_dir": "manager",
    "make_manager": "manager",
    "save": "manager",
    "restore": "manager",
    "Restored": "manager",
    "incomplete_checkpoints": "manager",
    "unfinished_steps": "manager",
    "RunCheckpointer": "run",
    "PreemptionGuard": "preemption",
    "abstract_state": "run",
    "describe": "inspect",
    "export_params": "inspect",
    "restore_params": "inspect",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'jaxmoe.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxmoe.checkpoint.{_API[name]}"), name)

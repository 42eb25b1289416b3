"""`train.init_from`: a fresh run starts from the parameters of another checkpoint.

The source is anything `jaxmoe checkpoint export-params` reads: a run directory, its
`checkpoints/` folder, a step folder, a params-only export, or a `jaxmoe convert from-hf`
output (fine-tuning an imported Hugging Face model). Each array is read straight into the
sharding of the fresh state's own (so onto any mesh), cast to its dtype; names and shapes
must match the model the config builds. The optimizer state and step stay fresh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxmoe.checkpoint.damage import CheckpointError, CheckpointMismatch
from jaxmoe.checkpoint.inspect import check_params_fit, resolve_step_dir, restore_params
from jaxmoe.config_schema import ConfigError


def check_source(path: str, run_dir: str | Path, params: Any = None) -> None:
    """Refuses, before a fresh run starts (so it leaves no run directory behind), a
    `train.init_from` that names no checkpoint (ConfigError, one line) or, given the fresh
    state's (abstract) `params`, one whose parameter names or shapes are not theirs
    (CheckpointMismatch; from metadata, nothing is read). A run that resumes ignores it, so
    it is not checked then (its source may be gone by the time a preempted run resumes)."""
    try:
        resolve_step_dir(run_dir)
        return  # the run resumes from its own checkpoint
    except CheckpointError:
        pass
    try:
        resolve_step_dir(path)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    if params is not None:
        try:
            check_params_fit(path, params)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"train.init_from={path}: {e}") from None


def init_from(path: str, state: Any) -> tuple[Any, str, Path]:
    """(`state` with its params, and router biases where both have them, read from `path`;
    a line saying what was read; the step folder or export read). Raises CheckpointError
    (CheckpointMismatch when the stored arrays are not the model's), naming
    `train.init_from`."""
    step_dir = resolve_step_dir(path)
    try:
        params = restore_params(step_dir, target=state.params)
        rest, note = state.rest, ""
        if jax.tree.leaves(state.rest):
            stored = restore_params(step_dir, collection="rest", target=state.rest)
            if stored is None:
                note = "; router selection biases start at zero (it has none)"
            else:
                rest = stored
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"train.init_from={path}: {e}") from None
    return (dataclasses.replace(state, params=params, rest=rest),
            f"initialised the parameters from {step_dir}{note}; the optimizer starts afresh",
            step_dir)

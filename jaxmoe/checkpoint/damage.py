"""Turning a damaged or mismatched checkpoint into one readable line.

Orbax and TensorStore report a truncated data file or a missing manifest as a chain of
exceptions whose useful part (the array's name, the byte range) sits several causes deep,
next to a JSON spec of a few kilobytes. `explain` walks that chain and returns
`checkpoint <dir>: array <name>: <problem>`; `check_shapes` compares the stored array metadata
with the arrays the current config expects before any byte is read, so a config mismatch
names the array and both shapes instead of failing inside a TensorStore read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit the config (one line)."""


def flat_names(tree: Any) -> dict[str, Any]:
    """`{"params.embedder.embedding.value": leaf, ...}`: leaves keyed like orbax names them.

    Orbax joins the keys of a leaf's path with dots (dict keys, attribute names and sequence
    indices alike), so the same function keys both a target pytree and stored metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(_key_str(k) for k in path)] = leaf
    return out


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class NotACheckpoint(CheckpointError):
    """The path names no checkpoint at all (missing, a file, or a folder without one): bad
    input, like a wrong path on the command line, not damage."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is intact but does not fit the config (array names, shapes, dtypes):
    an older checkpoint of the same run would not fit either."""


def _stored(leaf: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) an array is stored with: typed PRNG keys are stored as their key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        abstract = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        data = jax.eval_shape(jax.random.key_data, abstract)
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _dtype_hint(step_dir: Path, stored: np.dtype, expected: np.dtype) -> str:
    if jnp.issubdtype(stored, jnp.floating) and jnp.issubdtype(expected, jnp.floating):
        return (f"; restoring would cast it, so resume with model.param_dtype={stored}, or "
                f"convert the parameters on purpose with `jaxmoe checkpoint export-params "
                f"{step_dir} OUT --dtype {expected}`")
    return ""


def check_shapes(step_dir: Path, stored: Any, target: Any, *, check_dtypes: bool = True) -> None:
    """Raises CheckpointMismatch naming the first array whose stored shape or dtype differs
    from `target` (restoring would silently cast a dtype, e.g. float32 -> bfloat16).

    stored: the item's metadata tree (leaves with `.shape`, `.dtype`); target: the pytree to
    restore (leaves with `.shape`, `.dtype`). Missing and unexpected arrays are reported the
    same way; names and shapes are checked before dtypes (`check_dtypes=False`: not at all, for a
    restore that casts on purpose)."""
    have, want = flat_names(stored), flat_names(target)
    problems, dtypes = [], []
    for name, leaf in want.items():
        shape, dtype = _stored(leaf)
        if name not in have:
            problems.append(f"array {name}: missing from the checkpoint (the config expects "
                            f"shape {shape})")
        elif tuple(have[name].shape) != shape:
            problems.append(f"array {name}: stored shape {tuple(have[name].shape)} but the "
                            f"config expects {shape}")
        elif check_dtypes and getattr(have[name], "dtype", None) is not None and \
                np.dtype(have[name].dtype) != dtype:
            stored_dtype = np.dtype(have[name].dtype)
            dtypes.append((f"array {name}: stored as {stored_dtype} but the config expects "
                           f"{dtype}", _dtype_hint(step_dir, stored_dtype, dtype)))
    for name in sorted(have.keys() - want.keys()):
        problems.append(f"array {name}: in the checkpoint but not in the model this config "
                        "builds")
    problems = [(p, "") for p in problems] + dtypes
    if problems:
        first, hint = problems[0]
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointMismatch(f"checkpoint {step_dir}: {first}{more}; the config does "
                                 f"not match the checkpoint{hint}")


# TensorStore names the array it was reading as the first component of a kvstore key:
# `Error reading "params.lm_head.value/0.1"` or `Metadata at "step/zarr.json" ... does not
# exist`. Absolute file paths start with "/" and never match.
_ARRAY_KEY = re.compile(r'"([A-Za-z0-9_.\-]+)/(?:zarr\.json|\.zarray|[0-9.]*|c/[0-9/]*)"')
# The spec is JSON in quotes and holds brackets of its own ("chunk_shape":[0,0]).
_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]|\s*\[tensorstore_spec[^\]]*\]"
                   r"|\s*See full TensorStore details:.*", re.DOTALL)


def _chain(exc: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _problem(message: str) -> str:
    text = _SPEC.sub("", message).strip().splitlines()[0] if message.strip() else ""
    hint = ""
    if "OUT_OF_RANGE" in text or "byte range" in text:
        hint = " — a data file is truncated"
    elif ("NOT_FOUND" in text or "does not exist" in text or "No such file" in text
          or "size of 0 bytes" in text):  # OCDBT reads a deleted data file as empty
        hint = " — a file of the checkpoint is missing (or empty)"
    elif "DATA_LOSS" in text or "checksum" in text.lower():
        hint = " — a data file is corrupt"
    if len(text) > 300:
        text = text[:300] + "..."
    return text + hint


def explain(exc: BaseException, step_dir: Path, item: str = "state") -> CheckpointError:
    """A one-line CheckpointError for an exception raised while restoring `step_dir`."""
    if isinstance(exc, CheckpointError):
        return exc
    chain = _chain(exc)
    array = None
    for e in chain:
        match = _ARRAY_KEY.search(str(e))
        if match:
            array = match.group(1)
            break
    where = f"array {array}" if array else f"item {item}"
    return CheckpointError(f"checkpoint {step_dir}: {where}: {_detail(chain, exc)}")


def _informative(e: BaseException) -> bool:
    """Whether `e`'s message says something: json's decoder ends a chain with its internal
    `StopIteration('10')` (a character offset), which does not."""
    text = str(e).strip()
    return bool(text) and not text.isdigit() and not isinstance(
        e, (StopIteration, StopAsyncIteration))


def _detail(chain: list[BaseException], exc: BaseException) -> str:
    """The problem of an exception chain (outermost first) in words: the innermost
    informative message (TensorStore's own: status code, key, byte range), else the
    innermost message at all, else the exception's type."""
    for e in reversed(chain):
        if _informative(e):
            if isinstance(e, json.JSONDecodeError):
                return f"not valid JSON ({e})"
            return _problem(str(e))
    return next((_problem(str(e)) for e in reversed(chain) if str(e).strip()),
                type(exc).__name__)


# TensorStore ends an OS error with the cause: `...: File too large [os_error_code='27']`.
_OS_ERROR = re.compile(r"""([^:"]+?) \[os_error_code='?(\d+)'?\]""")


def write_problem(exc: BaseException) -> str:
    """The innermost message of a failed write (a full disk, a file-size limit) on one line,
    the operating system's reason first, without TensorStore's JSON spec."""
    for e in reversed(_chain(exc)):
        text = _SPEC.sub("", str(e)).strip()
        if text:
            text = text.splitlines()[0]
            os_error = _OS_ERROR.search(text)
            if os_error:
                text = f"{os_error.group(1).strip()} (errno {os_error.group(2)}): {text}"
            return text[:300] + "..." if len(text) > 300 else text
    return type(exc).__name__


class _DropThreadFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


@contextlib.contextmanager
def quiet_writer_thread_failures():
    """Drops Orbax's log records of a failed write thread (each a full traceback, logged from
    its threads before the same exception reaches the caller, who reports it in one line)."""
    logger, drop = logging.getLogger("absl"), _DropThreadFailures()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def drop_closed_loop_callbacks() -> None:
    """For the rest of this process, drops the "Event loop is closed" errors of TensorStore
    callbacks. When one of Orbax's reads or writes fails, its event loop closes while
    TensorStore still holds the other operations' completion callbacks; each then fails on a
    TensorStore thread with a traceback. The failure itself is reported in one line. For
    commands (the CLI), not for a library user's process."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def older_steps_text(older: list[int]) -> str:
    """"older complete checkpoints: [..., 7, 8]" (the newest five) for error lines."""
    shown = older if len(older) <= 5 else ["...", *older[-5:]]
    return f"older complete checkpoints: [{', '.join(map(str, shown))}]"

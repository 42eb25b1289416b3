"""A checkpoint save that cannot be written (a full disk, a read-only folder), in one line.

Orbax writes a step in background threads: a failed write is logged there with a full
traceback by each thread it passes through (a few hundred lines for one full disk), then
re-raised to whoever waits for the save, wrapped in TensorStore's text. `save_error` turns
that exception into `checkpoint step N to DIR failed: <the OS's reason>; ...`, naming the
checkpoint the run still has; `QuietSaveFailures` drops Orbax's log records of the same
failure; `check_writable` refuses a checkpoint folder that cannot be written before a run
trains for hours and then fails at its first save.
"""

from __future__ import annotations

import errno as errno_lib
import logging
import os
import re
import tempfile
from pathlib import Path

from jaxmoe.checkpoint.damage import CheckpointError, _chain, write_problem
from jaxmoe.checkpoint.manager import complete_steps

# TensorStore ends an OS error with its code: `... No space left on device [os_error_code=28]`.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")


def reason(exc: BaseException) -> str:
    """`"No space left on device (errno 28)"`: the operating system's reason a write failed,
    from an OSError in the chain or the code TensorStore's message carries; else the
    innermost message on one line."""
    for e in reversed(_chain(exc)):
        code = e.errno if isinstance(e, OSError) and e.errno else None
        if code is None:
            match = _OS_ERROR_CODE.search(str(e))
            code = int(match.group(1)) if match else None
        if code:
            name = errno_lib.errorcode.get(code, str(code))
            return f"{os.strerror(code)} ({name}, errno {code})"
    return write_problem(exc)


def save_error(exc: BaseException, step: int, directory: Path) -> CheckpointError:
    """The one-line CheckpointError of a failed save of `step` into `directory`."""
    steps = complete_steps(directory)
    kept = (f"the latest complete checkpoint is step {steps[-1]} ({directory / str(steps[-1])})"
            if steps else "no complete checkpoint was written")
    return CheckpointError(f"checkpoint step {step} to {directory} failed: {reason(exc)}; "
                           f"{kept}")


def check_writable(directory: Path) -> str:
    """"" when this process can write checkpoints into `directory` (made if missing), else
    the problem in words; probed by making and removing an empty folder in it (its mode
    bits alone miss read-only mounts and ACLs)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".jaxmoe-write-probe-", dir=directory))
    except OSError as e:
        why = f"{e.strerror} ({errno_lib.errorcode.get(e.errno, e.errno)})" if e.errno else e
        return (f"checkpoint directory {directory}: cannot be written ({why}); expected a "
                "writable folder (a run that cannot save would lose its training)")
    return ""


# Orbax's records of one failed background save; the same exception reaches the caller.
_FAILURE_RECORDS = ("_SignalingThread.run() raised an exception",
                    "Handler Commit operations or the Commit callback in background save",
                    "Save Finalize thread", "Checkpointer failed: one or more items may not")


class QuietSaveFailures(logging.Filter):
    """Drops Orbax's log records of a failed save (each with a full traceback) from the
    `absl` logger while installed (`install`/`remove`); the caller reports the failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _FAILURE_RECORDS)

    def install(self) -> None:
        logging.getLogger("absl").addFilter(self)

    def remove(self) -> None:
        logging.getLogger("absl").removeFilter(self)

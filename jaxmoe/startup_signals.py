"""Ctrl-C (SIGINT) and SIGTERM while `jaxmoe train` starts: a flag, never an exception.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread is; during
start-up that is often inside XLA (a compile, or JAX's garbage-collection callback), where
it was swallowed (the run trained to its end) or left compile threads running while the
interpreter tore down (a segmentation fault). `install` replaces it with a handler that only
records the signal; `check` ends start-up between its phases (Interrupted: the command exits
128 + the signal, with one line), and the training loop's PreemptionGuard takes over with
`release`. A second signal (of either kind) ends the process at once, even inside a
compile: the first one gives both signals back their default action. Single-process runs
only (`jaxmoe.cli.guards_start_up`). Every `jaxmoe` command also holds them while it
imports the CLI (`jaxmoe/__main__.py`), giving them back before the command runs (and so
before a multi-host run starts jax.distributed).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_previous: dict[int, Any] = {}  # the handlers `install` replaced, while installed
_received: list[int] = []  # the signal received during start-up, if any
_stopped: list[int] = []  # the signal that stopped start-up (Interrupted raised), if any


class Interrupted(BaseException):
    """A signal arrived during start-up (a BaseException, like KeyboardInterrupt: no
    `except Exception` on the way may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        _stopped[:] = [signum]


def _handle(signum: int, frame: Any) -> None:
    if not _received:
        _received.append(signum)
    for sig in SIGNALS:  # a second one (of either kind) stops the process, even in XLA
        signal.signal(sig, signal.SIG_DFL)


def install() -> bool:
    """Records SIGINT/SIGTERM instead of acting on them, until `release`; False (nothing
    done) outside the main thread, where Python cannot handle signals."""
    if threading.current_thread() is not threading.main_thread() or _previous:
        return False
    _received.clear()
    for sig in SIGNALS:
        _previous[sig] = signal.signal(sig, _handle)
    return True


def stopped_start_up() -> bool:
    """Whether a signal stopped start-up (an Interrupted was raised) in this process."""
    return bool(_stopped)


def check() -> None:
    """Raises Interrupted if a signal arrived since `install`."""
    if _received:
        raise Interrupted(_received[0])


def release() -> int | None:
    """Gives the signals back the handlers they had before `install`; returns the signal
    received since (None if none), so that one arriving before the caller takes over is
    not lost."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    received = _received[0] if _received else None
    _received.clear()
    return received

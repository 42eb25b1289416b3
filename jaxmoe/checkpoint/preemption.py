"""Preemption of a training run: SIGTERM / SIGINT -> save at the next step boundary.

The training loop holds `PreemptionGuard` around its steps (see jaxmoe/checkpoint/run.py for
the order of calls).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

import jax

from jaxmoe import startup_signals


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into "save at the next step boundary and exit 0".

    Single process: a signal handler sets a flag that `should_stop` reports and says so on
    stderr; a second signal (SIGINT or SIGTERM) raises KeyboardInterrupt (a way out when
    saving, or reaching the next step, hangs). Several processes must agree on
    the step they stop at, so there SIGTERM goes through JAX's preemption service
    (`reached_preemption_sync_point`, which picks one step for all) and SIGINT keeps its
    default behaviour."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Callable | int | None] = {}
        self._multi = False

    def __enter__(self) -> Self:
        # Takes over from `jaxmoe train`'s start-up handler: a signal it recorded arrived
        # before any step was trained, so there is nothing new to save.
        pending = startup_signals.release()
        if pending is not None:
            raise startup_signals.Interrupted(pending)
        self._multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread() and not self._multi:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now (saving may hang)
            raise KeyboardInterrupt
        self.received = signum
        # Said at once: a step, an evaluation or a data reader may take long to reach the
        # next step boundary, and a silent Ctrl-C looks ignored.
        message = (f"\n{signal.Signals(signum).name}: saving a checkpoint at the next step "
                   "boundary, then exiting; send it again to stop at once without saving\n")
        try:  # os.write: print may fail re-entrantly, and a closed pipe must not cost the save
            os.write(2, message.encode())
        except OSError:
            pass

    def should_stop(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.received = signal.SIGTERM
            except RuntimeError:  # no preemption service (jax_enable_preemption_service off)
                pass
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""Checkpoint writer threads at idle CPU priority, so an async save does not slow training.

An async orbax save copies arrays to host memory (the only part the training loop waits
for) and then TensorStore's worker threads (named `ts_pool_worker`) serialise and write the
bytes. On a host whose cores also run the training step (a CPU host; the input pipeline on
an accelerator host) those threads compete with it. Moved to Linux's SCHED_IDLE class they
run only on cores the step leaves idle: the save takes longer, the step does not
(tools/bench_checkpoint.py measures both). Lowering a thread's priority needs no privilege.
Threads are created lazily while a save runs, so callers repeat `deprioritize_writers()`
(a scan of /proc/self/task, ~0.1 ms) while one is in flight. Elsewhere a no-op.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

WRITER_THREAD_NAMES = frozenset({"ts_pool_worker"})


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "SCHED_IDLE")


def writer_threads() -> list[int]:
    """Thread ids of this process's TensorStore workers."""
    tids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() in WRITER_THREAD_NAMES:
                tids.append(int(task.name))
        except OSError:  # the thread exited meanwhile
            continue
    return tids


def deprioritize_writers() -> int:
    """Moves writer threads not yet in SCHED_IDLE there; returns how many were moved."""
    if not supported():
        return 0
    moved = 0
    for tid in writer_threads():
        try:
            if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                moved += 1
        except OSError:  # exited meanwhile
            continue
    return moved

"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard event files.

On resume both forget the steps after the checkpoint, which the resumed run logs again:
metrics.jsonl is rewritten without them (exact), and the TensorBoard writer is opened with
`purge_step` (a SessionLog START event at the first replayed step, as TensorFlow's summary
writers write after a restart; TensorBoard's Python event loader then drops the older
events of those steps)."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe.staging import write_text_atomic

_WRITERS = itertools.count()


class MetricsWriter:
    """Writes `{"step": s, "split": "train"|"eval", ...}` lines to `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None  # opened by open_tensorboard or the first write, after resume_at
        self._tb_dir = Path(run_dir) / "tensorboard" if enabled and tensorboard else None
        self._purge_step: int | None = None
        self._written = False

    def _tensorboard(self):
        if self._tb is None and self._tb_dir is not None:
            from tensorboardX import SummaryWriter
            # Event file names carry only the second and the host: a writer opened in the
            # same second would overwrite an earlier file, so the name also gets pid + count.
            suffix = f".{os.getpid()}.{next(_WRITERS)}"
            self._tb = SummaryWriter(str(self._tb_dir), purge_step=self._purge_step,
                                     filename_suffix=suffix)
        return self._tb

    def open_tensorboard(self) -> None:
        """Opens the TensorBoard writer now rather than at the first `write`: importing
        tensorboardX and creating the event file take a second or two, which a training
        loop spends before its timed steps. Call it after `resume_at` (the step to purge)."""
        self._tensorboard()

    def resume_at(self, step: int) -> int:
        """Drops rows of steps after `step` (logged by a run that died before checkpointing
        them; the resumed run logs them again) and a torn last line. The file is rewritten
        atomically (temp file + rename); TensorBoard events of those steps are purged. Returns
        how many rows were dropped."""
        if not self.enabled:
            return 0
        if self._written or self._tb is not None:
            raise RuntimeError("resume_at must come before the first write and "
                               "open_tensorboard")
        self._purge_step = step + 1
        if not self.path.exists():
            return 0
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-write
                dropped += 1
                continue
            if row.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)
        return dropped

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._written = True
        clean = {k: float(np.asarray(v)) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in clean.items():
                tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


class StepTimer:
    """Wall seconds per training step between two logged steps, leaving out what is not a
    step: the first step's compilation (`restart` after it) and evaluations (`pause`)."""

    def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.restart(step)

    def restart(self, step: int) -> None:
        self._time, self._step, self._paused = self._clock(), step, 0.0

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def lap(self, step: int) -> float | None:
        """Seconds per step since the last lap or restart (None when no step ran since)."""
        if step <= self._step:
            return None
        now = self._clock()
        seconds = (now - self._time - self._paused) / (step - self._step)
        self._time, self._step, self._paused = now, step, 0.0
        return seconds

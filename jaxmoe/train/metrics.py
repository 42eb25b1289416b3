"""Metrics sinks: a JSONL file (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class MetricsWriter:
    """Writes `{"step": s, "split": "train"|"eval", ...}` lines to `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def resume_at(self, step: int) -> int:
        """Drops rows of steps after `step` (logged by a run that died before checkpointing
        them; the resumed run logs them again) and a torn last line. The file is rewritten
        atomically (temp file + rename). Returns how many rows were dropped."""
        if not self.enabled or not self.path.exists():
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
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        return dropped

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]

"""Shared helpers of the input_pipeline tests (not a conftest: plain functions, explicit use)."""

from __future__ import annotations

import json
import os

import numpy as np

from input_pipeline import DataConfig, make_dataset


def write_jsonl(path: str, texts: list[str], field: str = "text") -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({field: t, "id": len(t)}) + "\n" for t in texts)
    return path


def unique_texts(n: int, prefix: str = "doc") -> list[str]:
    """`n` distinct documents of varied lengths (5..~120 bytes)."""
    rng = np.random.default_rng(0)
    return [f"{prefix} {i:05d} " + "ab cd ef " * int(rng.integers(0, 12)) for i in range(n)]


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def all_batches(cfg: DataConfig, **kw) -> list[dict[str, np.ndarray]]:
    it = make_dataset(cfg, **kw)
    try:
        return list(it)
    finally:
        it.close()


def real_stream(batches: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    """The non-padding tokens of `key`, row-major over all batches. Shape `[num_real]`."""
    return np.concatenate([b[key][b["segment_ids"] > 0] for b in batches])


def tmpfile(tmp_path, name: str) -> str:
    return os.path.join(str(tmp_path), name)

"""Shared set-up for the sharding tests: the tiny config in float32 and fixed batches."""

from __future__ import annotations

import numpy as np

from jaxmoe import config as config_lib

# The tiny config, in float32 (so layouts differ only by summation order), with 4 kv heads
# so that a tensor axis of 4 divides every head count, and short sequences for speed
# (no sample: these tests check training, and sampling would only add compiles).
TINY_OVERRIDES = ["model.compute_dtype=float32", "model.num_kv_heads=4", "data.seq_len=32",
                  "train.batch_size=16", "train.steps=3", "train.optimizer.warmup_steps=1",
                  "model.init_std=0.2", "train.sample_tokens=0"]


def tiny_config(*overrides: str) -> config_lib.Config:
    """The tiny config with TINY_OVERRIDES, then `overrides` (which win on the same key)."""
    merged = {o.split("=", 1)[0]: o for o in TINY_OVERRIDES + list(overrides)}
    return config_lib.load_config("configs/tiny_moe.yaml", list(merged.values()))


def batches(cfg: config_lib.Config, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` global batches [batch, seq_len] of random tokens; each row is two packed
    documents, the second ending in padding, so segment masks matter."""
    rng = np.random.default_rng(seed)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        tokens = rng.integers(3, cfg.model.vocab_size, size=(b, t + 1), dtype=np.int32)
        cut = rng.integers(4, t - 8, size=b)
        pad = rng.integers(t - 6, t, size=b)
        col = np.arange(t)[None, :]
        seg = np.where(col < cut[:, None], 1, 2).astype(np.int32)
        seg = np.where(col < pad[:, None], seg, 0).astype(np.int32)
        pos = np.where(seg == 1, col, col - cut[:, None]).astype(np.int32)
        pos = np.where(seg == 0, 0, pos).astype(np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": pos})
    return out

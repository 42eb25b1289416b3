"""Offline conversion of JSONL / Parquet text into ArrayRecord shards (tools/build_arrayrecord.py).

Each ArrayRecord record is one document's UTF-8 text (what `data.source: arrayrecord` reads).
Records are dealt round-robin over `num_shards` shards, so shards have equal sizes (±1) and a
host reading every `process_count`-th record touches every shard evenly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from input_pipeline.sources import iter_texts

# group_size:1 makes every record its own chunk: random access reads one record, not 65536.
ARRAYRECORD_OPTIONS = "group_size:1"


def shard_paths(out_prefix: str, num_shards: int) -> list[str]:
    """`<prefix>-00000-of-00004.arrayrecord`, ... (the names `data.paths` globs match)."""
    return [f"{out_prefix}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]


def write_arrayrecord(texts: Iterable[str], out_prefix: str, num_shards: int = 1) -> list[int]:
    """Writes `texts` round-robin into `num_shards` shards; returns the records per shard."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: expected >= 1")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    writers = [ArrayRecordWriter(p, ARRAYRECORD_OPTIONS) for p in shard_paths(out_prefix,
                                                                                num_shards)]
    counts = [0] * num_shards
    try:
        for i, text in enumerate(texts):
            writers[i % num_shards].write(text.encode("utf-8"))
            counts[i % num_shards] += 1
    finally:
        for w in writers:
            w.close()
    return counts


def convert_to_arrayrecord(kind: str, patterns: tuple[str, ...], out_prefix: str, *,
                           field: str = "text", num_shards: int = 1,
                           strict: bool = False) -> tuple[list[int], dict[str, int]]:
    """JSONL/Parquet files -> ArrayRecord shards. Returns (records per shard, bad counts)."""
    if kind not in ("jsonl", "parquet"):
        raise ValueError(f"kind={kind!r}: expected 'jsonl' or 'parquet'")
    bad: dict[str, int] = {}
    texts = (text for _, text in iter_texts(kind, patterns, field, strict=strict,
                                            bad_counts=bad))
    counts = write_arrayrecord(texts, out_prefix, num_shards)
    return counts, bad

"""Offline conversion of JSONL / Parquet text into ArrayRecord shards (tools/build_arrayrecord.py).

Each ArrayRecord record is one document's UTF-8 text (what `data.source: arrayrecord` reads).
Records are dealt round-robin over `num_shards` shards, so shards have equal sizes (±1) and a
host reading every `process_count`-th record touches every shard evenly.

Shards are written into a temporary directory next to the output and moved to their final
names only once every shard is complete: an aborted conversion (a bad record under `strict`,
a full disk, Ctrl-C) leaves no partial shard that a later `<prefix>-*` glob would read.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable

from input_pipeline.sources import iter_texts

# group_size:1 makes every record its own chunk: random access reads one record, not 65536.
ARRAYRECORD_OPTIONS = "group_size:1"


def shard_paths(out_prefix: str, num_shards: int) -> list[str]:
    """`<prefix>-00000-of-00004.arrayrecord`, ... (the names `data.paths` globs match)."""
    return [f"{out_prefix}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]


def stale_shards(out_prefix: str, num_shards: int) -> list[str]:
    """Existing `<prefix>-*-of-*.arrayrecord` files that writing `num_shards` shards would not
    replace: a later `<prefix>-*` glob would mix them with the new set."""
    new = {os.path.abspath(p) for p in shard_paths(out_prefix, num_shards)}
    pattern = glob.escape(out_prefix) + "-*-of-*.arrayrecord"
    return sorted(p for p in glob.glob(pattern)
                  if os.path.abspath(p) not in new and not os.path.isdir(p))


def _check_prefix(out_prefix: str, num_shards: int) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r}: expected an integer >= 1")
    if not os.path.basename(out_prefix):
        raise ValueError(f"out_prefix={out_prefix!r}: expected a file name prefix, not a "
                         "directory (e.g. /data/corpus/train)")
    stale = stale_shards(out_prefix, num_shards)
    if stale:
        raise FileExistsError(
            f"out_prefix={out_prefix!r}: {len(stale)} other shard(s) of this prefix exist "
            f"({stale[0]}{', ...' if len(stale) > 1 else ''}); expected none that the "
            f"{num_shards} new shards would not replace (a '{out_prefix}-*' glob would mix "
            "them): remove them or choose another prefix")


def fsync_path(path: str) -> None:
    """Flushes a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NoRecords(ValueError):
    """Nothing to write: every input record was bad, or there were none."""


def write_arrayrecord(texts: Iterable[str], out_prefix: str, num_shards: int = 1) -> list[int]:
    """Writes `texts` round-robin into `num_shards` shards; returns the records per shard.

    All shards appear under their final names only on success (they are written into a
    temporary directory next to them first, then renamed one by one: a crash during those
    renames, a short window, can leave part of the set). Refuses (FileExistsError) when other
    `<prefix>-*-of-*.arrayrecord` shards exist that the new set would not replace, and
    (`NoRecords`) when `texts` is empty.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    _check_prefix(out_prefix, num_shards)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    final = shard_paths(out_prefix, num_shards)
    tmp_dir = tempfile.mkdtemp(dir=out_dir, prefix=f".{os.path.basename(out_prefix)}.tmp-")
    try:
        tmp = [os.path.join(tmp_dir, os.path.basename(p)) for p in final]
        writers = []
        counts = [0] * num_shards
        try:
            for p in tmp:
                writers.append(ArrayRecordWriter(p, ARRAYRECORD_OPTIONS))
            for i, text in enumerate(texts):
                writers[i % num_shards].write(text.encode("utf-8"))
                counts[i % num_shards] += 1
        finally:
            for w in writers:
                w.close()
        if not sum(counts):  # shards the pipeline would refuse: leave nothing behind
            raise NoRecords(f"{out_prefix}: no documents to write")
        for p in tmp:
            fsync_path(p)
        _check_prefix(out_prefix, num_shards)  # nothing appeared meanwhile
        for src, dst in zip(tmp, final):
            os.replace(src, dst)
        fsync_path(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # our own directory: only what we wrote
    return counts


def convert_to_arrayrecord(kind: str, patterns: tuple[str, ...], out_prefix: str, *,
                           field: str = "text", num_shards: int = 1,
                           strict: bool = False) -> tuple[list[int], dict[str, int]]:
    """JSONL/Parquet files -> ArrayRecord shards. Returns (records per shard, bad counts)."""
    if kind not in ("jsonl", "parquet"):
        raise ValueError(f"kind={kind!r}: expected 'jsonl' or 'parquet'")
    _check_prefix(out_prefix, num_shards)  # before reading any input
    bad: dict[str, int] = {}
    texts = (text for _, text in iter_texts(kind, patterns, field, strict=strict,
                                            bad_counts=bad))
    try:
        counts = write_arrayrecord(texts, out_prefix, num_shards)
    except NoRecords:
        raise NoRecords(f"{', '.join(patterns)}: no good records (field {field!r}; skipped "
                        f"bad records: {bad or 'none'}); expected at least one") from None
    return counts, bad

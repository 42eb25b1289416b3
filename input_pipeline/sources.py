"""Random-access record sources (grain `RandomAccessDataSource`s) and record parsing.

Every source yields `(location, payload)`: `location` is `"<file>:<line/record>"` (for the log
and for strict-mode errors), `payload` is the raw record. Parsing happens later, in grain's
reader threads / worker processes (`parse_text`), so a bad record costs one skipped example.

| kind        | one record                  | location            |
|-------------|-----------------------------|---------------------|
| jsonl       | one line (bytes)            | `file:line` (1-based) |
| parquet     | one row's `text_field` value | `file:row` (0-based)  |
| arrayrecord | UTF-8 text bytes            | `file:record` (0-based) |
| synthetic   | a generated str             | `synthetic:index`   |
"""

from __future__ import annotations

import array
import bisect
import codecs
import collections
import glob
import json
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from input_pipeline import corpus
from input_pipeline.config import DataConfig, SourceConfig

Record = tuple[str, Any]  # (location, payload)


class BadRecord(Exception):
    """A record that cannot become a document; `reason` is one of `BAD_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


class BadRecordError(ValueError):
    """A bad record in strict mode; the message starts with the record's location."""


class DataError(ValueError):
    """The data files cannot serve the configuration (no file matches a pattern, too few
    records to split or shard, a reader library missing); one line naming the setting."""


BAD_REASONS = (
    "invalid_json", "missing_field", "not_utf8", "empty_text", "bad_shape", "not_finite",
    "empty_example")


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Record: ...


def expand_paths(patterns: tuple[str, ...], field: str = "data.paths") -> list[str]:
    """Files matching the glob patterns (`**` matches any depth), sorted per pattern.

    A pattern matching nothing fails, and so does a file that two patterns match (it would be
    read twice; a mixture's `weight` is the way to up-weight data); errors name `field`.
    """
    files: list[str] = []
    seen: dict[str, str] = {}  # real path -> the pattern that matched it first
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise DataError(f"{field}={pattern!r}: expected files matching the pattern")
        for path in matched:
            real = os.path.realpath(path)
            if real in seen:
                raise DataError(
                    f"{field}: {path!r} is matched by both {seen[real]!r} and {pattern!r}; "
                    "expected each file once (a mixture's weight up-weights a source)")
            seen[real] = pattern
        files.extend(matched)
    return files


def check_held_out(cfg: DataConfig) -> None:
    """Refuses held-out records that training also reads: a file of one source's held-out
    split (its `eval_paths`, or its `paths` when the split is their last `eval_fraction`)
    that is also in another source's `paths`, or in its own `paths` next to `eval_paths`.

    A common slip is `paths: data/*.jsonl` with `eval_paths: data/eval.jsonl`. Raises a
    one-line DataError naming the file and both settings.
    """
    named = [(where, src) for where, src in cfg.named_sources() if src.source != "synthetic"]
    train: dict[str, tuple[str, bool]] = {}  # real path -> (setting, split by fraction)
    for where, src in named:
        by_fraction = not src.eval_paths
        for path in expand_paths(src.paths, f"{where}.paths"):
            other, other_by_fraction = train.setdefault(
                os.path.realpath(path), (f"{where}.paths", by_fraction))
            if other != f"{where}.paths" and (by_fraction or other_by_fraction):
                # The held-out tail of one source is training data of the other.
                raise DataError(f"{where}.paths: {path!r} is also in {other}; expected "
                                "distinct files when a source holds out records by "
                                "data.eval_fraction (they would be trained on)")
    for where, src in named:
        if src.eval_paths:
            for path in expand_paths(src.eval_paths, f"{where}.eval_paths"):
                other, _ = train.get(os.path.realpath(path), (None, False))
                if other is not None:
                    raise DataError(f"{where}.eval_paths: {path!r} is also in {other}; "
                                    "expected held-out files that training does not read")


class JsonlFile:
    """One JSONL file; the line offsets are indexed once, lines are read on demand.

    Blank (whitespace-only) lines are not records: a file with a blank line between its
    records has as many records as lines of JSON (they are not bad records either)."""

    def __init__(self, path: str):
        self.path = path
        # array('q'), not lists: 24 bytes per record instead of ~110 while indexing
        starts, ends, numbers = array.array("q"), array.array("q"), array.array("q")
        offset = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):  # some editors add it
                    line, offset = line[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
                if line.strip():
                    starts.append(offset)
                    ends.append(offset + len(line))
                    numbers.append(number)
                offset += len(line)
        self._starts = np.frombuffer(starts, dtype=np.int64)  # [records] byte offsets
        self._ends = np.frombuffer(ends, dtype=np.int64)
        self._lines = np.frombuffer(numbers, dtype=np.int64)  # 1-based line of each record
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> Record:
        # grain's reader threads (data.num_threads) share this object: pread has no shared
        # file position (seek + read on one handle mixed their records up).
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)  # one per process, kept open
                    weakref.finalize(self, os.close, self._fd)  # ... until the source goes
        start, stop = int(self._starts[i]), int(self._ends[i])
        return f"{self.path}:{self._lines[i]}", os.pread(self._fd, stop - start, start)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None, _lock=threading.Lock())


class ParquetFile:
    """One Parquet file; reads the `field` column one row group at a time, keeping the last
    `CACHED_GROUPS` groups read. Shuffled reading jumps between groups: files written with
    small row groups (tools/build_arrayrecord.py converts to ArrayRecord, which reads any
    record alone) keep it from re-reading a group per record."""

    CACHED_GROUPS = 8

    def __init__(self, path: str, field: str):
        try:
            import pyarrow.parquet as pq  # optional dependency: pip install pyarrow
        except ImportError as e:
            raise DataError(f"data.source='parquet' ({path!r}): expected the pyarrow package "
                             "to be installed (pip install pyarrow)") from e
        self.path, self.field = path, field
        meta = pq.ParquetFile(path).metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.cumsum([0] + rows).tolist()  # [num_row_groups + 1]
        self._has_field = field in pq.ParquetFile(path).schema_arrow.names
        self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._lock = threading.Lock()  # grain's reader threads share this object

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Record:
        location = f"{self.path}:{i}"
        if not self._has_field:
            return location, _MISSING
        group = bisect.bisect_right(self._starts, i) - 1
        with self._lock:
            rows = self._cache.get(group)
            if rows is not None:
                self._cache.move_to_end(group)
        if rows is None:  # read outside the lock: other threads keep reading cached groups
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.path).read_row_group(group, columns=[self.field])
            rows = table.column(0).to_pylist()
            with self._lock:
                self._cache[group] = rows
                while len(self._cache) > self.CACHED_GROUPS:
                    self._cache.popitem(last=False)
        return location, rows[i - self._starts[group]]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache=collections.OrderedDict(), _lock=threading.Lock())


class ArrayRecordFile:
    """One ArrayRecord shard of UTF-8 documents (written by tools/build_arrayrecord.py)."""

    def __init__(self, path: str):
        import grain

        self.path = path
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> Record:
        return f"{self.path}:{i}", self._source[i]


class _Missing:
    """Payload of a Parquet row whose file lacks the text column."""

    def __reduce__(self):
        return (_missing, ())


def _missing() -> _Missing:
    return _MISSING


_MISSING = _Missing()


class ConcatSource:
    """Concatenation of per-file sources, restricted to records `[start, stop)`."""

    def __init__(self, files: list[RecordSource], start: int = 0, stop: int | None = None):
        self._files = files
        self._starts = np.cumsum([0] + [len(f) for f in files]).tolist()
        self._start = start
        self._stop = self._starts[-1] if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i: int) -> Record:
        g = self._start + int(i)
        f = bisect.bisect_right(self._starts, g) - 1
        return self._files[f][g - self._starts[f]]

    def __repr__(self) -> str:
        names = ", ".join(getattr(f, "path", "?") for f in self._files[:3])
        return f"ConcatSource([{names}{', ...' if len(self._files) > 3 else ''}])"


def _open_file(kind: str, path: str, field: str) -> RecordSource:
    opener = {"jsonl": JsonlFile, "parquet": lambda p: ParquetFile(p, field),
              "arrayrecord": ArrayRecordFile}.get(kind)
    if opener is None:
        raise ValueError(f"data.source={kind!r}: expected one of jsonl, parquet, arrayrecord")
    if os.path.isdir(path):  # a pattern such as data/* matched a folder
        raise DataError(f"{path}: is a directory; expected data files (a pattern such as "
                        f"dir/*.{kind})")
    try:
        return opener(path)
    except DataError:
        raise
    except OSError as e:  # not a question of format: no permission, ...
        raise DataError(f"{path}: cannot be opened ({e.strerror or e}); expected a readable "
                        f"{kind} file") from e
    except Exception as e:  # the reader libraries' own errors (pyarrow, riegeli): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot be read as data.source={kind!r} ({first}); expected "
                        f"a file in {kind} format") from e


def split_field(src: SourceConfig, split: str) -> str:
    """The setting whose files a split reads: `eval_paths` for a held-out split that has
    them, else `paths` (the held-out split is then the last `eval_fraction` of them)."""
    return "eval_paths" if split == "eval" and src.eval_paths else "paths"


def open_source(src: SourceConfig, cfg: DataConfig, split: str,
                where: str = "data") -> RecordSource:
    """The records of one source's split (without host sharding).

    Held-out records are `eval_paths` when given, else the last `eval_fraction` of the records.
    `where`: the config section of `src` for error messages (`data.sources[1]` in a mixture).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if src.source == "synthetic":
        return corpus.SyntheticSource(
            cfg.seed, *corpus.split_bounds(cfg.num_documents, cfg.eval_fraction, split))
    if src.eval_paths:
        field = split_field(src, split)
        return ConcatSource([_open_file(src.source, p, src.text_field) for p in
                             expand_paths(getattr(src, field), f"{where}.{field}")])
    whole = ConcatSource([_open_file(src.source, p, src.text_field)
                          for p in expand_paths(src.paths, f"{where}.paths")])
    n = len(whole)
    if n < 2:
        raise DataError(f"{where}.paths={src.paths!r}: expected at least 2 records to hold "
                        f"out an eval split (or give {where}.eval_paths)")
    start, stop = corpus.split_bounds(n, cfg.eval_fraction, split)
    return ConcatSource(whole._files, start, stop)  # pylint: disable=protected-access


def one_line(e: BaseException) -> str:
    """An exception's message on one line (for a tool's `error:` line), or its repr."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)


def _decode(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", str(e)) from None


def check_utf8(text: str) -> str:
    """`text` if it encodes as UTF-8; a lone surrogate (e.g. a JSON `\\ud800` escape, which is
    valid JSON) raises `BadRecord("not_utf8")`."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord("not_utf8", str(e)) from None
    return text


def parse_text(kind: str, field: str, payload: Any) -> str:
    """The document text of a raw record; raises `BadRecord` for every kind of bad record."""
    decoded = False  # text from a strict UTF-8 decode holds no lone surrogate: not re-checked
    if kind == "jsonl":
        try:
            obj = json.loads(_decode(payload))
        except json.JSONDecodeError as e:
            raise BadRecord("invalid_json", str(e)) from None
        if not isinstance(obj, dict) or field not in obj:
            raise BadRecord("missing_field", f"no field {field!r}")
        text = obj[field]
    elif kind == "parquet":
        if payload is None or isinstance(payload, _Missing):
            raise BadRecord("missing_field", f"no value in column {field!r}")
        decoded = isinstance(payload, bytes)  # a binary column
        text = _decode(payload) if decoded else payload
    elif kind == "arrayrecord":
        text, decoded = _decode(payload), True
    else:  # synthetic
        text = payload
    if not isinstance(text, str):
        raise BadRecord("missing_field", f"field {field!r} is a {type(text).__name__}, not text")
    if not text.strip():
        raise BadRecord("empty_text")
    return text if decoded else check_utf8(text)


def iter_texts(kind: str, patterns: tuple[str, ...], field: str = "text", *,
               strict: bool = False, bad_counts: dict[str, int] | None = None,
               num_documents: int = 0, seed: int = 0) -> Iterator[tuple[str, str]]:
    """`(location, text)` of every good record of the files (in order), for offline tools.

    Bad records are skipped and counted into `bad_counts` (or raised with their location when
    `strict`). `kind="synthetic"` ignores `patterns` and yields `num_documents` documents.
    """
    if kind == "synthetic":
        files: list[RecordSource] = [corpus.SyntheticSource(seed, 0, num_documents)]
    else:
        files = [_open_file(kind, p, field) for p in expand_paths(patterns)]
    for f in files:
        for i in range(len(f)):
            location, payload = f[i]
            try:
                yield location, parse_text(kind, field, payload)
            except BadRecord as e:
                if strict:
                    raise BadRecordError(f"{location}: bad record ({e})") from None
                if bad_counts is not None:
                    bad_counts[e.reason] = bad_counts.get(e.reason, 0) + 1

"""Typed configuration of the input pipeline (the `data:` section of a jaxmoe config).

Defaults live only here. YAML gives lists where these dataclasses hold tuples, and mappings
where they hold `SourceConfig`s; `__post_init__` normalises both, so
`DataConfig(**yaml_dict["data"])` works as is.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

SOURCE_KINDS = ("synthetic", "jsonl", "parquet", "arrayrecord")
SEED_MAX = 2**32 - 1  # seeds are uint32: jax.random.key keeps only the low 32 bits


def _fail(field: str, value: Any, expected: str, prefix: str = "data") -> None:
    raise ValueError(f"{prefix}.{field}={value!r}: expected {expected}")


def _as_str_tuple(field: str, value: Any, prefix: str = "data") -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail(field, value, "a list of paths or glob patterns", prefix)
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One weighted source of a mixture (`data.source: mixture`, `data.sources: [...]`).

    `paths`/`eval_paths` are files or glob patterns. Without `eval_paths` the held-out split
    is the last `eval_fraction` of the source's records (by record index).
    `key` (not a field) is how error messages name this entry, e.g. `data.sources[1]`.
    """

    source: str = "synthetic"
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    text_field: str = "text"
    weight: float = 1.0
    key: dataclasses.InitVar[str] = "data.sources"

    def __post_init__(self, key: str) -> None:
        for name in ("paths", "eval_paths"):
            object.__setattr__(self, name, _as_str_tuple(name, getattr(self, name), key))
        if self.source not in SOURCE_KINDS:
            _fail("source", self.source, f"one of {', '.join(SOURCE_KINDS)}", key)
        if self.source != "synthetic" and not self.paths:
            _fail("paths", self.paths, f"at least one path for source {self.source!r}", key)
        if self.source == "synthetic" and (self.paths or self.eval_paths):
            name = "paths" if self.paths else "eval_paths"
            _fail(name, list(getattr(self, name)), "no files for source 'synthetic' (the "
                  "embedded corpus); set its source to jsonl, parquet or arrayrecord", key)
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (
                math.isfinite(w) and w > 0):
            _fail("weight", w, "a positive number", key)
        if not isinstance(self.text_field, str) or not self.text_field:
            _fail("text_field", self.text_field, "a non-empty field name", key)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are packed into `[batch, seq_len]` rows.

    `source="synthetic"` is the embedded default corpus (no files, no downloads).
    `source` in {jsonl, parquet, arrayrecord} reads `paths` (and `eval_paths`);
    `source="mixture"` mixes `sources` with their weights.
    `tokenizer` is "byte" (259 ids, no files) or a path to a Hugging Face `tokenizer.json`
    or a SentencePiece `.model`; its special tokens are looked up by `*_token`.
    """

    source: str = "synthetic"
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    text_field: str = "text"  # JSONL / Parquet field (column) holding the document text
    sources: tuple[SourceConfig, ...] = ()  # only with source="mixture"
    tokenizer: str = "byte"
    pad_token: str = "<pad>"
    bos_token: str = "<bos>"
    eos_token: str = "<eos>"
    add_bos: bool = True
    add_eos: bool = True
    seq_len: int = 256
    num_documents: int = 20000  # size of the synthetic corpus (train + held-out)
    eval_fraction: float = 0.05
    # Seeds the synthetic corpus only (which documents it generates); the shuffle of every
    # source, file sources included, uses train.seed. An integer in [0, 2**32 - 1].
    seed: int = 0
    packing: bool = True  # False: one document (piece) per row, padded
    shuffle: bool = True  # train split only; eval is read in order
    strict: bool = False  # bad records raise (with their location) instead of being skipped
    # Skipped bad records stop the run once more than this fraction of the records read from
    # one source are bad (judged per source, from its 100th bad record on): a wrong
    # text_field or format would otherwise make every record bad and the reader loop over
    # the files for ever.
    max_bad_fraction: float = 0.1
    # grain worker processes (0: all in the calling process). Each worker packs its own slice,
    # so the batch order depends on num_workers: a resume with another value is refused
    # (train.restart_data=true reads the data afresh).
    num_workers: int = 0
    worker_buffer_size: int = 2  # batches buffered per worker process
    # grain ReadOptions reader threads: 0 is fastest for in-memory / local data (no GIL
    # contention); raise it for slow storage (GCS, NFS).
    num_threads: int = 0
    prefetch_buffer_size: int = 128  # grain ReadOptions buffer (documents)

    def __post_init__(self) -> None:
        # Types first (jaxmoe's config loader checks them too; a DataConfig built in Python
        # or by a tool may hold a YAML 1.1 string such as "1e3", or a float length).
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), f.type
            if want in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                _fail(f.name, value, "an integer")
            if want in ("bool", bool) and not isinstance(value, bool):
                _fail(f.name, value, "true or false")
            if want in ("float", float) and (isinstance(value, bool)
                                             or not isinstance(value, (int, float))):
                _fail(f.name, value, "a number")
        object.__setattr__(self, "paths", _as_str_tuple("paths", self.paths))
        if isinstance(self.tokenizer, str) and self.tokenizer.startswith("~"):
            # a file path like data.paths' patterns (expanded when globbed)
            object.__setattr__(self, "tokenizer", os.path.expanduser(self.tokenizer))
        object.__setattr__(self, "eval_paths", _as_str_tuple("eval_paths", self.eval_paths))
        if not isinstance(self.sources, (list, tuple)):
            _fail("sources", self.sources, "a list of {source, paths, weight, ...} mappings")
        sources = []
        for i, s in enumerate(self.sources):
            if isinstance(s, dict):
                unknown = set(s) - {f.name for f in dataclasses.fields(SourceConfig)}
                if unknown:
                    _fail("sources", s, f"mappings without unknown keys {sorted(unknown)}")
                s = SourceConfig(**s, key=f"data.sources[{i}]")
            if not isinstance(s, SourceConfig):
                _fail("sources", s, "a mapping of SourceConfig fields")
            sources.append(s)
        object.__setattr__(self, "sources", tuple(sources))

        if self.source == "mixture":
            if not self.sources:
                _fail("sources", self.sources, "a non-empty list when data.source='mixture'")
            for name in ("paths", "eval_paths"):
                if getattr(self, name):
                    _fail(name, list(getattr(self, name)), "none with data.source='mixture' "
                          "(each of data.sources has its own)")
        elif self.source in SOURCE_KINDS:
            if self.sources:
                _fail("sources", "[...]", "an empty list unless data.source='mixture'")
            if self.source != "synthetic" and not self.paths:
                _fail("paths", self.paths, f"at least one path for data.source={self.source!r}")
            if self.source == "synthetic" and (self.paths or self.eval_paths):
                name = "paths" if self.paths else "eval_paths"
                _fail(name, list(getattr(self, name)), "no files with data.source='synthetic' "
                      "(the embedded corpus); set data.source to jsonl, parquet or arrayrecord "
                      "to read them")
        else:
            _fail("source", self.source, f"one of {', '.join(SOURCE_KINDS)}, mixture")
        if not isinstance(self.text_field, str) or not self.text_field:
            _fail("text_field", self.text_field, "a non-empty field name")
        if not isinstance(self.tokenizer, str) or not (
                self.tokenizer == "byte" or self.tokenizer.endswith((".json", ".model"))):
            _fail("tokenizer", self.tokenizer, "'byte', a Hugging Face tokenizer .json file or a "
                  "SentencePiece .model file")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len}: expected an integer >= 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(
                f"data.eval_fraction={self.eval_fraction}: expected a fraction in (0, 1)"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            _fail("max_bad_fraction", self.max_bad_fraction, "a fraction in [0, 1]")
        if self.num_documents < 2:
            raise ValueError(f"data.num_documents={self.num_documents}: expected >= 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed <= SEED_MAX):
            _fail("seed", self.seed, f"an integer in [0, {SEED_MAX}]")
        for name in ("num_workers", "num_threads"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "an integer >= 0")
        for name in ("worker_buffer_size", "prefetch_buffer_size"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "an integer >= 1")

    def source_configs(self) -> tuple[SourceConfig, ...]:
        """The sources to read: `sources` for a mixture, else the single top-level source."""
        if self.source == "mixture":
            return self.sources
        return (SourceConfig(source=self.source, paths=self.paths, eval_paths=self.eval_paths,
                             text_field=self.text_field),)

    def named_sources(self) -> list[tuple[str, SourceConfig]]:
        """`source_configs()` with the config section each comes from, for messages:
        `data.sources[i]` in a mixture, else `data`."""
        if self.source == "mixture":
            return [(f"data.sources[{i}]", s) for i, s in enumerate(self.sources)]
        return [("data", s) for s in self.source_configs()]

"""Records -> tokenized documents on grain, with bad records skipped (and counted) or raised.

`ParseAndTokenize` runs in grain's reader threads / worker processes and never raises for a bad
record: it returns a marker, and `DocumentIterDataset` (a stateful grain iterator) counts it,
logs its location, or raises `BadRecordError` in strict mode. The counts live in the iterator
state, so they survive checkpoint/restore and are summed across worker processes. They are
kept per source (`data` or `data.sources[i]`) too, and `max_bad_fraction` is judged per
source: a misspelt `text_field` in a mixture source of small weight stops the run as well.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from input_pipeline.sources import BadRecord, BadRecordError, DataError, parse_text
from input_pipeline.tokenizer import Tokenizer, encode_document

log = logging.getLogger("input_pipeline")

STATE_KEY = "input_pipeline_documents"  # marks this iterator's state inside grain's state tree
_LOG_FIRST = 100  # log every bad record up to this many, then only at powers of ten
# `max_bad_fraction` is judged once this many records were bad (a few bad records at the
# start of a good corpus must not stop it).
MIN_BAD_TO_STOP = 100


class ParseAndTokenize(grain.transforms.Map):
    """`(location, payload)` -> `{"ids": int32 [num_tokens], "loc", "src"}` or
    `{"bad", "detail", "loc", "src"}`.

    `ids` is `[BOS] + tokens + [EOS]` (as `add_bos`/`add_eos` say); `src` names the source
    in the config (`data`, `data.sources[i]`).
    """

    def __init__(self, kind: str, field: str, tokenizer: Tokenizer, add_bos: bool, add_eos: bool,
                 source: str = "data"):
        self._kind, self._field, self._tokenizer = kind, field, tokenizer
        self._add_bos, self._add_eos = add_bos, add_eos
        self._source = source

    def map(self, record: tuple[str, Any]) -> dict[str, Any]:
        location, payload = record
        try:
            text = parse_text(self._kind, self._field, payload)
            ids = encode_document(self._tokenizer, text, self._add_bos, self._add_eos)
            if len(ids) < 2:
                raise BadRecord("empty_text", "fewer than 2 tokens after tokenization")
        except BadRecord as e:
            return {"bad": e.reason, "detail": str(e), "loc": location, "src": self._source}
        return {"ids": ids, "loc": location, "src": self._source}


class DocumentIterDataset(grain.IterDataset):
    """Good documents as `{"inputs", "targets"}` (int32, `[n]` each, `n = len(ids) - 1`).

    Parent elements are `{"ids", "loc"}`, bad-record markers `{"bad", "detail", "loc"}`, or
    `{"example", "loc"}` (emitted as is), each with an optional `src` (the source's config
    name, default `data`) that bad records are counted and judged by.

    With `chunk_len`, a document longer than `chunk_len` pairs is emitted as several pieces of
    at most `chunk_len` (the padding-only mode); without it, whole documents (the packer splits).
    `check`: what the too-many-bad-records error tells the user to check (default: the
    source's `source` and `text_field` settings).
    """

    def __init__(self, parent: grain.IterDataset, *, chunk_len: int | None, strict: bool,
                 max_bad_fraction: float | None = None, check: str | None = None):
        super().__init__(parent)
        self._chunk_len, self._strict = chunk_len, strict
        self._max_bad_fraction, self._check = max_bad_fraction, check

    def __iter__(self) -> grain.DatasetIterator:
        return _DocumentIterator(self._parent.__iter__(), self._chunk_len, self._strict,
                                 self._max_bad_fraction, self._check)

    def __str__(self) -> str:
        return f"DocumentIterDataset(chunk_len={self._chunk_len}, strict={self._strict})"


class _DocumentIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, chunk_len: int | None, strict: bool,
                 max_bad_fraction: float | None = None, check: str | None = None):
        super().__init__(parent)
        self._chunk_len, self._strict = chunk_len, strict
        self._max_bad_fraction = max_bad_fraction
        self._check = check  # what the too-many-bad-records error tells to check
        self._bad: dict[str, int] = {}
        self._docs = 0
        # per source: {"documents": n, "bad_records": {reason: n}} (totals above)
        self._sources: dict[str, dict[str, Any]] = {}
        self._current: np.ndarray | None = None  # ids of the document being emitted
        self._current_src = "data"
        self._current_parent_state: dict | None = None
        self._chunk = 0  # next piece of the current document

    def _source(self, name: str) -> dict[str, Any]:
        return self._sources.setdefault(name, {"documents": 0, "bad_records": {}})

    def _count_document(self, src: str) -> None:
        self._docs += 1
        self._source(src)["documents"] += 1

    def _on_bad(self, rec: dict[str, Any]) -> None:
        message = f"{rec['loc']}: bad record ({rec['detail']})"
        if self._strict:
            raise BadRecordError(message)
        self._bad[rec["bad"]] = self._bad.get(rec["bad"], 0) + 1
        total = sum(self._bad.values())
        if total <= _LOG_FIRST or np.log10(total).is_integer():
            log.warning("skipped %s [%d bad records so far]", message, total)
        name = rec.get("src", "data")
        source = self._source(name)
        source["bad_records"][rec["bad"]] = source["bad_records"].get(rec["bad"], 0) + 1
        bad = sum(source["bad_records"].values())
        seen = bad + source["documents"]
        limit = self._max_bad_fraction
        if limit is not None and bad >= MIN_BAD_TO_STOP and bad > limit * seen:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(source["bad_records"].items()))
            where = "" if name == "data" else f"{name}: "
            raise DataError(
                f"{where}{bad} of the {seen} records read{' from it' if where else ''} are bad "
                f"({reasons}; the last: {message}), more than data.max_bad_fraction={limit}; "
                f"expected mostly good records (check "
                f"{self._check or f'{name}.source and {name}.text_field'}) or "
                "a larger data.max_bad_fraction")

    def __next__(self) -> dict[str, np.ndarray]:
        while self._current is None:
            state = self._parent.get_state()
            rec = next(self._parent)
            if "bad" in rec:
                self._on_bad(rec)
                continue
            if "example" in rec:  # a ready example (multimodal): passed through whole
                self._count_document(rec.get("src", "data"))
                return rec["example"]
            self._current, self._current_parent_state, self._chunk = rec["ids"], state, 0
            self._current_src = rec.get("src", "data")
        ids = self._current
        n = len(ids) - 1
        step = n if self._chunk_len is None else self._chunk_len
        start = self._chunk * step
        stop = min(n, start + step)
        self._chunk += 1
        if stop >= n:
            self._current, self._current_parent_state, self._chunk = None, None, 0
            self._count_document(self._current_src)
        return {"inputs": ids[start:stop], "targets": ids[start + 1:stop + 1]}

    def get_state(self) -> dict[str, Any]:
        in_doc = self._current is not None
        return {
            "parent": self._current_parent_state if in_doc else self._parent.get_state(),
            "chunk": self._chunk if in_doc else 0,
            STATE_KEY: {"documents": self._docs, "bad_records": dict(self._bad),
                        "sources": _copy_sources(self._sources)},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        own = state[STATE_KEY]
        self._docs, self._bad = own["documents"], dict(own["bad_records"])
        # States saved before per-source counts existed start those counts afresh.
        self._sources = _copy_sources(own.get("sources", {}))
        self._current, self._current_parent_state, self._chunk = None, None, 0
        if state["chunk"]:  # resume in the middle of a document: re-read it
            rec = next(self._parent)
            self._current, self._current_parent_state = rec["ids"], state["parent"]
            self._current_src = rec.get("src", "data")
            self._chunk = state["chunk"]


def _copy_sources(sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of per-source counts `{name: {"documents": n, "bad_records": {reason: n}}}`."""
    return {k: {"documents": v["documents"], "bad_records": dict(v["bad_records"])}
            for k, v in sources.items()}


def collect_counts(state: Any) -> tuple[int, dict[str, int]]:
    """Sums (documents, bad records by reason) over every document iterator in a state tree."""
    docs, bad = 0, {}
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if STATE_KEY in node:
                docs += node[STATE_KEY]["documents"]
                for k, v in node[STATE_KEY]["bad_records"].items():
                    bad[k] = bad.get(k, 0) + v
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return docs, bad

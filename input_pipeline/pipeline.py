"""`make_dataset`: sources -> shard per host -> shuffle -> mix -> tokenize -> pack -> batch.

Each stage is a grain dataset, so the whole pipeline is deterministic given `seed`, and the
iterator's state (`get_state`/`set_state`) is a small JSON-serialisable dict. Order of stages:

    per source:  MapDataset.source(records)[process_index::process_count]
                 .shuffle(seed_i).repeat(num_epochs)            (train; eval reads in order)
                 .map(ParseAndTokenize)
    MapDataset.mix(sources, weights)  (train)  |  interleaved by weight, each once  (eval)
    .to_iter_dataset(ReadOptions(num_threads))       reader threads
    DocumentIterDataset                              skip/count bad records; split long docs
    ConcatThenSplitIterDataset | pad one per row     `[seq_len]` rows
    .batch(batch_size)                               `[batch, seq_len]`
    .mp_prefetch(num_workers)                        worker processes (each packs its slice)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from input_pipeline.config import DataConfig
from input_pipeline.documents import DocumentIterDataset, ParseAndTokenize, collect_counts
from input_pipeline.fingerprint import fingerprint
from input_pipeline.sources import DataError, open_source, split_field
from input_pipeline.tokenizer import make_tokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def _finalize_packed(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """ConcatThenSplit output -> the four `[seq_len]` int32 arrays of the batch contract."""
    segment_ids = row["inputs_segment_ids"].astype(np.int32)
    pad = segment_ids == 0
    out = {
        "inputs": np.where(pad, pad_id, row["inputs"]).astype(np.int32),
        "targets": np.where(pad, pad_id, row["targets"]).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.where(pad, 0, row["inputs_positions"]).astype(np.int32),
    }
    return out


def _pad_row(doc: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One document piece (`n <= seq_len` pairs) -> a padded `[seq_len]` row, segment 1."""
    n = len(doc["inputs"])
    out = {k: np.full((seq_len,), pad_id, np.int32) for k in ("inputs", "targets")}
    out["inputs"][:n], out["targets"][:n] = doc["inputs"], doc["targets"]
    out["segment_ids"] = np.zeros((seq_len,), np.int32)
    out["segment_ids"][:n] = 1
    out["positions"] = np.zeros((seq_len,), np.int32)
    out["positions"][:n] = np.arange(n, dtype=np.int32)
    return out


def stack_rows(rows: list[dict[str, np.ndarray]], batch_size: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """Stacks rows into `[batch_size, ...]`; a short final batch gets all-padding rows."""
    out = {}
    for k in rows[0]:
        x = np.stack([r[k] for r in rows])  # [n, ...]
        if len(rows) < batch_size:
            fill = pad_id if k in ("inputs", "targets") else 0
            x = np.concatenate([x, np.full((batch_size - len(rows), *x.shape[1:]), fill, x.dtype)])
        out[k] = x
    return out


def mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a non-absl program never parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def weighted_order(lengths: list[int], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Every element of sources of `lengths` once, interleaved in proportion to `weights`.

    Element k of source i comes at virtual time (k + 1/2) / weights[i]; the elements are
    read in order of time (ties: lower source first). Any prefix then holds, of each source
    not yet run out, its weighted share to within (1 + len(lengths)) / 2 elements; a source
    that runs out drops out and the others go on in their proportions. Returns
    (source, index in source), two `[sum(lengths)]` arrays.
    """
    times = np.concatenate([(np.arange(n) + 0.5) / w for n, w in zip(lengths, weights)])
    sources = np.repeat(np.arange(len(lengths)), lengths)
    keys = np.concatenate([np.arange(n) for n in lengths])
    order = np.lexsort((sources, times))  # by time, then source
    return sources[order], keys[order]


class WeightedInterleave(grain.transforms.DatasetSelectionMap):
    """Selection map of a mixture's eval split: `weighted_order` of finite sources, so any
    prefix of the split represents the mixture and the whole reads each element once."""

    def __init__(self, lengths: list[int], weights: list[float]):
        self._lengths = list(lengths)
        self._sources, self._keys = weighted_order(self._lengths, list(weights))

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch, i = divmod(index, len(self))  # past the end: each source's next epoch
        source = int(self._sources[i])
        return source, int(self._keys[i]) + epoch * self._lengths[source]


def document_dataset(cfg: DataConfig, *, split: str, seed: int, process_index: int = 0,
                     process_count: int = 1, num_epochs: int | None = None,
                     chunk_len: int | None = None) -> grain.IterDataset:
    """Tokenized documents `{"inputs", "targets"}` of this host's shard (before packing)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}: expected in [0, {process_count})")
    train = split == "train"
    if num_epochs is None and not train:
        num_epochs = 1
    tokenizer = make_tokenizer(cfg)
    per_source = []
    for i, (name, src) in enumerate(cfg.named_sources()):
        records = open_source(src, cfg, split, name)
        if not len(records):  # empty or blank-line-only files
            field = split_field(src, split)
            raise DataError(f"{name}.{field}={list(getattr(src, field))!r}: expected records "
                            f"for the {split} split; the files hold none")
        if len(records) < process_count:
            raise DataError(f"data.source={src.source!r} ({split}): {len(records)} records "
                             f"cannot be sharded over {process_count} processes")
        ds = grain.MapDataset.source(records)[process_index::process_count]
        if train and cfg.shuffle:
            ds = ds.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        per_source.append(ds.map(ParseAndTokenize(
            src.source, src.text_field, tokenizer, cfg.add_bos, cfg.add_eos, name)))
    if len(per_source) == 1:
        ds = per_source[0]
    elif train:
        ds = grain.MapDataset.mix(per_source, [s.weight for s in cfg.source_configs()])
    else:
        ds = grain.MapDataset.select_from_datasets(per_source, WeightedInterleave(
            [len(d) for d in per_source], [s.weight for s in cfg.source_configs()]))
    read = grain.ReadOptions(num_threads=cfg.num_threads,
                             prefetch_buffer_size=cfg.prefetch_buffer_size)
    return DocumentIterDataset(ds.to_iter_dataset(read), chunk_len=chunk_len, strict=cfg.strict,
                               max_bad_fraction=cfg.max_bad_fraction)


def make_grain_dataset(cfg: DataConfig, *, split: str, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None) -> grain.IterDataset:
    """The batched grain `IterDataset` behind `make_dataset`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    pad_id = make_tokenizer(cfg).pad_id
    L = cfg.seq_len
    docs = document_dataset(cfg, split=split, seed=seed, process_index=process_index,
                            process_count=process_count, num_epochs=num_epochs,
                            chunk_len=None if cfg.packing else L)
    if cfg.packing:
        rows = grain.experimental.ConcatThenSplitIterDataset(
            docs, length_struct={"inputs": L, "targets": L})
        rows = rows.map(functools.partial(_finalize_packed, pad_id=pad_id))
    else:
        rows = docs.map(functools.partial(_pad_row, seq_len=L, pad_id=pad_id))
    batches = rows.batch(batch_size, batch_fn=functools.partial(
        stack_rows, batch_size=batch_size, pad_id=pad_id))
    if cfg.num_workers > 0:
        mark_absl_flags_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return batches


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    """Counters of the batches consumed so far (restored with the iterator state)."""

    batches: int
    real_tokens: int  # slots holding a document token (segment_ids > 0)
    slots: int  # batch * seq_len per batch
    documents: int  # documents fully emitted by the document stage
    bad_records: dict[str, int]  # reason -> count

    @property
    def packing_efficiency(self) -> float:
        return self.real_tokens / max(self.slots, 1)


def _from_json(state: Any) -> Any:
    """grain's packer marks "no remainder" with the tuple (-1, -1) and compares with `!=`:
    the list a JSON checkpoint gives back is taken for a slice, and a document is lost.
    Turns the packer's slices (under `remainder_slices`, at any depth) back into tuples."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) if isinstance(v, list) else v for f, v in s.items()}
                    if k == "remainder_slices" and isinstance(s, dict) else _from_json(s))
                for k, s in state.items()}
    if isinstance(state, list):
        return [_from_json(s) for s in state]
    return state


class DataIterator:
    """A grain iterator of batches plus counters; `get_state()` is JSON-serialisable.

    `inputs`: the fingerprint of what the stream reads (`input_pipeline/fingerprint.py`),
    saved in its state for a resumed run to compare; None for collated in-memory examples.
    `shard`: (data shard, shards) of this stream (records `shard::shards`), saved too: a
    position belongs to that shard of the records only.
    """

    def __init__(self, iterator: grain.DatasetIterator, inputs: dict[str, Any] | None = None,
                 shard: tuple[int, int] | None = None):
        self._it = iterator
        self._batches = self._real = self._slots = 0
        self.inputs = inputs
        self.shard = shard

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # Plain arrays: with worker processes grain hands over shared-memory arrays, which
        # would otherwise stay mapped (and leak at exit) as long as the caller holds them.
        batch = {k: np.array(v, copy=True) for k, v in next(self._it).items()}
        self._batches += 1
        if "segment_ids" in batch:
            self._real += int(np.count_nonzero(batch["segment_ids"]))
            self._slots += int(batch["segment_ids"].size)
        return batch

    def get_state(self) -> dict[str, Any]:
        state = {"grain": self._it.get_state(), "batches": self._batches,
                 "real_tokens": self._real, "slots": self._slots}
        if self.inputs is not None:
            state["inputs"] = self.inputs
        if self.shard is not None:
            state["shard"] = list(self.shard)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Accepts `get_state()`'s dict, also after a JSON round trip (a checkpoint); its
        `inputs` fingerprint is for the caller to compare (`fingerprint.changes`)."""
        self._it.set_state(_from_json(state["grain"]))
        self._batches, self._real, self._slots = (
            state["batches"], state["real_tokens"], state["slots"])

    def stats(self) -> PipelineStats:
        """Counters up to the last batch delivered. Documents and bad records come from
        grain's iterator state, which can lag: with packing, the documents read for the rows
        just delivered may count only once the packer's next state is taken (one row late);
        with worker processes, once a batch built after them is delivered."""
        docs, bad = collect_counts(self._it.get_state())
        return PipelineStats(self._batches, self._real, self._slots, docs, bad)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_dataset(cfg: DataConfig, *, split: str, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> DataIterator:
    """An iterator of `[batch_size, seq_len]` int32 batches of this process's data shard.

    Keys: `inputs`, `targets` (next tokens), `segment_ids` (1, 2, ... per packed document
    piece; 0 on padding) and `positions` (0-based within the segment; 0 on padding).
    `batch_size` is per process; the global batch is the union over processes, which read
    disjoint records. Train repeats forever when `num_epochs` is None; eval reads one epoch in
    order, and its last batch is filled with padding rows. A train mixture with a finite
    `num_epochs` ends when its first source has given its epochs (grain's mix stops there):
    the other sources are cut short.
    """
    ds = make_grain_dataset(cfg, split=split, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            num_epochs=num_epochs)
    return DataIterator(ds.__iter__(), fingerprint(cfg, split), (process_index, process_count))


def packing_efficiency(batches: Any) -> float:
    """Real tokens / slots over one batch (a dict) or an iterable of batches."""
    if isinstance(batches, dict):
        batches = [batches]
    real = slots = 0
    for b in batches:
        real += int(np.count_nonzero(b["segment_ids"]))
        slots += int(b["segment_ids"].size)
    return real / max(slots, 1)


def corpus_unigram_entropy(cfg: DataConfig, max_documents: int | None = 20000) -> float:
    """Entropy (nats/token) of the unigram distribution of the train split's target tokens.

    Targets are `doc[1:]` of every `[BOS] + tokens + [EOS]` document (EOS counted, BOS not),
    the same tokens the loss is taken over. Uses the first `max_documents` documents of the
    unshuffled train stream read once; None: all of it (a mixture's mixed stream ends when
    its first source runs out, so it holds the sources in the proportions of their weights,
    not all of their records).

    The synthetic corpus with the byte tokenizer is a function of `cfg` alone, so its
    entropy is computed once per process (about 2 s for 20,000 documents, at the end of
    every run); files can change, so their corpus is read each time.
    """
    if cfg.source == "synthetic" and cfg.tokenizer == "byte":
        return _synthetic_unigram_entropy(cfg, max_documents)
    return _unigram_entropy(cfg, max_documents)


@functools.lru_cache(maxsize=8)
def _synthetic_unigram_entropy(cfg: DataConfig, max_documents: int | None) -> float:
    return _unigram_entropy(cfg, max_documents)


def _unigram_entropy(cfg: DataConfig, max_documents: int | None) -> float:
    tokenizer = make_tokenizer(cfg)
    unshuffled = dataclasses.replace(cfg, shuffle=False, strict=False)
    docs = document_dataset(unshuffled, split="train", seed=0, num_epochs=1).__iter__()
    counts = np.zeros((tokenizer.vocab_size,), np.int64)
    for i, doc in enumerate(docs):
        if max_documents is not None and i >= max_documents:
            break
        counts += np.bincount(doc["targets"], minlength=tokenizer.vocab_size)[:len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

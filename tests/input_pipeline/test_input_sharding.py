"""Per-host sharding (disjoint, covering), source mixing, train/eval split."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from input_pipeline import DataConfig, make_dataset, make_tokenizer
from input_pipeline.corpus import split_bounds
from input_pipeline.pipeline import document_dataset
from tests.input_pipeline._ip_helpers import all_batches, tmpfile, unique_texts, write_jsonl


def _row_texts(batches) -> list[str]:
    tok = make_tokenizer(DataConfig())
    out = []
    for b in batches:
        for inp, seg in zip(b["inputs"], b["segment_ids"]):
            if seg.any():
                out.append(tok.decode(inp[seg > 0].tolist()))
    return out


@pytest.mark.parametrize("process_count", [2, 3])
def test_hosts_disjoint_and_covering(tmp_path, process_count: int) -> None:
    texts = unique_texts(101)
    path = write_jsonl(tmpfile(tmp_path, "a.jsonl"), texts)
    cfg = DataConfig(source="jsonl", paths=(path,), seq_len=256, packing=False,
                     eval_fraction=0.1)
    seen = []
    for host in range(process_count):
        batches = all_batches(cfg, split="train", batch_size=4, seed=3, num_epochs=1,
                              process_index=host, process_count=process_count)
        seen.append(set(_row_texts(batches)))
    start, stop = split_bounds(len(texts), 0.1, "train")
    assert set().union(*seen) == set(texts[start:stop])  # covering
    assert sum(len(s) for s in seen) == stop - start  # disjoint
    assert all(abs(len(s) - (stop - start) / process_count) <= 1 for s in seen)


def test_train_eval_disjoint_synthetic() -> None:
    cfg = DataConfig(num_documents=60, eval_fraction=0.2, seq_len=512, packing=False)
    train = set(_row_texts(all_batches(cfg, split="train", batch_size=8, seed=0, num_epochs=1)))
    evals = set(_row_texts(all_batches(cfg, split="eval", batch_size=8, seed=0)))
    assert len(train) == 48 and len(evals) == 12 and not train & evals


def test_eval_paths_are_the_eval_split(tmp_path) -> None:
    a = write_jsonl(tmpfile(tmp_path, "train.jsonl"), unique_texts(10, "train"))
    b = write_jsonl(tmpfile(tmp_path, "eval.jsonl"), unique_texts(6, "eval"))
    cfg = DataConfig(source="jsonl", paths=(a,), eval_paths=(b,), seq_len=256, packing=False)
    assert sorted(_row_texts(all_batches(cfg, split="eval", batch_size=4, seed=0))) == sorted(
        unique_texts(6, "eval"))


def test_mixture_follows_weights(tmp_path) -> None:
    a = write_jsonl(tmpfile(tmp_path, "a.jsonl"), unique_texts(50, "A"))
    b = write_jsonl(tmpfile(tmp_path, "b.jsonl"), unique_texts(50, "B"))
    cfg = DataConfig(source="mixture", sources=(
        {"source": "jsonl", "paths": [a], "weight": 3.0},
        {"source": "jsonl", "paths": [b], "weight": 1.0},
        {"source": "synthetic", "weight": 1.0}))
    docs = document_dataset(cfg, split="train", seed=0).__iter__()
    tok = make_tokenizer(cfg)
    kinds = collections.Counter()
    for _ in range(500):
        text = tok.decode(next(docs)["inputs"].tolist())
        kinds[text[0] if text[0] in "AB" else "synthetic"] += 1
    assert kinds["A"] == pytest.approx(300, abs=3) and kinds["B"] == pytest.approx(100, abs=3)
    assert kinds["synthetic"] == pytest.approx(100, abs=3)


def _held_out_mixture(tmp_path, evals: dict[str, list[str]], weights: list[float],
                      **kw) -> DataConfig:
    """A mixture of jsonl sources named by `evals`' keys, each with its own eval file."""
    sources = tuple({"source": "jsonl", "weight": w,
                     "paths": [write_jsonl(tmpfile(tmp_path, f"{n}.jsonl"), [n] * 4)],
                     "eval_paths": [write_jsonl(tmpfile(tmp_path, f"e{n}.jsonl"), texts)]}
                    for (n, texts), w in zip(evals.items(), weights))
    return DataConfig(source="mixture", sources=sources, **kw)


def test_mixture_eval_reads_every_held_out_document_once_interleaved_by_weight(tmp_path) -> None:
    """A mixture's eval split is every source's held-out documents, each once, in file order
    within a source, interleaved by weight: document k of a source of weight w comes at
    time (k + 1/2) / w, ties to the earlier source; once the smaller source runs out the
    other goes on alone (a weighted `mix` would stop there and drop documents). Reference:
    the texts written here, ordered by hand: B's times 1/6, 1/2, 5/6 and A's 1/2, 3/2, ..."""
    eval_a, eval_b = unique_texts(10, "A"), unique_texts(3, "B")
    cfg = _held_out_mixture(tmp_path, {"a": eval_a, "b": eval_b}, [1.0, 3.0], seq_len=256,
                            packing=False)
    texts = _row_texts(all_batches(cfg, split="eval", batch_size=4, seed=0))
    assert texts == [eval_b[0], eval_a[0], eval_b[1], eval_b[2]] + eval_a[1:]
    assert sorted(texts) == sorted(eval_a + eval_b)  # each once


def test_mixture_eval_prefix_holds_every_source_by_weight(tmp_path) -> None:
    """The first eval batches (what `train.eval_batches` keeps) hold tokens of every source
    in proportion to the weights 1:2:3. Documents are 30 letters (a few more than 15 of them
    in 2 packed batches of [4, 64]); reference: each source's weighted share of the letters
    the batches hold, within one document (30 letters). The old split (sources end to end)
    gave source a every letter."""
    evals = {n: [n * 30] * 60 for n in "abc"}
    cfg = _held_out_mixture(tmp_path, evals, [1.0, 2.0, 3.0], seq_len=64, packing=True)
    it = make_dataset(cfg, split="eval", batch_size=4, seed=0, num_epochs=1)
    try:
        inputs = np.concatenate([next(it)["inputs"].ravel() for _ in range(2)])
    finally:
        it.close()
    tok = make_tokenizer(cfg)
    letters = {n: int(np.sum(inputs == tok.encode(n)[0])) for n in "abc"}
    total = sum(letters.values())
    assert total > 400  # the batches are full of documents
    for n, w in zip("abc", [1, 2, 3]):
        assert letters[n] == pytest.approx(total * w / 6, abs=30), letters


def test_too_few_records_for_hosts(tmp_path) -> None:
    path = write_jsonl(tmpfile(tmp_path, "a.jsonl"), unique_texts(3))
    cfg = DataConfig(source="jsonl", paths=(path,), eval_fraction=0.3)
    with pytest.raises(ValueError, match="cannot be sharded over 4 processes"):
        all_batches(cfg, split="train", batch_size=1, seed=0, process_index=0, process_count=4)


def test_mixture_sources_are_shuffled_by_their_own_seeds(tmp_path) -> None:
    """Each source of a mixture is shuffled with its own seed (`seed * 1_000_003 + i`): two
    sources of equal length read in two different orders, each a permutation of its
    source. Reference: the unshuffled index order of each source, 0..11 (the index is
    written in each text). One seed for all sources gave both the same order."""
    ev = write_jsonl(tmpfile(tmp_path, "eval.jsonl"), ["held out"])
    cfg = DataConfig(source="mixture", seq_len=256, packing=False, sources=tuple(
        {"source": "jsonl", "weight": 1.0, "eval_paths": [ev],
         "paths": [write_jsonl(tmpfile(tmp_path, f"{n}.jsonl"), unique_texts(12, n))]}
        for n in "AB"))
    order = {"A": [], "B": []}
    for text in _row_texts(all_batches(cfg, split="train", batch_size=4, seed=0, num_epochs=1)):
        order[text[0]].append(int(text.split()[1]))
    assert sorted(order["A"]) == sorted(order["B"]) == list(range(12))
    assert order["A"] != list(range(12)) and order["A"] != order["B"]


def test_as_many_records_as_hosts_is_enough(tmp_path) -> None:
    """The boundary of the too-few-records check: 4 records over 4 processes are accepted,
    each process reads exactly one and together they read all 4. Reference: the 4 records
    written here."""
    texts, ev = unique_texts(4), write_jsonl(tmpfile(tmp_path, "eval.jsonl"), ["held out"])
    path = write_jsonl(tmpfile(tmp_path, "a.jsonl"), texts)
    cfg = DataConfig(source="jsonl", paths=(path,), eval_paths=(ev,), seq_len=256,
                     packing=False)
    seen = [_row_texts(all_batches(cfg, split="train", batch_size=1, seed=0, num_epochs=1,
                                   process_index=host, process_count=4)) for host in range(4)]
    assert all(len(s) == 1 for s in seen)
    assert sorted(s[0] for s in seen) == sorted(texts)

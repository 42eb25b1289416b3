"""Per-host sharding (disjoint, covering), source mixing, train/eval split."""

from __future__ import annotations

import collections

import pytest

from input_pipeline import DataConfig, make_tokenizer
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


def test_mixture_eval_reads_every_held_out_document_once_in_source_order(tmp_path) -> None:
    """A mixture's eval split is every source's held-out documents, each once, source after
    source in file order, whatever the weights (a weighted mix would stop when the smaller
    source runs out and drop documents). Reference: the texts written here."""
    eval_a, eval_b = unique_texts(10, "A"), unique_texts(3, "B")
    cfg = DataConfig(source="mixture", seq_len=256, packing=False, sources=(
        {"source": "jsonl", "paths": [write_jsonl(tmpfile(tmp_path, "a.jsonl"), ["a"] * 4)],
         "eval_paths": [write_jsonl(tmpfile(tmp_path, "ea.jsonl"), eval_a)], "weight": 1.0},
        {"source": "jsonl", "paths": [write_jsonl(tmpfile(tmp_path, "b.jsonl"), ["b"] * 4)],
         "eval_paths": [write_jsonl(tmpfile(tmp_path, "eb.jsonl"), eval_b)], "weight": 3.0}))
    assert _row_texts(all_batches(cfg, split="eval", batch_size=4, seed=0)) == eval_a + eval_b


def test_too_few_records_for_hosts(tmp_path) -> None:
    path = write_jsonl(tmpfile(tmp_path, "a.jsonl"), unique_texts(3))
    cfg = DataConfig(source="jsonl", paths=(path,), eval_fraction=0.3)
    with pytest.raises(ValueError, match="cannot be sharded over 4 processes"):
        all_batches(cfg, split="train", batch_size=1, seed=0, process_index=0, process_count=4)

"""Deterministic shuffling and checkpointable iterator state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from input_pipeline import DataConfig, make_dataset
from tests.input_pipeline._ip_helpers import take


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("k", [0, 1, 7])
def test_resume_sees_the_same_batches(packing: bool, k: int) -> None:
    # seq_len 32 < most documents: resuming inside a split document is exercised.
    cfg = DataConfig(num_documents=300, seq_len=32, packing=packing)
    it = make_dataset(cfg, split="train", batch_size=3, seed=5)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    stats = it.stats()
    expected = take(it, 6)
    fresh = make_dataset(cfg, split="train", batch_size=3, seed=5)
    fresh.set_state(state)
    assert fresh.stats() == stats
    _assert_same(take(fresh, 6), expected)


@pytest.mark.parametrize("packing", [True, False])
def test_a_resumed_run_can_be_resumed_again(packing: bool) -> None:
    """A state taken from a restored iterator, at once and one batch later, must restore
    too. Reference: the uninterrupted run. seq_len 32 < most documents, so the padding mode
    is inside a split document (keeping no parent state there passed test_resume_*)."""
    cfg = DataConfig(num_documents=300, seq_len=32, packing=packing)
    it = make_dataset(cfg, split="train", batch_size=3, seed=5)
    take(it, 2)
    first = json.loads(json.dumps(it.get_state()))
    assert first["shard"] == [0, 1]  # the records it reads: 0::1 (checked on resume)
    expected = take(it, 5)
    for skip in (0, 1):
        resumed = make_dataset(cfg, split="train", batch_size=3, seed=5)
        resumed.set_state(first)
        take(resumed, skip)
        again = make_dataset(cfg, split="train", batch_size=3, seed=5)
        again.set_state(json.loads(json.dumps(resumed.get_state())))
        _assert_same(take(again, 5 - skip), expected[skip:])


def test_resume_at_a_row_that_ended_a_document(tmp_path) -> None:
    """Rows that end exactly at document ends leave the packer no remainder; grain marks
    that with the tuple (-1, -1), which a JSON checkpoint turns into a list. Documents of
    exactly one row: every row ends one; the resumed batches must be the same (one
    document was skipped when the list reached grain)."""
    path = tmp_path / "docs.jsonl"
    # byte tokenizer: bos + 30 characters + eos = 32 tokens, one row of seq_len 31 + 1 target
    path.write_text("".join(json.dumps({"text": f"doc {i:03d} " + "x" * 22}) + "\n"
                            for i in range(40)))
    cfg = DataConfig(source="jsonl", paths=(str(path),), seq_len=31, packing=True,
                     shuffle=False)
    it = make_dataset(cfg, split="train", batch_size=2, seed=0)
    take(it, 3)
    raw = it.get_state()
    assert set(raw["grain"]["remainder_slices"].values()) == {(-1, -1)}  # at a document end
    state = json.loads(json.dumps(raw))
    expected = take(it, 4)
    fresh = make_dataset(cfg, split="train", batch_size=2, seed=0)
    fresh.set_state(state)
    _assert_same(take(fresh, 4), expected)


def test_resume_across_epochs_and_sources(tmp_path) -> None:
    cfg = DataConfig(source="mixture", num_documents=20, eval_fraction=0.5, seq_len=16,
                     sources=({"source": "synthetic", "weight": 2.0},
                              {"source": "synthetic", "weight": 1.0}))
    it = make_dataset(cfg, split="train", batch_size=2, seed=1, process_index=1,
                      process_count=2)
    take(it, 40)  # several epochs of a 5-document shard
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = make_dataset(cfg, split="train", batch_size=2, seed=1, process_index=1,
                         process_count=2)
    fresh.set_state(state)
    _assert_same(take(fresh, 5), expected)


def test_resume_with_worker_processes() -> None:
    cfg = DataConfig(num_documents=300, seq_len=64, num_workers=2)
    it = make_dataset(cfg, split="train", batch_size=2, seed=0)
    try:
        take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 4)
    finally:
        it.close()
    fresh = make_dataset(cfg, split="train", batch_size=2, seed=0)
    try:
        fresh.set_state(state)
        _assert_same(take(fresh, 4), expected)
    finally:
        fresh.close()


def test_shuffle_is_deterministic_and_seeded() -> None:
    cfg = DataConfig(num_documents=300, seq_len=64)
    a = take(make_dataset(cfg, split="train", batch_size=2, seed=0), 3)
    b = take(make_dataset(cfg, split="train", batch_size=2, seed=0), 3)
    c = take(make_dataset(cfg, split="train", batch_size=2, seed=1), 3)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_epochs_are_reshuffled() -> None:
    cfg = DataConfig(num_documents=40, eval_fraction=0.5, seq_len=512, packing=False)
    rows = [tuple(r) for b in take(make_dataset(cfg, split="train", batch_size=20, seed=0), 2)
            for r in b["inputs"]]
    assert sorted(rows[:20]) == sorted(rows[20:]) and rows[:20] != rows[20:]

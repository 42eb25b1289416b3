"""Packing: every token exactly once and in order, segment ids/positions, efficiency."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from input_pipeline import DataConfig, make_dataset, packing_efficiency
from input_pipeline.pipeline import document_dataset
from tests.input_pipeline._ip_helpers import all_batches, real_stream


def _reference_docs(cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    return list(document_dataset(cfg, split="eval", seed=0, num_epochs=1))


def _check_rows(batches, docs, seq_len: int, packing: bool, pad_id: int = 0) -> None:
    """Tokens once, in order; segments restart exactly at document or row starts; padding
    holds `pad_id`."""
    stream_in = np.concatenate([d["inputs"] for d in docs])
    stream_tg = np.concatenate([d["targets"] for d in docs])
    np.testing.assert_array_equal(real_stream(batches, "inputs"), stream_in)
    np.testing.assert_array_equal(real_stream(batches, "targets"), stream_tg)
    doc_starts = set(np.cumsum([0] + [len(d["inputs"]) for d in docs[:-1]]).tolist())
    seg_starts, row_starts, offset = set(), set(), 0
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
        for k, v in b.items():
            assert v.dtype == np.int32 and v.shape == (len(b["inputs"]), seq_len), k
        for inp, tgt, seg, pos in zip(b["inputs"], b["targets"], b["segment_ids"],
                                      b["positions"]):
            n = int(np.count_nonzero(seg))
            assert np.all(seg[:n] > 0) and np.all(seg[n:] == 0)  # padding only at the end
            assert np.all(inp[n:] == pad_id) and np.all(tgt[n:] == pad_id)
            assert np.all(pos[n:] == 0)
            if n == 0:
                continue
            assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0)
            assert np.all(np.diff(seg[:n]) <= 1)  # 1, 2, 3, ... without gaps
            if not packing:
                assert seg[n - 1] == 1
            for s in np.unique(seg[:n]):
                idx = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
                seg_starts.add(offset + int(idx[0]))
            row_starts.add(offset)
            offset += n
    assert seg_starts == doc_starts | row_starts  # no segment crosses a document boundary


@pytest.mark.parametrize("packing", [True, False])
def test_every_token_once_in_order(packing: bool) -> None:
    cfg = DataConfig(num_documents=160, eval_fraction=0.25, seq_len=64, packing=packing)
    batches = all_batches(cfg, split="eval", batch_size=3, seed=0)
    _check_rows(batches, _reference_docs(cfg), 64, packing)


@pytest.mark.parametrize("packing", [True, False])
def test_padding_holds_the_tokenizers_pad_id(monkeypatch, packing: bool) -> None:
    """A tokenizer whose pad id is 7, not 0: padded slots (in rows and in the eval split's
    filler rows) hold 7; the real tokens are unchanged. Reference: the documents as read."""
    from input_pipeline import pipeline
    from input_pipeline.tokenizer import ByteTokenizer

    class Pad7(ByteTokenizer):
        pad_id = 7  # byte 4 (EOT), absent from the synthetic corpus

    monkeypatch.setattr(pipeline, "make_tokenizer", lambda cfg: Pad7())
    cfg = DataConfig(num_documents=50, eval_fraction=0.5, seq_len=48, packing=packing)
    batches = all_batches(cfg, split="eval", batch_size=4, seed=0)
    docs = _reference_docs(cfg)
    assert all((d["inputs"] != 7).all() for d in docs)
    assert (batches[-1]["segment_ids"][-1] == 0).all()  # the last batch ends in a filler row
    _check_rows(batches, docs, 48, packing, pad_id=7)


@settings(max_examples=12, deadline=None)
@given(seq_len=st.integers(2, 40), num_docs=st.integers(8, 40), batch=st.integers(1, 4),
       packing=st.booleans(), seed=st.integers(0, 5))
def test_packing_properties(seq_len: int, num_docs: int, batch: int, packing: bool,
                            seed: int) -> None:
    cfg = DataConfig(num_documents=num_docs, eval_fraction=0.5, seq_len=seq_len,
                     packing=packing, seed=seed)
    batches = all_batches(cfg, split="eval", batch_size=batch, seed=0)
    _check_rows(batches, _reference_docs(cfg), seq_len, packing)


def test_documents_are_bos_tokens_eos() -> None:
    cfg = DataConfig(num_documents=40, eval_fraction=0.5, seq_len=512, packing=False)
    b = all_batches(cfg, split="eval", batch_size=20, seed=0)[0]
    n = int(b["segment_ids"][0].sum())
    assert b["inputs"][0, 0] == 1 and b["targets"][0, n - 1] == 2  # BOS first, EOS last target
    np.testing.assert_array_equal(b["targets"][0, : n - 1], b["inputs"][0, 1:n])


def test_packing_efficiency_beats_padding() -> None:
    """Reference: the share of non-padding slots counted here with numpy (segment id > 0);
    `packing_efficiency` and the iterator's running stats must both equal it."""
    eff = {}
    for packing in (True, False):
        it = make_dataset(DataConfig(num_documents=2000, packing=packing), split="train",
                          batch_size=8, seed=0)
        batches = [next(it) for _ in range(25)]
        eff[packing] = float(np.mean([b["segment_ids"] > 0 for b in batches]))
        assert packing_efficiency(batches) == pytest.approx(eff[packing], rel=1e-12)
        assert it.stats().packing_efficiency == pytest.approx(eff[packing], rel=1e-12)
    assert eff[True] > 0.95, eff
    assert eff[False] < eff[True] - 0.2, eff

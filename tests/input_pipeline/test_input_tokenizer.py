"""Tokenizers: round trips, special ids from the config, vocab-size checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from input_pipeline import (
    ByteTokenizer,
    DataConfig,
    check_vocab_fits,
    corpus,
    corpus_unigram_entropy,
    make_dataset,
    make_tokenizer,
)
from input_pipeline.tokenizer import train_tokenizer

SAMPLE = "héllo  wörld\n\tthe cat sees 12+3=15 \U0001F600 ?"


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(3 <= i < 259 for i in ids) and len(ids) == len(text.encode("utf-8"))


def test_byte_ids() -> None:
    tok = make_tokenizer(DataConfig())
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.encode("A\x00") == [65 + 3, 3]
    assert tok.decode([1, 68, 0, 2]) == "A"  # special ids are dropped


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tok")
    texts = [corpus.document(0, i) for i in range(300)]
    out = {"bpe": str(d / "tokenizer.json")}
    train_tokenizer(texts, out["bpe"], 300)
    try:
        import sentencepiece  # noqa: F401

        out["sentencepiece"] = str(d / "spm.model")
        train_tokenizer(texts, out["sentencepiece"], 400, kind="sentencepiece")  # 256 bytes + pieces
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_trained_round_trip_and_pipeline(trained, kind: str) -> None:
    if kind not in trained:
        pytest.skip("sentencepiece is not installed")
    cfg = DataConfig(tokenizer=trained[kind], num_documents=100, seq_len=64)
    tok = make_tokenizer(cfg)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 250 <= tok.vocab_size <= 400
    doc = corpus.document(0, 1000)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode(tok.encode(doc)) == doc
    assert len(tok.encode(doc)) < 0.8 * len(doc.encode())  # it learned merges
    batch = next(make_dataset(cfg, split="train", batch_size=2, seed=0))
    assert batch["inputs"].max() < tok.vocab_size and batch["inputs"][0, 0] == tok.bos_id
    check_vocab_fits(tok, tok.vocab_size)
    with pytest.raises(ValueError, match=r"does not fit the model's vocab_size 128$"):
        check_vocab_fits(tok, 128)


def test_special_tokens_follow_config(trained) -> None:
    cfg = DataConfig(tokenizer=trained["bpe"], add_bos=False, num_documents=40, seq_len=512,
                     packing=False, eval_fraction=0.5)
    b = next(make_dataset(cfg, split="eval", batch_size=4, seed=0))
    assert b["inputs"][0, 0] != 1
    with pytest.raises(ValueError, match=r"^data\.bos_token='<s>': expected a token in the"):
        make_tokenizer(dataclasses.replace(cfg, bos_token="<s>"))
    no_eos = dataclasses.replace(cfg, tokenizer="byte", add_eos=False)
    b = next(make_dataset(no_eos, split="eval", batch_size=4, seed=0))
    n = int(b["segment_ids"][0].sum())
    assert b["targets"][0, n - 1] != 2


def test_vocab_too_large_is_refused() -> None:
    check_vocab_fits(ByteTokenizer(), 259)
    with pytest.raises(ValueError) as e:
        check_vocab_fits(ByteTokenizer(), 256)
    assert "\n" not in str(e.value) and "259" in str(e.value) and "256" in str(e.value)


def test_unknown_tokenizer_file() -> None:
    with pytest.raises(ValueError, match=r"^data\.tokenizer='/nonexistent/tok\.json'"):
        make_tokenizer(DataConfig(tokenizer="/nonexistent/tok.json"))


def test_unigram_entropy(tmp_path) -> None:
    cfg = DataConfig(num_documents=200, eval_fraction=0.1)
    start, stop = corpus.split_bounds(200, 0.1, "train")
    data = b"".join(corpus.document(0, i).encode() + b"\x00" for i in range(start, stop))
    counts = np.bincount(np.frombuffer(data, np.uint8))  # "\x00" stands for EOS here
    p = counts[counts > 0] / counts.sum()
    assert corpus_unigram_entropy(cfg) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert 2.5 < corpus_unigram_entropy(cfg) < 4.0

"""Tokenizers: round trips, special ids from the config, vocab-size checks."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

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


def test_every_byte_round_trips() -> None:
    """Byte 0 (id 3, the lowest byte id) was dropped by decode when its lower bound was made
    strict; the random-text round trip rarely draws it. Reference: the bytes themselves."""
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("A\x00B")) == "A\x00B"
    assert [tok.decode([b + 3]) for b in range(128)] == [chr(b) for b in range(128)]
    every = bytes(range(256))
    assert tok.encode_np(every.decode("latin-1")).size == 128 + 2 * 128  # UTF-8: 2 bytes >= 128
    ids = [b + 3 for b in every]  # all 256 byte ids, which alone are not valid UTF-8
    assert tok.decode(ids) == every.decode("utf-8", errors="replace")
    text = every.decode("latin-1")  # U+0000..U+00FF
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tok")
    texts = [corpus.document(0, i) for i in range(300)]
    out = {"bpe": str(d / "tokenizer.json")}
    train_tokenizer(texts, out["bpe"], 300)
    try:
        import sentencepiece  # noqa: F401

        out["sentencepiece"] = str(d / "spm.model")
        # 256 bytes + pieces
        train_tokenizer(texts, out["sentencepiece"], 400, kind="sentencepiece")
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
    assert tok.vocab_size == {"bpe": 300, "sentencepiece": 400}[kind]  # as trained above
    doc = corpus.document(0, 1000)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode(tok.encode(doc)) == doc
    for text in ("a <eos> b", "<bos>x", "<pad><pad> y <eos>"):  # literal specials are text
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids), text
        again = pickle.loads(pickle.dumps(tok))  # as grain's worker processes receive it
        assert again.encode(text) == ids, text
    assert len(tok.encode(doc)) < 0.8 * len(doc.encode())  # it learned merges
    batch = next(make_dataset(cfg, split="train", batch_size=2, seed=0))
    assert batch["inputs"].max() < tok.vocab_size and batch["inputs"][0, 0] == tok.bos_id
    check_vocab_fits(tok, tok.vocab_size)
    with pytest.raises(ValueError, match=r"does not fit the model's vocab_size 128$"):
        check_vocab_fits(tok, 128)


def _expected_rows(tok, cfg: DataConfig, first: int, rows: int) -> dict[str, np.ndarray]:
    """The unpacked eval rows `first, first + 1, ...` built by hand: `ids = [bos] +
    tok.encode(text) + [eos]` (each special only if the config adds it); inputs `ids[:-1]`,
    targets `ids[1:]`, then padding (pad_id, segment 0, position 0) to seq_len."""
    out = {k: np.zeros((rows, cfg.seq_len), np.int64) for k in
           ("inputs", "targets", "segment_ids", "positions")}
    out["inputs"][:] = out["targets"][:] = tok.pad_id
    for r in range(rows):
        ids = ([tok.bos_id] if cfg.add_bos else []) + tok.encode(
            corpus.document(cfg.seed, first + r)) + ([tok.eos_id] if cfg.add_eos else [])
        n = len(ids) - 1
        out["inputs"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
        out["segment_ids"][r, :n], out["positions"][r, :n] = 1, np.arange(n)
    return out


@pytest.mark.parametrize("kind, add_bos, add_eos", [
    ("bpe", False, True), ("bpe", True, False), ("byte", False, False), ("byte", True, True)])
def test_special_tokens_follow_config(trained, kind: str, add_bos: bool, add_eos: bool) -> None:
    """Reference: `_expected_rows` (the tokenizer's own `encode` of each held-out document,
    with BOS/EOS added as the config says); exact equality of every array of the batch."""
    cfg = DataConfig(tokenizer=trained["bpe"] if kind == "bpe" else "byte", add_bos=add_bos,
                     add_eos=add_eos, num_documents=40, seq_len=512, packing=False,
                     eval_fraction=0.5)
    tok = make_tokenizer(cfg)
    b = next(make_dataset(cfg, split="eval", batch_size=4, seed=0))
    expected = _expected_rows(tok, cfg, corpus.split_bounds(40, 0.5, "eval")[0], 4)
    for key, want in expected.items():
        np.testing.assert_array_equal(b[key], want, err_msg=key)
    assert all(4 < n < 512 for n in b["segment_ids"].sum(1))  # whole documents, not cut


def test_special_token_must_be_in_the_vocab(trained) -> None:
    cfg = DataConfig(tokenizer=trained["bpe"])
    with pytest.raises(ValueError, match=r"^data\.bos_token='<s>': expected a token in the"):
        make_tokenizer(dataclasses.replace(cfg, bos_token="<s>"))


def test_vocab_too_large_is_refused() -> None:
    check_vocab_fits(ByteTokenizer(), 259)
    with pytest.raises(ValueError) as e:
        check_vocab_fits(ByteTokenizer(), 256)
    assert "\n" not in str(e.value) and "259" in str(e.value) and "256" in str(e.value)


def test_tokenizer_path_expands_home(trained, tmp_path, monkeypatch) -> None:
    """`data.paths=~/d.jsonl` was found while `data.tokenizer=~/tok.json` was "not an
    existing file". Reference: the same tokenizer loaded by its full path."""
    import shutil

    from jaxmoe.config import check_data, load_config

    shutil.copy(trained["bpe"], tmp_path / "tok.json")
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.source=jsonl", "data.paths=~/d.jsonl",
                             "data.tokenizer=~/tok.json", "model.vocab_size=512"])
    assert cfg.data.tokenizer == str(tmp_path / "tok.json")
    check_data(cfg)
    assert make_tokenizer(cfg.data).encode("sort 3 1") == make_tokenizer(
        DataConfig(tokenizer=trained["bpe"])).encode("sort 3 1")


def test_unknown_tokenizer_file() -> None:
    with pytest.raises(ValueError, match=r"^data\.tokenizer='/nonexistent/tok\.json'"):
        make_tokenizer(DataConfig(tokenizer="/nonexistent/tok.json"))


@pytest.mark.parametrize("name, expected", [
    ("tok.json", "a Hugging Face tokenizer.json"), ("tok.model", "a SentencePiece .model file")])
def test_unreadable_tokenizer_file_is_one_line(tmp_path, name: str, expected: str) -> None:
    """A damaged file gave the library's traceback (a bare Exception / RuntimeError), which
    the CLI reported with exit code 1 rather than as a config error."""
    path = tmp_path / name
    path.write_text('{"a tokenizer": 1}' if name.endswith(".json") else "not a model")
    with pytest.raises(ValueError) as e:
        make_tokenizer(DataConfig(tokenizer=str(path)))
    message = str(e.value)
    assert message.startswith(f"data.tokenizer={str(path)!r}: cannot be read (")
    assert message.endswith(f"); expected {expected}") and "\n" not in message


def test_unigram_entropy(tmp_path) -> None:
    cfg = DataConfig(num_documents=200, eval_fraction=0.1)
    start, stop = corpus.split_bounds(200, 0.1, "train")
    data = b"".join(corpus.document(0, i).encode() + b"\x00" for i in range(start, stop))
    counts = np.bincount(np.frombuffer(data, np.uint8))  # "\x00" stands for EOS here
    p = counts[counts > 0] / counts.sum()
    assert corpus_unigram_entropy(cfg) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert 2.5 < corpus_unigram_entropy(cfg) < 4.0


def test_unigram_entropy_of_files_follows_their_contents(tmp_path) -> None:
    """The synthetic corpus's entropy is computed once per process (it is a function of the
    config); a file corpus is read again each time. Reference: a one-letter corpus, "a" +
    EOS per document (entropy log 2), rewritten as "ab" + EOS (log 3)."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n' * 50)
    cfg = DataConfig(source="jsonl", paths=(str(path),))
    assert corpus_unigram_entropy(cfg) == pytest.approx(np.log(2), rel=1e-12)
    path.write_text('{"text": "ab"}\n' * 50)
    assert corpus_unigram_entropy(cfg) == pytest.approx(np.log(3), rel=1e-12)


def test_tokenizers_package_missing_is_one_line(trained, tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "copy.json")  # a path not in make_tokenizer's cache
    with open(trained["bpe"]) as src, open(path, "w") as dst:
        dst.write(src.read())
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"^data\.tokenizer='[^']*copy\.json': expected the "
                                         r"tokenizers package to be installed") as e:
        make_tokenizer(DataConfig(tokenizer=path))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^kind='bpe': expected the tokenizers package"):
        train_tokenizer(["some text"], str(tmp_path / "new.json"), 300)
    assert not os.path.exists(tmp_path / "new.json")


def _kinds(trained) -> list[tuple[str, str]]:
    out = [("bpe", "tokenizer.json")]
    if "sentencepiece" in trained:
        out.append(("sentencepiece", "spm.model"))
    return out


def test_training_writes_through_a_rename(trained, tmp_path, monkeypatch) -> None:
    texts = [corpus.document(0, i) for i in range(100)]
    real_replace = os.replace
    for kind, name in _kinds(trained):
        d = tmp_path / kind
        d.mkdir()
        out = str(d / name)
        outputs = [out] + ([out[:-len(".model")] + ".vocab"] if kind == "sentencepiece" else [])
        for o in outputs:
            with open(o, "w") as f:
                f.write("old")
        renamed = []

        def replace(src, dst, outputs=outputs, renamed=renamed):
            assert dst in outputs and os.path.dirname(os.path.dirname(src)) == str(d)
            for o in outputs:  # nothing was written in place before the renames
                if o not in renamed:
                    with open(o) as f:
                        assert f.read() == "old", o
            renamed.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        train_tokenizer(texts, out, 400, kind=kind)
        monkeypatch.setattr(os, "replace", real_replace)
        assert renamed == sorted(outputs, key=lambda o: o == out)  # the .model last
        assert sorted(os.listdir(d)) == sorted(os.path.basename(o) for o in outputs)
        assert make_tokenizer(DataConfig(tokenizer=out)).decode(
            make_tokenizer(DataConfig(tokenizer=out)).encode(SAMPLE)) == SAMPLE


def test_failed_training_leaves_no_files(trained, tmp_path) -> None:
    def texts():
        yield from (corpus.document(0, i) for i in range(50))
        raise OSError("disk read failed")

    for kind, name in _kinds(trained):
        out = tmp_path / name
        out.write_text("old")
        with pytest.raises(OSError, match="disk read failed"):
            train_tokenizer(texts(), str(out), 400, kind=kind)
        assert out.read_text() == "old" and os.listdir(tmp_path) == [name], kind
        out.unlink()
        with pytest.raises(ValueError, match=r"^texts: expected at least one text"):
            train_tokenizer(iter([]), str(out), 400, kind=kind)
        assert os.listdir(tmp_path) == [], kind


@pytest.mark.parametrize("kw, message", [
    ({"vocab_size": 0}, r"^vocab_size=0: expected an integer >= 259 for kind='bpe'$"),
    ({"vocab_size": -5}, r"^vocab_size=-5: expected an integer >= 259"),
    # byte-level BPE keeps 256 bytes + 3 specials: a smaller size was silently exceeded
    ({"vocab_size": 100}, r"^vocab_size=100: expected an integer >= 259 for kind='bpe'$"),
    ({"vocab_size": 2.5}, r"^vocab_size=2\.5: expected an integer"),
    ({"vocab_size": 100, "kind": "sentencepiece"},
     r"^vocab_size=100: expected an integer >= 261 for kind='sentencepiece'$"),
    ({"kind": "wordpiece"}, r"^kind='wordpiece': expected 'bpe' or 'sentencepiece'$"),
    ({"pad_token": ""}, r"^pad_token='': expected a non-empty token"),
    ({"eos_token": "<bos>"}, r"^special tokens \('<pad>', '<bos>', '<bos>'\): expected pad, bos "
                             r"and eos to be distinct$"),
    ({"out": "missing_dir/tok.json"}, r"^out_path='.*missing_dir/tok\.json': expected an "
                                      r"existing directory"),
    ({"out": "tok.json", "kind": "sentencepiece"},
     r"^out_path='.*tok\.json': expected a path ending in \.model$"),
])
def test_training_arguments_are_checked(tmp_path, kw: dict, message: str) -> None:
    kw = {"vocab_size": 300, "kind": "bpe", "out": "tok.json", **kw}
    if kw["kind"] == "sentencepiece" and kw["vocab_size"] == 300:
        kw["vocab_size"] = 400
    out = str(tmp_path / kw.pop("out"))
    with pytest.raises(ValueError, match=message) as e:
        train_tokenizer(["some text", "more text"], out, kw.pop("vocab_size"), **kw)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_sentencepiece_training_failure_is_one_line(trained, tmp_path) -> None:
    if "sentencepiece" not in trained:
        pytest.skip("sentencepiece is not installed")
    texts = ["".join(chr(0x4E00 + i) for i in range(k, k + 40)) for k in range(0, 400, 40)]
    with pytest.raises(ValueError, match=r"^kind='sentencepiece', vocab_size=270: training "
                                         r"failed \(.*vocab_size") as e:
        train_tokenizer(texts, str(tmp_path / "x.model"), 270, kind="sentencepiece")
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []

"""The fingerprint of what a stream reads, saved with its position (input_pipeline/fingerprint.py).

Reference: hashlib's SHA-256 of the tokenizer file's bytes, and the files and sizes written
here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest

from input_pipeline import DataConfig, make_dataset
from input_pipeline.fingerprint import changes, fingerprint, split_files
from tests.input_pipeline._ip_helpers import write_jsonl


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(str(d / "a.jsonl"), ["one document", "another one"])
    write_jsonl(str(d / "b.jsonl"), ["a third document"])
    ev = write_jsonl(str(tmp_path / "eval.jsonl"), ["held out"])
    tok = tmp_path / "tok.json"
    tok.write_text('{"a tokenizer": 1}')
    cfg = DataConfig(source="jsonl", paths=(str(d / "*.jsonl"),), eval_paths=(ev,), seq_len=16,
                     tokenizer=str(tok))
    return cfg, d, tok


def test_the_same_inputs_give_the_same_fingerprint(data):
    cfg, d, tok = data
    fp = fingerprint(cfg, "train")
    assert fp == fingerprint(cfg, "train") and changes(fp, fingerprint(cfg, "train")) == {}
    assert fp["tokenizer"] == "sha256:" + hashlib.sha256(tok.read_bytes()).hexdigest()
    assert fp["files"] == 2 and split_files(cfg, "train") == [str(d / "a.jsonl"),
                                                              str(d / "b.jsonl")]
    assert split_files(cfg, "eval") == list(cfg.eval_paths)
    assert fingerprint(DataConfig(), "train") == {  # synthetic corpus, byte tokenizer
        "tokenizer": "byte", "files": 0, "files_sha256": hashlib.sha256().hexdigest()}


def test_a_tokenizer_is_fingerprinted_by_its_contents_not_its_path(data, tmp_path):
    cfg, _, tok = data
    before = fingerprint(cfg, "train")
    moved = tmp_path / "moved.json"
    shutil.copy(tok, moved)
    assert fingerprint(dataclasses.replace(cfg, tokenizer=str(moved)), "train") == before
    tok.write_text('{"a retrained tokenizer": 2}')
    after = fingerprint(cfg, "train")
    assert changes(before, after) == {"tokenizer": (
        f"its contents differ from the run's ({before['tokenizer'][:19]} -> "
        f"{after['tokenizer'][:19]})")}


def test_more_matching_files_or_a_grown_file_change_the_files(data):
    cfg, d, _ = data
    before = fingerprint(cfg, "train")
    write_jsonl(str(d / "c.jsonl"), ["a new shard"])
    more = fingerprint(cfg, "train")
    assert changes(before, more) == {"files": "the data files are not the run's (2 -> 3 files)"}
    (d / "c.jsonl").unlink()
    with open(d / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "appended"}) + "\n")
    assert changes(before, fingerprint(cfg, "train")) == {
        "files": "the data files are not the run's (2 -> 2 files, other names or sizes)"}


def test_the_stream_state_carries_the_fingerprint(data):
    """get_state() holds it (JSON as saved in checkpoints); set_state() accepts it back."""
    cfg, _, _ = data
    cfg = dataclasses.replace(cfg, tokenizer="byte")
    it = make_dataset(cfg, split="train", batch_size=2, seed=0)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["inputs"] == it.inputs == fingerprint(cfg, "train")
    fresh = make_dataset(cfg, split="train", batch_size=2, seed=0)
    fresh.set_state(state)
    assert (next(fresh)["inputs"] == next(it)["inputs"]).all()


def test_a_relative_pattern_resumed_elsewhere_changes_the_files(tmp_path, monkeypatch):
    """The module docstring: a relative `data.paths` resumed from another working directory
    reads other files, and is noticed even when they have the same names and sizes (hashing
    the path as written missed it). Reference: the two directories written here."""
    for run, text in (("first", "run one"), ("second", "run two")):
        (tmp_path / run / "data").mkdir(parents=True)
        write_jsonl(str(tmp_path / run / "data" / "a.jsonl"), [text])
    assert ((tmp_path / "first" / "data" / "a.jsonl").stat().st_size
            == (tmp_path / "second" / "data" / "a.jsonl").stat().st_size)
    cfg = DataConfig(source="jsonl", paths=("data/*.jsonl",), seq_len=16)
    monkeypatch.chdir(tmp_path / "first")
    before = fingerprint(cfg, "train")
    assert changes(before, fingerprint(cfg, "train")) == {}
    monkeypatch.chdir(tmp_path / "second")
    assert changes(before, fingerprint(cfg, "train")) == {
        "files": "the data files are not the run's (1 -> 1 files, other names or sizes)"}

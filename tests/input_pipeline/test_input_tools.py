"""tools/build_arrayrecord.py and tools/train_tokenizer.py, end to end."""

from __future__ import annotations

import importlib.util
import os

import pytest

from input_pipeline import DataConfig, make_tokenizer
from tests.input_pipeline._ip_helpers import all_batches, tmpfile, unique_texts, write_jsonl
from tests.input_pipeline.test_input_sharding import _row_texts

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_build_arrayrecord_round_trip(tmp_path, capsys, fmt: str) -> None:
    texts = unique_texts(30)
    if fmt == "jsonl":
        src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), texts, field="body")
        with open(src, "a") as f:
            f.write("{broken\n")
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        src = tmpfile(tmp_path, "in.parquet")
        pq.write_table(pa.table({"body": [*texts, None]}), src)
    out = tmpfile(tmp_path, "ar/corpus")
    assert _tool("build_arrayrecord").main(
        ["--format", fmt, "--field", "body", "--out", out, "--num_shards", "3", src]) == 0
    printed = capsys.readouterr().out
    assert "corpus-00002-of-00003.arrayrecord: 10 records" in printed
    assert ("invalid_json" if fmt == "jsonl" else "missing_field") in printed
    cfg = DataConfig(source="arrayrecord", paths=(out + "-*.arrayrecord",), seq_len=256,
                     packing=False, eval_fraction=0.1)
    got = _row_texts(all_batches(cfg, split="train", batch_size=4, seed=0, num_epochs=1))
    got += _row_texts(all_batches(cfg, split="eval", batch_size=4, seed=0))
    assert sorted(got) == sorted(texts)


def test_train_tokenizer_tool(tmp_path) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(200))
    out = tmpfile(tmp_path, "tok/tokenizer.json")
    assert _tool("train_tokenizer").main(
        ["--format", "jsonl", "--vocab_size", "280", "--out", out, src]) == 0
    tok = make_tokenizer(DataConfig(tokenizer=out))
    assert tok.decode(tok.encode("doc 00012 ab cd")) == "doc 00012 ab cd"
    assert tok.vocab_size <= 280

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
        ["--format", fmt, "--field", "body", "--out", out, "--num-shards", "3", src]) == 0
    printed = capsys.readouterr().out
    assert "corpus-00002-of-00003.arrayrecord: 10 records" in printed
    assert ("invalid_json" if fmt == "jsonl" else "missing_field") in printed
    cfg = DataConfig(source="arrayrecord", paths=(out + "-*.arrayrecord",), seq_len=256,
                     packing=False, eval_fraction=0.1)
    got = _row_texts(all_batches(cfg, split="train", batch_size=4, seed=0, num_epochs=1))
    got += _row_texts(all_batches(cfg, split="eval", batch_size=4, seed=0))
    assert sorted(got) == sorted(texts)


def test_train_tokenizer_tool(tmp_path, capsys) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(200))
    out = tmpfile(tmp_path, "tok/tokenizer.json")
    assert _tool("train_tokenizer").main(
        ["--format", "jsonl", "--vocab-size", "280", "--out", out, src]) == 0
    tok = make_tokenizer(DataConfig(tokenizer=out))
    assert tok.decode(tok.encode("doc 00012 ab cd")) == "doc 00012 ab cd"
    assert tok.vocab_size == 280  # 259 bytes and specials + 21 merges learned
    # an existing tokenizer is kept unless --overwrite (it was replaced silently; a run
    # trained with it then refuses to resume)
    before = open(out, "rb").read()
    argv = ["--format", "jsonl", "--vocab-size", "270", "--out", out, src]
    line = _fails("train_tokenizer", argv, capsys)
    assert line.endswith(f"--out {out!r}: exists; expected a new file, or --overwrite to "
                         "replace it (runs trained with it then refuse to resume)")
    assert open(out, "rb").read() == before
    assert _tool("train_tokenizer").main([*argv, "--overwrite"]) == 0
    assert open(out, "rb").read() != before


def _one_error_line(err: str, tool: str) -> str:
    """The tool's error: one `<tool>.py: error: ...` line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()
             and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith(f"{tool}.py: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _fails(tool: str, argv: list[str], capsys) -> str:
    """Runs `tool` expecting exit code 2 (a p.error or a caught error); returns its line."""
    try:
        rc = _tool(tool).main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    return _one_error_line(capsys.readouterr().err, tool)


def test_build_arrayrecord_strict_abort_leaves_no_shard(tmp_path, capsys) -> None:
    src = tmpfile(tmp_path, "in.jsonl")
    with open(src, "w") as f:
        f.write('{"text": "good one"}\n{broken\n{"text": "good two"}\n')
    out_dir = tmp_path / "ar"
    line = _fails("build_arrayrecord", ["--format", "jsonl", "--strict", "--out",
                                        str(out_dir / "y"), src], capsys)
    assert "in.jsonl:2" in line and "invalid_json" in line
    assert not out_dir.exists() or os.listdir(out_dir) == []  # no shard, no temporary dir


def test_build_arrayrecord_with_no_good_record_fails_and_writes_nothing(tmp_path,
                                                                        capsys) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(3))
    out_dir = tmp_path / "ar"
    line = _fails("build_arrayrecord", ["--format", "jsonl", "--field", "body", "--out",
                                        str(out_dir / "y"), src], capsys)
    assert "in.jsonl: no good records (field 'body'; skipped bad records: " in line, line
    assert "missing_field" in line and "expected at least one" in line
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_write_arrayrecord_is_all_or_nothing(tmp_path) -> None:
    from input_pipeline.convert import write_arrayrecord

    def texts():
        yield from ["a", "b", "c"]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_arrayrecord(texts(), tmpfile(tmp_path, "y"), 2)
    assert os.listdir(tmp_path) == []
    assert write_arrayrecord(["a", "b", "c"], tmpfile(tmp_path, "y"), 2) == [2, 1]
    assert sorted(os.listdir(tmp_path)) == ["y-00000-of-00002.arrayrecord",
                                            "y-00001-of-00002.arrayrecord"]
    with pytest.raises(FileExistsError, match="y-00000-of-00002"):
        write_arrayrecord(["a"], tmpfile(tmp_path, "y"), 1)  # would mix with the 2-shard set
    assert len(os.listdir(tmp_path)) == 2


def test_build_arrayrecord_refuses_to_mix_shard_sets(tmp_path, capsys) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(6))
    out = tmpfile(tmp_path, "ar/corpus")
    tool = _tool("build_arrayrecord")
    assert tool.main(["--format", "jsonl", "--out", out, "--num-shards", "2", src]) == 0
    before = {p: open(os.path.join(tmp_path, "ar", p), "rb").read()
              for p in os.listdir(tmp_path / "ar")}
    capsys.readouterr()
    line = _fails("build_arrayrecord", ["--format", "jsonl", "--out", out, "--num-shards", "3",
                                        src], capsys)
    assert "--out" in line and "corpus-00000-of-00002.arrayrecord" in line
    after = {p: open(os.path.join(tmp_path, "ar", p), "rb").read()
             for p in os.listdir(tmp_path / "ar")}
    assert after == before  # nothing written, nothing removed
    # The same shard set again replaces its own files.
    assert tool.main(["--format", "jsonl", "--out", out, "--num-shards", "2", src]) == 0
    assert sorted(os.listdir(tmp_path / "ar")) == sorted(before)


@pytest.mark.parametrize("extra, expected", [
    (["--num-shards", "0"], "--num-shards 0: expected"),
    (["--num_shards", "0"], "--num-shards 0: expected"),  # the old spelling still works
    (["no_such_*.jsonl"], "inputs: "),
    # a file two patterns match (it named data.paths, a setting the tool does not have)
    (["{tmp}/*.jsonl", "{tmp}/in.jsonl"], "inputs: '{tmp}/in.jsonl' is matched by both"),
])
def test_build_arrayrecord_bad_arguments(tmp_path, capsys, extra, expected) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(3))
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    expected = expected.replace("{tmp}", str(tmp_path))
    inputs = [] if any(a.endswith(".jsonl") for a in extra) else [src]
    argv = ["--format", "jsonl", "--out", tmpfile(tmp_path, "ar/y"), *extra, *inputs]
    line = _fails("build_arrayrecord", argv, capsys)
    assert expected in line and "data.paths" not in line
    assert not os.path.exists(tmp_path / "ar")


def test_build_arrayrecord_os_error_is_one_line(tmp_path, capsys) -> None:
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(3))
    blocker = tmpfile(tmp_path, "file")
    open(blocker, "w").close()
    line = _fails("build_arrayrecord", ["--format", "jsonl", "--out", blocker + "/sub/y", src],
                  capsys)
    assert "file" in line


@pytest.mark.parametrize("argv, expected", [
    (["--format", "jsonl", "no_such_*.jsonl", "--vocab-size", "300"], "inputs: 'no_such_"),
    (["--format", "synthetic", "--kind", "sentencepiece", "--vocab-size", "300"],
     "--out '{out}': expected a file name ending in .model"),
    (["--format", "synthetic", "--max-documents", "-1", "--vocab-size", "300"],
     "--max-documents -1: expected"),
    (["--format", "synthetic", "--vocab-size", "0"], "--vocab-size 0: expected"),
    (["--format", "synthetic", "--vocab-size", "100"],
     "--vocab-size 100: expected an integer >= 259 for --kind bpe"),
    (["--format", "synthetic", "--num-documents", "0", "--vocab-size", "300"],
     "--num-documents 0: expected"),
])
def test_train_tokenizer_bad_arguments(tmp_path, capsys, argv, expected) -> None:
    out = tmpfile(tmp_path, "tok/t.json")
    line = _fails("train_tokenizer", [*argv, "--out", out], capsys)
    assert expected.format(out=out) in line
    assert not os.path.exists(tmp_path / "tok")


def test_train_tokenizer_names_the_records_it_skipped(tmp_path, capsys) -> None:
    """A misspelt --field skips every record: the error says so (it said only 'expected at
    least one text'). Reference: the 3 records written, none with the field."""
    src = write_jsonl(tmpfile(tmp_path, "in.jsonl"), unique_texts(3))
    line = _fails("train_tokenizer", ["--format", "jsonl", "--field", "nope", "--vocab-size",
                                      "300", "--out", tmpfile(tmp_path, "t.json"), src], capsys)
    assert line.endswith("(skipped bad records of --format jsonl --field 'nope': "
                         "{'missing_field': 3})"), line


def test_train_tokenizer_library_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    tool = _tool("train_tokenizer")

    def fail(*args, **kwargs):  # what SentencePiece raises for too small a vocab
        raise RuntimeError("Internal: trainer_interface.cc(664) [...]\nVocabulary size is "
                           "smaller than required_chars. 300 vs 400.")

    monkeypatch.setattr(tool, "train_tokenizer", fail)
    rc = tool.main(["--format", "synthetic", "--num-documents", "20", "--kind",
                    "sentencepiece", "--vocab-size", "300", "--out", tmpfile(tmp_path, "s.model")])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "train_tokenizer")
    assert "trainer_interface.cc(664)" in line and "300 vs 400" in line

"""File sources read by many threads at once (grain's `data.num_threads` readers share one
source object) and after pickling into worker processes.

Reference: the records written, by index.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from input_pipeline import DataConfig
from input_pipeline.sources import JsonlFile, ParquetFile

N = 3000


def _hammer(source, expected: list, threads: int = 8, reads: int = 3000) -> None:
    """Random reads from `threads` threads; every record must be the one asked for."""
    def worker(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [i for i in rng.integers(0, len(expected), reads)
                if source[int(i)][1] != expected[int(i)]]

    with ThreadPoolExecutor(threads) as pool:
        wrong = [i for got in pool.map(worker, range(threads)) for i in got]
    assert wrong == [], f"{len(wrong)} reads returned another record's bytes"


def test_jsonl_reads_from_many_threads(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "y" * (i % 97)}) + "\n" for i in range(N)]
    path.write_text("".join(lines))
    source = JsonlFile(str(path))
    expected = [line.encode() for line in lines]
    _hammer(source, expected)
    copy = pickle.loads(pickle.dumps(source))  # as grain sends it to a worker process
    assert copy[5] == (f"{path}:6", expected[5])
    _hammer(copy, expected, threads=4, reads=500)
    fds = [copy._fd, source._fd]
    del source, copy  # each kept one descriptor open; a dropped source closes it
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_parquet_reads_from_many_threads(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    texts = [f"document {i}" for i in range(N)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)  # 30 row groups
    source = ParquetFile(str(path), "text")
    _hammer(source, texts, reads=1000)
    assert len(source._cache) <= ParquetFile.CACHED_GROUPS
    copy = pickle.loads(pickle.dumps(source))
    assert copy[2999] == (f"{path}:2999", texts[2999])


def test_missing_files_are_named_by_the_setting_they_came_from(tmp_path) -> None:
    """A mixture's second source with eval files that do not exist: the error names
    data.sources[1].eval_paths (it said data.paths for every pattern)."""
    from input_pipeline import DataConfig, DataError, make_dataset

    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(source="mixture", seq_len=16, sources=(
        {"source": "synthetic"},
        {"source": "jsonl", "paths": [str(good)], "eval_paths": [str(tmp_path / "no*.jsonl")]}))
    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.eval_paths='.*no\*\.jsonl': "
                                        r"expected files matching the pattern$"):
        make_dataset(cfg, split="eval", batch_size=2, seed=0)
    one = DataConfig(source="jsonl", paths=(str(tmp_path / "none*.jsonl"),), seq_len=16)
    with pytest.raises(DataError, match=r"^data\.paths='.*none\*\.jsonl': expected"):
        make_dataset(one, split="train", batch_size=2, seed=0)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrayrecord"])
def test_unreadable_inputs_are_one_line(tmp_path, kind) -> None:
    """A pattern matching a folder, or a file in another format, gives one DataError line
    naming the path (the reader libraries raised their own errors with tracebacks)."""
    from input_pipeline import DataError
    from input_pipeline.sources import open_source

    (tmp_path / "sub").mkdir()
    cfg = DataConfig(source=kind, paths=(str(tmp_path / "*"),))
    with pytest.raises(DataError) as e:
        open_source(cfg.source_configs()[0], cfg, "train")
    assert str(e.value) == (f"{tmp_path / 'sub'}: is a directory; expected data files (a "
                            f"pattern such as dir/*.{kind})")
    if kind != "jsonl":  # a JSONL file read as Parquet / ArrayRecord
        (tmp_path / "sub").rmdir()
        (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n' * 3000)
        with pytest.raises(DataError) as e:
            open_source(cfg.source_configs()[0], cfg, "train")
        assert str(e.value).startswith(f"{tmp_path / 'a.jsonl'}: cannot be read as "
                                       f"data.source={kind!r} (")
        assert str(e.value).endswith(f"expected a file in {kind} format")
        assert "\n" not in str(e.value)


def _records(path, n: int, prefix: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{prefix}{i} text"}) + "\n" for i in range(n)))
    return str(path)


def test_held_out_files_that_training_reads_are_refused(tmp_path) -> None:
    """`paths: data/*.jsonl` next to `eval_paths: data/eval.jsonl` trained on the eval set;
    so did one file in two mixture sources when one of them holds out by eval_fraction.
    Reference: which files each split reads, by hand."""
    from input_pipeline import DataError
    from input_pipeline.sources import check_held_out

    train = _records(tmp_path / "train.jsonl", 5, "T")
    held = _records(tmp_path / "eval.jsonl", 5, "E")
    glob_all = str(tmp_path / "*.jsonl")
    one = DataConfig(source="jsonl", paths=(glob_all,), eval_paths=(held,))
    with pytest.raises(DataError) as e:
        check_held_out(one)
    assert str(e.value) == (f"data.eval_paths: {held!r} is also in data.paths; expected "
                            "held-out files that training does not read")
    check_held_out(DataConfig(source="jsonl", paths=(train,), eval_paths=(held,)))

    def mixture(first: dict, second: dict) -> DataConfig:
        return DataConfig(source="mixture", sources=(first, second))

    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.eval_paths: .*eval\.jsonl' is "
                                        r"also in data\.sources\[0\]\.paths; expected"):
        check_held_out(mixture({"source": "jsonl", "paths": [train, held]}, {
            "source": "jsonl", "paths": [_records(tmp_path / "t2", 3, "U")],
            "eval_paths": [held]}))
    for eval_paths in ([held], []):  # the second source, or the first, splits by fraction
        first = {"source": "jsonl", "paths": [train], "eval_paths": [held] * bool(eval_paths)}
        with pytest.raises(DataError, match=r"^data\.sources\[1\]\.paths: .*train\.jsonl' is "
                                            r"also in data\.sources\[0\]\.paths; expected"):
            check_held_out(mixture(first, {"source": "jsonl", "paths": [train]}))
    # both sources with separate eval files: the shared training file leaks nothing
    both = {"source": "jsonl", "paths": [train], "eval_paths": [held]}
    check_held_out(mixture(both, {**both, "eval_paths": [_records(tmp_path / "e2", 3, "F")]}))


def test_file_patterns(tmp_path) -> None:
    """A file two patterns match is refused (it was read twice, and with eval_fraction part
    of it was held out and trained on); `**` matches any depth (it matched one level only).
    Reference: the files written."""
    from input_pipeline import DataError
    from input_pipeline.sources import expand_paths

    a = _records(tmp_path / "a.jsonl", 2, "A")
    deep = _records(tmp_path / "x" / "y" / "b.jsonl", 2, "B")
    mid = _records(tmp_path / "x" / "c.jsonl", 2, "C")
    assert expand_paths((str(tmp_path / "**" / "*.jsonl"),)) == [a, mid, deep]
    with pytest.raises(DataError) as e:
        expand_paths((a, str(tmp_path / "*.jsonl")), "data.sources[0].paths")
    assert str(e.value) == (f"data.sources[0].paths: {a!r} is matched by both {a!r} and "
                            f"{str(tmp_path / '*.jsonl')!r}; expected each file once (a "
                            "mixture's weight up-weights a source)")


def test_one_file_under_two_spellings_is_refused(tmp_path) -> None:
    """A file is the same file however its path is spelled (`x/./a.jsonl`, or a symlink to
    it): comparing the paths as matched let both through, and the file was read twice.
    Reference: the files and links written here, and the message of test_file_patterns."""
    from input_pipeline import DataError
    from input_pipeline.sources import expand_paths

    a = _records(tmp_path / "x" / "a.jsonl", 2, "A")
    dotted = str(tmp_path / "x" / "." / "a.jsonl")
    link = tmp_path / "link.jsonl"
    link.symlink_to(a)
    for other in (dotted, str(link)):
        with pytest.raises(DataError) as e:
            expand_paths((a, other))
        assert str(e.value) == (f"data.paths: {other!r} is matched by both {a!r} and "
                                f"{other!r}; expected each file once (a mixture's weight "
                                "up-weights a source)")


def test_a_byte_order_mark_and_empty_files(tmp_path) -> None:
    """A UTF-8 byte-order mark cost the first record (invalid JSON); an empty eval file said
    '0 records cannot be sharded over 1 processes'. Reference: the records written."""
    from input_pipeline import DataError, make_dataset

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    source = JsonlFile(str(path))
    assert [json.loads(source[i][1])["text"] for i in range(len(source))] == ["first", "second"]
    assert source[0][0] == f"{path}:1"
    only_bom = tmp_path / "only.jsonl"
    only_bom.write_bytes(b"\xef\xbb\xbf\n\n")
    assert len(JsonlFile(str(only_bom))) == 0
    cfg = DataConfig(source="jsonl", paths=(str(path),), eval_paths=(str(only_bom),),
                     seq_len=8)
    with pytest.raises(DataError) as e:
        make_dataset(cfg, split="eval", batch_size=1, seed=0)
    assert str(e.value) == (f"data.eval_paths={[str(only_bom)]!r}: expected records for the "
                            "eval split; the files hold none")

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

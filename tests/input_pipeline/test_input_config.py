"""DataConfig validation and YAML-shaped input."""

from __future__ import annotations

import dataclasses

import pytest

from input_pipeline import DataConfig, SourceConfig


def test_yaml_shapes_are_normalised() -> None:
    cfg = DataConfig(source="mixture", sources=[
        {"source": "jsonl", "paths": ["a.jsonl", "b*.jsonl"], "weight": 2},
        {"source": "synthetic"}])
    assert cfg.sources[0] == SourceConfig(source="jsonl", paths=("a.jsonl", "b*.jsonl"),
                                          weight=2)
    assert isinstance(cfg.sources, tuple) and hash(cfg)
    assert DataConfig(source="jsonl", paths="x.jsonl").source_configs()[0].paths == ("x.jsonl",)
    assert dataclasses.asdict(cfg)["sources"][1]["source"] == "synthetic"


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, r"^data\.seq_len=1: expected"),
    # types, for a DataConfig built in Python (YAML 1.1 reads 1e3 as a string)
    ({"seq_len": "1e3"}, r"^data\.seq_len='1e3': expected an integer$"),
    ({"num_documents": 2.5}, r"^data\.num_documents=2\.5: expected an integer$"),
    ({"packing": "yes"}, r"^data\.packing='yes': expected true or false$"),
    ({"eval_fraction": "0.1"}, r"^data\.eval_fraction='0\.1': expected a number$"),
    ({"eval_fraction": 1.0}, r"^data\.eval_fraction=1\.0: expected"),
    ({"source": "csv"}, r"^data\.source='csv': expected one of"),
    ({"source": "jsonl"}, r"^data\.paths=\(\): expected at least one path"),
    ({"source": "mixture"}, r"^data\.sources=\(\): expected a non-empty list"),
    ({"sources": [{"source": "synthetic"}]}, r"^data\.sources=.*expected an empty list"),
    ({"source": "mixture", "sources": [{"source": "synthetic", "weight": 0}]},
     r"^data\.sources\[0\]\.weight=0: expected a positive number"),
    ({"source": "mixture", "sources": [{"source": "synthetic"},
                                       {"source": "synthetic", "weight": -1}]},
     r"^data\.sources\[1\]\.weight=-1: expected a positive number"),
    ({"source": "mixture", "sources": [{"source": "synthetic", "wieght": 1}]},
     r"^data\.sources=.*unknown keys \['wieght'\]"),
    ({"num_workers": -1}, r"^data\.num_workers=-1: expected"),
    ({"paths": 3}, r"^data\.paths=3: expected a list of paths"),
    # files given but the embedded corpus selected (data.source forgotten): refused, not ignored
    ({"paths": ["a.jsonl"]}, r"^data\.paths=\['a\.jsonl'\]: expected no files with "
                             r"data\.source='synthetic'"),
    ({"eval_paths": ["e.jsonl"]}, r"^data\.eval_paths=\['e\.jsonl'\]: expected no files"),
    ({"max_bad_fraction": 1.5}, r"^data\.max_bad_fraction=1\.5: expected a fraction in"),
    ({"source": "mixture", "sources": [{"source": "synthetic", "paths": ["w.jsonl"]}]},
     r"^data\.sources\[0\]\.paths=\['w\.jsonl'\]: expected no files for source 'synthetic'"),
    ({"source": "mixture", "sources": [{"source": "synthetic"}], "paths": ["w.jsonl"]},
     r"^data\.paths=\['w\.jsonl'\]: expected none with data\.source='mixture'"),
])
def test_invalid_values_fail_in_one_line(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message) as e:
        DataConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_missing_files_fail_clearly(tmp_path) -> None:
    from input_pipeline import make_dataset

    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "none*.jsonl"),))
    with pytest.raises(ValueError, match=r"none\*\.jsonl'.*expected files matching"):
        make_dataset(cfg, split="train", batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"split='test'"):
        make_dataset(DataConfig(), split="test", batch_size=1, seed=0)

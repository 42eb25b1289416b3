"""The YAML 1.2 core-schema reader of configs (jaxmoe/config_yaml.py), beside tests/test_config.py
(which holds the other YAML 1.2 cases and is near its size limit)."""

import pytest

from jaxmoe.config import ConfigError, load_config
from jaxmoe.config_yaml import parse_yaml


def test_an_empty_value_is_null():
    """YAML 1.2 core schema (spec 10.3.2, its `/* Empty */` row): an empty plain scalar is null, a
    quoted empty one the empty string. Without the empty alternative of the null pattern it
    read as '', and a config file's `sample_prompt:` with nothing after it was taken silently
    as an empty prompt instead of refused. Reference: the spec's table; the one-line error
    of a null string field."""
    assert parse_yaml("a:\n") == {"a": None}
    assert parse_yaml("{a: }") == {"a": None}
    assert parse_yaml("- \n- x\n") == [None, "x"]
    assert parse_yaml("a: ''\n") == {"a": ""}


def test_an_empty_value_in_a_config_file_is_refused(tmp_path):
    """A field left empty in a file is null and refused as one line naming it (not read as an
    empty string); an override `key=` with nothing after it is never read as YAML: a string
    field takes it verbatim as ''. Reference: config.py's _parse_value and the type checks."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  sample_prompt:\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == "train.sample_prompt=None: expected a string"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train={steps: }"])
    assert str(e.value) == "train.steps=None: expected an integer"
    assert load_config(None, ["train.sample_prompt="]).train.sample_prompt == ""

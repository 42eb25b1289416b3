"""Typed, validated configuration: frozen dataclasses, YAML diffs and `key=value` overrides.

Defaults live only in the dataclasses (`jaxmoe/config_schema.py`, re-exported here, and
`input_pipeline/config.py` for `data`); a YAML file in `configs/` is a small diff on them,
and command-line overrides (`model.num_experts=8`) are a diff on the YAML. Every value is
type-checked here and every impossible combination is refused before anything compiles
(`jaxmoe/config_validate.py`, re-exported here), with one line naming the key, the value and
what was expected.

YAML (files and override values) is read with the YAML 1.2 core schema
(`jaxmoe/config_yaml.py`): `010` is 10, `1:2` a string, only true/false are booleans. An
override of a string field (or of `data.paths`/`data.eval_paths`) takes the text after `=`
verbatim unless it starts with a quote (or `[` for the path lists): `train.sample_prompt=1:2`,
`data.paths=*.jsonl`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxmoe.config_schema import (  # noqa: F401  (re-exported: the config API lives here)
    Config,
    ConfigError,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    fail,
)
from jaxmoe.config_validate import check_data, check_trainable, validate  # noqa: F401
from jaxmoe.config_yaml import Dumper, YAMLError, parse_yaml, yaml_problem

# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, args[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(key, value, f"a mapping of {_type_name(tp)} fields")
        return _build(tp, value, key)
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and \
            dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            fail(key, value, f"a list of {_type_name(args[0])} mappings")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail(key, value, "a mapping")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "a number")
        try:
            value = float(value)  # an int beyond float range: OverflowError
        except OverflowError:
            fail(key, value, "a finite number")
        if not math.isfinite(value):
            fail(key, value, "a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "an integer")
        if not -2**63 <= value < 2**63:  # past int64, numpy and XLA cannot hold it
            fail(key, value, "an integer within 64 bits")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "a string")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(
                f"{key}: unknown key; expected one of {', '.join(sorted(names))}")
        kwargs[name] = _coerce(key, value, hints[name])
    if "key" in inspect.signature(cls).parameters and "key" not in names:
        kwargs["key"] = prefix  # an InitVar naming the entry in its own error messages
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # sub-configs validate themselves in __post_init__
        raise ConfigError(str(e)) from None


def _field_type(key: str, root: type | None = None) -> Any:
    """The annotated type of the dotted `key` under `root` (Config), or None if unknown."""
    tp: Any = root or Config
    for part in key.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        if part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _parse_value(key: str, raw: str) -> Any:
    """An override's text after `=`: verbatim for strings (and path lists), else YAML."""
    tp, text = _field_type(key), raw.strip()
    if not text:
        return ""
    verbatim = (tp is str and text[0] not in "'\"") or (
        tp == tuple[str, ...] and text[0] not in "'\"[")
    if verbatim:
        return raw
    try:
        return parse_yaml(raw)
    except YAMLError as e:
        raise ConfigError(f"{key}={raw!r}: expected a YAML value ({yaml_problem(e)})") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["model.num_experts=8", ...]` -> nested dict. A key given twice differently is an error."""
    flat: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.num_experts=8")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _parse_value(key, raw)
        if key in flat and flat[key] != value:
            raise ConfigError(
                f"{key}: given twice with different values {flat[key]!r} and {value!r}")
        flat[key] = value
    for key in flat:  # `model.num_experts=8 model={...}`: one would silently drop the other
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in flat:
                raise ConfigError(f"{key} and {'.'.join(parts[:i])}: both given; expected one "
                                  f"(put {parts[i]} inside the {'.'.join(parts[:i])} value)")
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        # A rules mapping given whole (mesh.rules={...} or mesh={rules: {...}}) replaces the
        # file's rules; mesh.rules.X=... replaces the one rule X.
        if key == "mesh.rules" and isinstance(value, dict):
            value = _Whole(value)
        elif key == "mesh" and isinstance(value, dict) and isinstance(value.get("rules"), dict):
            value = {**value, "rules": _Whole(value["rules"])}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override of {part}")
        node[parts[-1]] = value
    return nested


class _Whole(dict):
    """An override value that replaces its whole section instead of merging into it."""


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, _Whole):
            out[key] = dict(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Defaults <- nested `values` (e.g. a stored config) <- `key=value` overrides, validated."""
    return validate(_build(Config, _merge(values, parse_overrides(overrides or []))))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then `validate`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            if path.is_dir():
                raise ConfigError(f"--config {path}: is a directory; expected a YAML file")
            if not path.is_file():
                raise ConfigError(f"--config {path}: no such file")
            loaded = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot be read ({e.strerror}); expected a "
                              "readable YAML file") from None
        except YAMLError as e:
            raise ConfigError(f"{path}: expected valid YAML ({yaml_problem(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: byte {e.start} is not UTF-8; expected a UTF-8 YAML "
                              "text file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        if "model_type" in loaded or "architectures" in loaded:
            raise ConfigError(
                f"--config {path}: a Hugging Face config (model_type "
                f"{loaded.get('model_type')!r}); expected a jaxmoe config: `jaxmoe convert "
                "from-hf HF_DIR OUT` imports the model and writes OUT/config.json for it")
        values = loaded
    return config_from_dict(values, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (loadable by `load_config`)."""
    return yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False)

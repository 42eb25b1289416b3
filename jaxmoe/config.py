"""Typed, validated configuration: frozen dataclasses, YAML diffs and `key=value` overrides.

Defaults live only in the dataclasses (`jaxmoe/config_schema.py`, re-exported here, and
`input_pipeline/config.py` for `data`); a YAML file in `configs/` is a small diff on them,
and command-line overrides (`model.num_experts=8`) are a diff on the YAML. Every value is
type-checked and every impossible combination is refused before anything compiles, with one
line naming the key, the value and what was expected.

YAML (files and override values) is read with the YAML 1.2 core schema
(`jaxmoe/config_yaml.py`): `010` is 10, `1:2` a string, only true/false are booleans. An
override of a string field (or of `data.paths`/`data.eval_paths`) takes the text after `=`
verbatim unless it starts with a quote (or `[` for the path lists): `train.sample_prompt=1:2`,
`data.paths=*.jsonl`.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from input_pipeline.config import SEED_MAX
from jaxmoe.config_schema import (  # noqa: F401  (re-exported: the config API lives here)
    Config,
    ConfigError,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from jaxmoe.config_yaml import Dumper, YAMLError, parse_yaml, yaml_problem

# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "model.router_scoring": ("softmax", "sigmoid"),
    "model.dispatch": ("dropless", "capacity"),
    "model.grouped_matmul": ("auto", "ragged_dot", "blocks"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("gqa", "mla"),
    "model.rope_scaling": ("none", "yarn"),
}


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: expected {expected}")


def validate(cfg: Config) -> Config:
    """Checks every impossible combination; returns `cfg` unchanged or raises ConfigError."""
    m, t = cfg.model, cfg.train
    for key, choices in _CHOICES.items():
        value = getattr(m, key.split(".")[1])
        if value not in choices:
            _fail(key, value, f"one of {', '.join(choices)}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.embed_dim": m.embed_dim,
        "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim, "model.moe_every": m.moe_every,
        "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.grad_accum_steps": t.grad_accum_steps, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
    }
    for key, value in positive.items():
        if value < 1:
            _fail(key, value, "a positive integer")
    if m.num_heads % m.num_kv_heads:
        _fail("model.num_kv_heads", m.num_kv_heads,
              f"a divisor of model.num_heads={m.num_heads}")
    if m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, "an even number (rotary embeddings rotate pairs)")
    if m.num_experts < 0:
        _fail("model.num_experts", m.num_experts, ">= 0 (0 = dense model)")
    if m.num_experts:
        if not 1 <= m.num_experts_per_tok <= m.num_experts:
            _fail("model.num_experts_per_tok", m.num_experts_per_tok,
                  f"between 1 and model.num_experts={m.num_experts}")
        if m.expert_mlp_dim < 1:
            _fail("model.expert_mlp_dim", m.expert_mlp_dim, "a positive integer")
        if m.capacity_factor <= 0:
            _fail("model.capacity_factor", m.capacity_factor, "> 0")
        if m.gmm_block_size < 0 or m.gmm_block_size % 8:
            _fail("model.gmm_block_size", m.gmm_block_size,
                  "0 (auto) or a positive multiple of 8")
        if not 0 <= m.first_k_dense <= m.num_layers:
            _fail("model.first_k_dense", m.first_k_dense,
                  f"between 0 and model.num_layers={m.num_layers}")
        if (m.num_layers - m.first_k_dense) % m.moe_every:
            _fail("model.moe_every", m.moe_every,
                  f"a divisor of num_layers - first_k_dense = {m.num_layers - m.first_k_dense}"
                  " (layers are scanned in repeating groups)")
    _validate_shared_experts(m)
    for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "init_std"):
        if getattr(m, key) < 0:
            _fail(f"model.{key}", getattr(m, key), ">= 0")
    for key in ("rope_theta", "norm_eps", "routed_scaling_factor"):
        if getattr(m, key) <= 0:
            _fail(f"model.{key}", getattr(m, key), "> 0")
    if m.context_length < 0:
        _fail("model.context_length", m.context_length, "an integer >= 0 (0: data.seq_len)")
    _validate_mla_and_groups(m)
    if t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", t.grad_accum_steps,
              f"a divisor of train.batch_size={t.batch_size}")
    for key in ("checkpoint_every", "keep_every"):
        if getattr(t, key) < 0:
            _fail(f"train.{key}", getattr(t, key), ">= 0 (0 disables)")
    if not 0 <= t.seed <= SEED_MAX:
        _fail("train.seed", t.seed, f"an integer in [0, {SEED_MAX}]")
    if t.sample_tokens < 0:
        _fail("train.sample_tokens", t.sample_tokens, ">= 0 (0: no sample)")
    if t.keep_checkpoints < 1:
        _fail("train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    if t.keep_every and t.checkpoint_every and t.keep_every % t.checkpoint_every:
        _fail("train.keep_every", t.keep_every, f"a multiple of train.checkpoint_every="
              f"{t.checkpoint_every} (only saved steps can be kept)")
    o = t.optimizer
    if o.learning_rate <= 0:
        _fail("train.optimizer.learning_rate", o.learning_rate, "> 0")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("train.optimizer.min_lr_ratio", o.min_lr_ratio, "a fraction in [0, 1]")
    if o.warmup_steps < 0:
        _fail("train.optimizer.warmup_steps", o.warmup_steps, ">= 0")
    for key in ("b1", "b2"):
        if not 0 <= getattr(o, key) < 1:
            _fail(f"train.optimizer.{key}", getattr(o, key), "a fraction in [0, 1)")
    if o.eps <= 0:
        _fail("train.optimizer.eps", o.eps, "> 0")
    if o.weight_decay < 0:
        _fail("train.optimizer.weight_decay", o.weight_decay, ">= 0")
    if o.grad_clip_norm < 0:
        _fail("train.optimizer.grad_clip_norm", o.grad_clip_norm, ">= 0 (0 disables clipping)")
    mesh_axes = {f.name: getattr(cfg.mesh, f.name) for f in dataclasses.fields(MeshConfig)
                 if f.name not in ("rules", "expert_all_to_all", "expert_buffer_factor")}
    if sum(v == -1 for v in mesh_axes.values()) > 1:
        _fail("mesh", mesh_axes, "at most one axis set to -1")
    for key, value in mesh_axes.items():
        if value == 0 or value < -1:
            _fail(f"mesh.{key}", value, "a positive integer or -1")
    a2a_choices = ("auto", "padded", "ragged", "ragged_emulated")
    if cfg.mesh.expert_all_to_all not in a2a_choices:
        _fail("mesh.expert_all_to_all", cfg.mesh.expert_all_to_all,
              f"one of {', '.join(a2a_choices)}")
    if cfg.mesh.expert_buffer_factor < 0:
        _fail("mesh.expert_buffer_factor", cfg.mesh.expert_buffer_factor, ">= 0 (0 = never drop)")
    if cfg.mesh.rules:
        _validate_rules(cfg.mesh.rules)
    return cfg


def _validate_shared_experts(m: ModelConfig) -> None:
    """Shared experts exist only next to routed ones; their options need them."""
    if m.num_shared_experts < 0:
        _fail("model.num_shared_experts", m.num_shared_experts, ">= 0")
    if m.shared_expert_mlp_dim < 0:
        _fail("model.shared_expert_mlp_dim", m.shared_expert_mlp_dim,
              ">= 0 (0: expert_mlp_dim * num_shared_experts)")
    if m.num_experts == 0 and m.num_shared_experts:
        _fail("model.num_shared_experts", m.num_shared_experts, "0 when model.num_experts=0 "
              "(a dense model has no shared experts; widen model.mlp_dim instead)")
    if m.num_shared_experts == 0:
        if m.shared_expert_gate:
            _fail("model.shared_expert_gate", True,
                  "false when model.num_shared_experts=0 (it gates the shared experts)")
        if m.shared_expert_mlp_dim:
            _fail("model.shared_expert_mlp_dim", m.shared_expert_mlp_dim,
                  "0 when model.num_shared_experts=0")


def _validate_rules(rules: dict[str, Any]) -> None:
    """`mesh.rules`: known logical names mapped to mesh axes (checked by sharding.rules)."""
    from sharding.rules import DEFAULT_RULES, make_rules  # jax is loaded already (jaxmoe)

    names = list(dict.fromkeys(name for name, _ in DEFAULT_RULES))
    for name in rules:
        if name not in names:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis; expected one of "
                              f"{', '.join(names)}")
    try:
        make_rules(rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_trainable(cfg: Config) -> Config:
    """What a training step needs beyond `validate`: float16 compute is allowed for inference
    (`load_checkpoint`) but not for training, which has no loss scaling."""
    if cfg.model.compute_dtype == "float16":
        _fail("model.compute_dtype", "float16", "float32 or bfloat16 for training (float16 "
              "gradients need loss scaling, which jaxmoe does not do: small ones underflow)")
    return cfg


def check_data(cfg: Config) -> Config:
    """What `validate` cannot check from the values alone: that the tokenizer and data files
    the config names exist on this machine and that the tokenizer's ids fit the model.

    For commands that read data (`train`); a stored config stays loadable without its data,
    and a model-only config (conversion, tests) may have a vocabulary smaller than 259 bytes.
    Reads the tokenizer file, never the data. Returns `cfg` or raises ConfigError.
    """
    from input_pipeline.tokenizer import make_tokenizer

    check_trainable(cfg)
    d = cfg.data
    if d.tokenizer != "byte" and not os.path.isfile(d.tokenizer):
        _fail("data.tokenizer", d.tokenizer, "'byte' or an existing tokenizer file")
    try:
        vocab = make_tokenizer(d).vocab_size  # ValueError: a special token it lacks
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if vocab > cfg.model.vocab_size:
        _fail("model.vocab_size", cfg.model.vocab_size,
              f">= {vocab}, the vocab_size of data.tokenizer={d.tokenizer!r}")
    sources = ([(f"data.sources[{i}]", s) for i, s in enumerate(d.sources)]
               if d.source == "mixture" else [("data", d)])
    for prefix, src in sources:
        if src.source == "synthetic":
            continue
        for name in ("paths", "eval_paths"):
            for pattern in getattr(src, name):
                if not glob.glob(os.path.expanduser(pattern)):
                    _fail(f"{prefix}.{name}", pattern, "a file or a glob pattern matching files")
    return cfg


def _validate_mla_and_groups(m: ModelConfig) -> None:
    """Multi-head latent attention, YaRN and group-limited routing (see ModelConfig)."""
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, key) < 1:
                _fail(f"model.{key}", getattr(m, key),
                      "a positive integer when model.attention=mla")
        if m.q_lora_rank < 0:
            _fail("model.q_lora_rank", m.q_lora_rank, ">= 0 (0: no query compression)")
        if m.qk_rope_head_dim % 2:
            _fail("model.qk_rope_head_dim", m.qk_rope_head_dim,
                  "an even number (rotary embeddings rotate pairs)")
        for key in ("qkv_bias", "qk_norm"):
            if getattr(m, key):
                _fail(f"model.{key}", True, "false when model.attention=mla")
    if m.rope_scaling == "yarn":
        if m.attention != "mla":
            _fail("model.rope_scaling", m.rope_scaling,
                  "none unless model.attention=mla (YaRN is implemented for MLA)")
        if m.rope_scaling_factor < 1:
            _fail("model.rope_scaling_factor", m.rope_scaling_factor, ">= 1")
        if m.rope_original_max_len < 1:
            _fail("model.rope_original_max_len", m.rope_original_max_len, "a positive integer")
        if m.yarn_beta_fast <= 0 or m.yarn_beta_slow <= 0:
            _fail("model.yarn_beta_fast/yarn_beta_slow", (m.yarn_beta_fast, m.yarn_beta_slow),
                  "positive numbers")
        if m.yarn_beta_fast <= m.yarn_beta_slow:  # the ramp between them would be inverted
            _fail("model.yarn_beta_fast/yarn_beta_slow", (m.yarn_beta_fast, m.yarn_beta_slow),
                  "beta_fast > beta_slow (DeepSeek-V3: 32 and 1)")
        for key in ("yarn_mscale", "yarn_mscale_all_dim"):
            if getattr(m, key) < 0:  # a zero or negative attention scale
                _fail(f"model.{key}", getattr(m, key), ">= 0")
    if m.n_group < 1 or (m.num_experts and m.num_experts % m.n_group):
        _fail("model.n_group", m.n_group,
              f"a positive divisor of model.num_experts={m.num_experts}")
    if not 1 <= m.topk_group <= m.n_group:
        _fail("model.topk_group", m.topk_group, f"between 1 and model.n_group={m.n_group}")
    if m.n_group > 1 and m.num_experts:
        per_group = m.num_experts // m.n_group
        if per_group < 2:
            _fail("model.n_group", m.n_group, "at most num_experts / 2 (a group is scored by "
                  "its top-2 experts)")
        if m.num_experts_per_tok > m.topk_group * per_group:
            _fail("model.num_experts_per_tok", m.num_experts_per_tok,
                  f"at most topk_group * experts per group = {m.topk_group * per_group}")


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
            _fail(key, value, f"a mapping of {_type_name(tp)} fields")
        return _build(tp, value, key)
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and \
            dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            _fail(key, value, f"a list of {_type_name(args[0])} mappings")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "a number")
        try:
            value = float(value)  # an int beyond float range: OverflowError
        except OverflowError:
            _fail(key, value, "a finite number")
        if not math.isfinite(value):
            _fail(key, value, "a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        if not -2**63 <= value < 2**63:  # past int64, numpy and XLA cannot hold it
            _fail(key, value, "an integer within 64 bits")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
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
        if path.is_dir():
            raise ConfigError(f"--config {path}: is a directory; expected a YAML file")
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except YAMLError as e:
            raise ConfigError(f"{path}: expected valid YAML ({yaml_problem(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: byte {e.start} is not UTF-8; expected a UTF-8 YAML "
                              "text file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        values = loaded
    return config_from_dict(values, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (loadable by `load_config`)."""
    return yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False)

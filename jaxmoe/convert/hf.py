"""jaxmoe checkpoint <-> Hugging Face safetensors, streaming.

`to_hf` reads one stored chunk at a time: for arrays chunked per layer (exports, and the
checkpoints `jaxmoe train` saves) that is one layer of one array; for arrays stored several
layers per chunk (a plain orbax save) it is those layers, since TensorStore cannot decode part
of a chunk. Every output shape is known up front, so safetensors shards are written tensor by
tensor (`ShardedWriter`) and nothing else accumulates. `from_hf` reads one HF tensor at a time
from its shard and writes it into its layer of the stacked arrays.

Both write into a temporary sibling directory and rename it into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from input_pipeline.sources import one_line
from jaxmoe import config as config_lib
from jaxmoe.convert import layout as lo
from jaxmoe.convert.cli import DEFAULT_SHARD_BYTES
from jaxmoe.convert.deepseek_v3 import FORMAT as DEEPSEEK_V3
from jaxmoe.convert.mixtral import FORMAT as MIXTRAL
from jaxmoe.convert.orbax_io import ParamsReader, ParamsWriter, abstract_params
from jaxmoe.convert.qwen_moe import QWEN2_MOE, QWEN3_MOE
from jaxmoe.convert.safetensors_io import SafetensorsReader, ShardedWriter, TensorPlan
from jaxmoe.convert.tokenizer_files import tokenizer_files, write_tokenizer_files
from jaxmoe.staging import output_folder, staging_dir

log = logging.getLogger(__name__)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"
FORMATS: dict[str, lo.Format] = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V3)}
OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class Report:
    """What a conversion wrote: `tensors` arrays, `bytes` of tensor data, in `seconds`."""

    out: Path
    tensors: int
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


def get_format(name: str) -> lo.Format:
    if name not in FORMATS:
        raise lo.ConversionError(f"--format {name!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _groups(rules: Sequence[lo.Rule]) -> list[list[lo.Rule]]:
    """Rules sharing the same arrays, in first-appearance order, each sorted by layer index."""
    groups: dict[tuple[str, ...], list[lo.Rule]] = {}
    for r in rules:
        groups.setdefault(r.leaves, []).append(r)
    return [sorted(g, key=lambda r: -1 if r.index is None else r.index) for g in groups.values()]


def _hf_shapes(rule: lo.Rule, abstract: dict[str, Any]) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors `rule` produces, by tracing it on abstract values."""
    specs = [jax.ShapeDtypeStruct(abstract[n].shape[1:] if rule.index is not None
                                  else abstract[n].shape, jnp.float32) for n in rule.leaves]
    outs = jax.eval_shape(lambda *a: rule.to_hf(a, jnp), *specs)
    return [tuple(o.shape) for o in outs]


def _plan(groups: list[list[lo.Rule]], abstract: dict[str, Any],
          dtype: np.dtype) -> list[TensorPlan]:
    plan = []
    for group in groups:
        for rule in group:
            out_dtype = np.dtype(np.float32) if rule.fp32 else dtype
            for name, shape in zip(rule.hf, _hf_shapes(rule, abstract)):
                plan.append(TensorPlan(name, out_dtype, shape))
    return plan


def _prepare_out(out: str | Path, nbytes: int) -> tuple[Path, Path]:
    out, problem = output_folder(out)
    if problem:
        raise lo.ConversionError(problem)
    return out, staging_dir(out, nbytes)


def _uncovered(rules: Sequence[lo.Rule], abstract: dict[str, Any]) -> list[str]:
    """Arrays no rule maps; only router selection biases may be left (formats without one)."""
    covered = {n for r in rules for n in r.leaves}
    rest = sorted(set(abstract) - covered)
    stray = [n for n in rest if not n.endswith("router.bias.value")]
    if stray:
        raise AssertionError(f"no conversion rule covers {stray[0]}")  # a bug in a format module
    return rest


def to_hf(checkpoint: str | Path, out: str | Path, fmt: str, dtype: str = "float32",
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Report:
    """Writes the checkpoint's parameters as an HF model directory `out` in format `fmt`.

    Raises ConversionError (one line) when `fmt` cannot represent the model."""
    start = time.perf_counter()
    form = get_format(fmt)
    if dtype not in OUT_DTYPES:
        raise lo.ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    reader = ParamsReader(checkpoint)
    cfg = reader.config
    form.check(cfg.model)
    _, abstract = abstract_params(cfg.model)
    absent = sorted(set(abstract) - reader.names)
    for name in absent:
        if not (reader.missing_rest and name.startswith("rest.")):
            raise lo.ConversionError(f"checkpoint {reader.step_dir}: array {name} is missing")
        if cfg.model.bias_update_rate > 0:
            raise lo.ConversionError(f"checkpoint {reader.step_dir}: an export without router "
                                     "biases (no rest/ item) of a model trained with "
                                     "model.bias_update_rate > 0; convert the training "
                                     "checkpoint instead")
        reader.assume_zero(name, abstract[name].shape, abstract[name].dtype)
    for name, leaf in abstract.items():
        if reader.shape(name) != tuple(leaf.shape):
            raise lo.ConversionError(
                f"checkpoint {reader.step_dir}: array {name} has shape {reader.shape(name)}, "
                f"its config implies {tuple(leaf.shape)}")
    rules = form.rules(cfg.model)
    for name in _uncovered(rules, abstract):
        if not form.router_bias and np.any(reader.read(name) != 0):
            lo.refuse(fmt, f"router selection bias {name} is nonzero (trained with "
                      f"model.bias_update_rate > 0) and {fmt} has no selection bias")
    groups = _groups(rules)
    plan = _plan(groups, abstract, OUT_DTYPES[dtype])
    out, tmp = _prepare_out(out, sum(t.nbytes for t in plan))
    writer = ShardedWriter(tmp, plan, max_shard_bytes)
    try:
        for group in groups:
            _export_group(reader, group, writer)
        writer.close()
        token_ids, generation, own_tokenizer = _special_tokens(reader)
        hf_cfg = {**form.hf_config(cfg, dtype), **token_ids}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if generation is not None:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        if own_tokenizer:
            tokenizer, why_not = tokenizer_files(cfg.data)
            write_tokenizer_files(tokenizer, tmp)
            if why_not:
                log.warning("%s", why_not)
        # Takes the place of an empty folder (checked before) atomically; fails, leaving no
        # copy behind, if something was put there meanwhile.
        os.replace(tmp, out)
    except BaseException:
        try:
            writer.abort()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Report(out, len(plan), writer.bytes_written, time.perf_counter() - start)


def _hf_extras(hf_dir: Path) -> dict[str, Any]:
    """What an HF model directory says beyond the weights that `to_hf` should write back: the
    special token ids of config.json and generation_config.json (stopping at EOS needs them)."""
    hf = json.loads((hf_dir / "config.json").read_text())  # read before, by hf_model_config
    extras: dict[str, Any] = {"token_ids": {k: hf[k] for k in TOKEN_ID_KEYS
                                            if hf.get(k) is not None}}
    path = hf_dir / GENERATION_CONFIG
    if path.is_file():
        try:
            generation = json.loads(path.read_text())
        except ValueError as e:
            raise lo.ConversionError(f"{path}: not valid JSON ({one_line(e)})") from None
        if not isinstance(generation, dict):
            raise lo.ConversionError(f"{path}: expected a JSON object")
        extras["generation_config"] = generation
    return extras


def _special_tokens(reader: ParamsReader
                    ) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """(config.json's special token ids, generation_config.json or None, whether the
    checkpoint's `data.tokenizer` is the model's and on this machine, so its files can be
    written) for an export: the ids of the HF model a `from_hf` export came from (its
    tokenizer files are not here: a warning says to copy them), else those of
    `data.tokenizer` (none, with a warning, when its file is not on this machine)."""
    hf = reader.header.get("hf")
    if isinstance(hf, dict):
        ids, generation = hf.get("token_ids") or {}, hf.get("generation_config")
        if not isinstance(ids, dict) or not isinstance(generation, (dict, type(None))):
            raise lo.ConversionError(f"{reader.step_dir}/export.json: 'hf' holds token_ids "
                                     "or generation_config that are not mappings (damaged?)")
        log.warning("no tokenizer files: %s was imported from Hugging Face; copy the source "
                    "model's tokenizer files", reader.step_dir)
        return dict(ids), generation, False
    if reader.header.get("converted_by") == "jaxmoe convert from-hf":  # before "hf" was kept
        log.warning("config.json gets no bos/eos/pad token ids and no tokenizer files: %s was "
                    "imported before jaxmoe kept the source model's (convert it from Hugging "
                    "Face again to keep them)", reader.step_dir)
        return {}, None, False
    from input_pipeline.tokenizer import make_tokenizer

    try:
        tok = make_tokenizer(reader.config.data)
    except ValueError as e:
        log.warning("config.json gets no bos/eos/pad token ids and no tokenizer files: %s", e)
        return {}, None, False
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id}, None, True


def _export_group(reader: ParamsReader, group: list[lo.Rule], writer: ShardedWriter) -> None:
    """Reads the group's arrays one stored chunk of layers at a time and writes its tensors."""
    names = group[0].leaves
    if group[0].index is None:
        values = [reader.read(n) for n in names]
        for rule in group:
            _emit(rule, values, writer)
        return
    per_chunk = max(reader.layers_per_chunk(n) for n in names)
    i = 0
    while i < len(group):
        first = group[i].index
        begin = first - first % per_chunk
        stop = min(begin + per_chunk, reader.shape(names[0])[0])
        values = [reader.read(n, begin, stop) for n in names]
        while i < len(group) and group[i].index < stop:
            _emit(group[i], [v[group[i].index - begin] for v in values], writer)
            i += 1
        del values  # free this chunk before reading the next


def _emit(rule: lo.Rule, values: list[np.ndarray], writer: ShardedWriter) -> None:
    for name, tensor in zip(rule.hf, rule.to_hf(values, np)):
        writer.write(name, tensor)


def hf_model_config(hf_dir: str | Path, overrides: Sequence[str] = (),
                    param_dtype: str | None = None) -> tuple[lo.Format, config_lib.Config]:
    """(format, jaxmoe Config) that an HF model directory's config.json describes."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise lo.ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise lo.ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise lo.ConversionError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type is None and isinstance(hf.get("model"), dict):  # jaxmoe's own config
        raise lo.ConversionError(f"{path}: a jaxmoe config, not a Hugging Face one; expected a "
                                 "Hugging Face model directory (`jaxmoe convert to-hf` "
                                 "converts a jaxmoe checkpoint)")
    forms = [f for f in FORMATS.values() if model_type in f.model_types]
    if not forms:
        raise lo.ConversionError(f"{path}: model_type {model_type!r} is not supported (expected "
                                 f"one of {', '.join(FORMATS)})")
    form = forms[0]
    try:
        fields = form.model_fields(hf)
    except lo.FormatRefusal as e:  # named by the file read, not by a flag from-hf lacks
        raise lo.ConversionError(f"{path} (model_type {model_type!r}): {e.what}") from None
    except lo.ConversionError:
        raise
    except KeyError as e:
        raise lo.ConversionError(f"{path}: missing key {e.args[0]!r} (needed for a "
                                 f"{form.name} model)") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise lo.ConversionError(f"{path}: a value of an unexpected type ({e})") from None
    if param_dtype is not None:
        fields["param_dtype"] = param_dtype
    try:
        cfg = config_lib.config_from_dict({"model": fields}, list(overrides))
    except config_lib.ConfigError as e:  # a value the file holds (or an override) is refused
        given = f" with {' '.join(overrides)}" if overrides else ""
        raise lo.ConversionError(f"{path} (model_type {model_type!r}){given}: {e}") from None
    try:
        form.check(cfg.model)
    except lo.FormatRefusal as e:  # an override the format cannot hold
        raise lo.ConversionError(f"{path} (model_type {model_type!r}) with "
                                 f"{' '.join(overrides)}: {e.what}") from None
    return form, cfg


def from_hf(hf_dir: str | Path, out: str | Path, overrides: Sequence[str] = (),
            param_dtype: str | None = None) -> Report:
    """Writes a params-only jaxmoe checkpoint `out` from an HF model directory.

    `overrides` (`key=value`, e.g. `model.compute_dtype=float32`) apply on top of the config
    derived from config.json; `param_dtype` sets the stored parameter dtype (default float32).
    Raises ConversionError (one line) on missing, unexpected or mis-shaped tensors."""
    start = time.perf_counter()
    form, cfg = hf_model_config(hf_dir, overrides, param_dtype)
    m = cfg.model
    reader = SafetensorsReader(hf_dir)
    _, abstract = abstract_params(m)
    if overrides:  # config.json fixes the architecture: an override may not reshape it
        _, given = abstract_params(hf_model_config(hf_dir, (), param_dtype)[1].model)
        reshaped = sorted(n for n in abstract.keys() | given.keys()
                          if getattr(abstract.get(n), "shape", None)
                          != getattr(given.get(n), "shape", None))
        if reshaped:
            raise lo.ConversionError(
                f"{' '.join(overrides)}: changes the parameters config.json describes (e.g. "
                f"{reshaped[0]}); expected overrides that keep their shapes (such as "
                "model.compute_dtype)")
    rules = form.rules(m)
    groups = _groups(rules)
    expected = {t.name: t.shape for t in _plan(groups, abstract, np.dtype(np.float32))}
    have = reader.names()
    missing = sorted(set(expected) - have)
    if missing:
        raise lo.ConversionError(f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} "
                                 "missing); config.json and the weights disagree")
    tied_head = {"lm_head.weight"} if m.tie_embeddings else set()  # transformers ignores it
    unexpected = sorted(n for n in have - set(expected) - tied_head if not form.ignored(n, m))
    if unexpected:
        raise lo.ConversionError(f"{hf_dir}: unexpected tensor {unexpected[0]} ({len(unexpected)} "
                                 "unexpected); config.json does not describe these weights")
    for name, shape in expected.items():
        if reader.info(name)[1] != shape:
            raise lo.ConversionError(f"{hf_dir}: tensor {name} has shape {reader.info(name)[1]}, "
                                     f"config.json implies {shape}")
    writer = ParamsWriter(out, cfg, source=str(Path(hf_dir).absolute()),
                          hf=_hf_extras(Path(hf_dir)))
    count = nbytes = 0
    try:
        for group in groups:
            for rule in group:
                tensors = [reader.get(h) for h in rule.hf]
                nbytes += sum(t.nbytes for t in tensors)
                for name, value in zip(rule.leaves, rule.from_hf(tensors, np)):
                    writer.write(name, value, rule.index)
                count += len(tensors)
        for name in _uncovered(rules, abstract):  # formats without a selection bias
            writer.write(name, np.zeros(abstract[name].shape, abstract[name].dtype))
        path = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return Report(path, count, nbytes, time.perf_counter() - start)

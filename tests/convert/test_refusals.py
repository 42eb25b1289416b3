"""What the converter refuses, each with one line naming the problem, and the CLI."""

import json
import re

import numpy as np
import pytest

from jaxmoe import cli
from jaxmoe.convert import ConversionError, from_hf, to_hf
from jaxmoe.convert.orbax_io import CheckpointFormatError
from jaxmoe.convert.safetensors_io import SafetensorsReader, ShardedWriter, TensorPlan
from tests.convert.helpers import jaxmoe_config, random_params, save_random_hf, write_export


def _export(tmp_path, fmt, name="ckpt", bias=False, **changes):
    cfg = jaxmoe_config(fmt, **changes)
    return write_export(cfg, random_params(cfg, bias=bias), tmp_path / name)


def _refused(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


@pytest.mark.parametrize("source,changes,target,parts", [
    ("mixtral", {}, "deepseek_v3", ["--format deepseek_v3", "model.attention='gqa'",
                                    "set model.attention=mla"]),
    ("qwen2_moe", {}, "mixtral", ["model.first_k_dense=1 cannot be represented"]),
    ("mixtral", {"num_shared_experts": 1}, "mixtral", ["model.num_shared_experts=1"]),
    ("mixtral", {}, "qwen3_moe", ["model.qk_norm=False", "qwen3_moe needs True"]),
    ("mixtral", {}, "qwen2_moe", ["model.num_shared_experts=0", "qwen2_moe needs > 0"]),
    ("deepseek_v3", {"router_scoring": "softmax"}, "deepseek_v3", ["model.router_scoring="]),
    ("mixtral", {}, "llama", ["--format 'llama': expected one of"]),
])
def test_unrepresentable_models_are_refused(tmp_path, source, changes, target, parts):
    ckpt = _export(tmp_path, source, **changes)
    with pytest.raises(ConversionError) as e:
        to_hf(ckpt, tmp_path / "out", target)
    _refused(e, *parts)
    assert not (tmp_path / "out").exists()


def test_output_filled_during_the_export_leaves_no_copy(tmp_path, monkeypatch):
    """The empty output folder gets a file while the export runs: the final rename fails
    and neither the user's file nor a staging copy is lost or left."""
    from jaxmoe.convert import hf

    ckpt = _export(tmp_path, "mixtral")
    out = tmp_path / "out"
    out.mkdir()
    real = hf.ShardedWriter.close

    def close(self):
        real(self)
        (out / "keep.txt").write_text("x")

    monkeypatch.setattr(hf.ShardedWriter, "close", close)
    with pytest.raises(OSError):
        to_hf(ckpt, out, "mixtral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_params_writer_refuses_an_export_with_a_layer_never_written(tmp_path):
    """A stacked array written layer by layer with one layer left out (a format-module bug)
    would read back that layer as zeros; finish() names it instead, and nothing is left."""
    from jaxmoe.convert.orbax_io import CheckpointFormatError, ParamsWriter

    cfg = jaxmoe_config("mixtral")
    arrays = random_params(cfg)
    writer = ParamsWriter(tmp_path / "out", cfg)
    skipped = next(n for n in sorted(arrays) if ".units." in n)
    for name, value in arrays.items():
        if ".units." in name:
            for i in range(value.shape[0]):
                if not (name == skipped and i == 1):
                    writer.write(name, value[i], i)
        else:
            writer.write(name, value)
    with pytest.raises(CheckpointFormatError,
                       match=rf"array {re.escape(skipped)}: entries \[1\] of its leading "
                             "axis never written"):
        writer.finish()
    writer.abort()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_nonzero_selection_bias_is_refused_without_a_bias_tensor(tmp_path):
    ckpt = _export(tmp_path, "mixtral", bias=True)
    with pytest.raises(ConversionError) as e:
        to_hf(ckpt, tmp_path / "out", "mixtral")
    _refused(e, "router selection bias", "is nonzero", "mixtral has no selection bias")


def test_existing_output_is_not_overwritten(tmp_path):
    ckpt = _export(tmp_path, "mixtral")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError) as e:
        to_hf(ckpt, tmp_path / "out", "mixtral")
    _refused(e, "exists and is not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    return save_random_hf("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


def _rewrite(src, dst, drop=(), add=None):
    """Copies an HF directory, dropping or adding tensors (one shard + index)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    reader = SafetensorsReader(src)
    tensors = {n: reader.get(n) for n in sorted(reader.names()) if n not in drop}
    tensors.update(add or {})
    writer = ShardedWriter(dst, [TensorPlan(n, a.dtype, a.shape) for n, a in tensors.items()],
                           10**9)
    for n, a in tensors.items():
        writer.write(n, a)
    writer.close()
    return dst


@pytest.mark.parametrize("drop,add,parts", [
    (["model.layers.1.block_sparse_moe.experts.3.w2.weight"], None,
     ["tensor model.layers.1.block_sparse_moe.experts.3.w2.weight is missing (1 missing)"]),
    ([], {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
     ["unexpected tensor model.layers.0.self_attn.q_proj.bias"]),
    (["model.norm.weight"], {"model.norm.weight": np.ones(65, np.float32)},
     ["tensor model.norm.weight has shape (65,), config.json implies (64,)"]),
])
def test_bad_hf_weights_are_refused(hf_mixtral, tmp_path, drop, add, parts):
    bad = _rewrite(hf_mixtral, tmp_path / "bad", drop, add)
    with pytest.raises(ConversionError) as e:
        from_hf(bad, tmp_path / "out")
    _refused(e, *parts)
    assert not (tmp_path / "out").exists()


def test_overrides_that_reshape_the_model_are_refused(hf_mixtral, tmp_path):
    """config.json fixes the architecture: an override changing a parameter's shape is
    named as the cause (it was reported as "config.json and the weights disagree"); one
    that keeps the shapes converts."""
    with pytest.raises(ConversionError) as e:
        from_hf(hf_mixtral, tmp_path / "out", ["model.num_experts=8"])
    _refused(e, "model.num_experts=8: changes the parameters config.json describes (e.g. ",
             "expected overrides that keep their shapes")
    assert not (tmp_path / "out").exists()
    from_hf(hf_mixtral, tmp_path / "ok", ["model.compute_dtype=float32"])
    assert (tmp_path / "ok").is_dir()


@pytest.mark.parametrize("change,parts", [
    ({"model_type": "llama"}, ["model_type 'llama' is not supported"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu' is not supported"]),
    ({"sliding_window": 4096}, ["sliding_window=4096 is not supported"]),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     ["rope type 'linear' is not supported"]),
    ({"quantization_config": {"quant_method": "fp8"}},
     ["quantized weights (quantization_config: fp8) are not supported"]),
    # a value jaxmoe's config refuses: named with the file it came from (was "jaxmoe: config
    # error: model.num_experts_per_tok=9 ..." with no word of config.json)
    ({"num_experts_per_tok": 9}, ["(model_type 'mixtral'): model.num_experts_per_tok=9: "
                                  "expected between 1 and"]),
])
def test_unsupported_hf_configs_are_refused(hf_mixtral, tmp_path, change, parts):
    bad = _rewrite(hf_mixtral, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError) as e:
        from_hf(bad, tmp_path / "out")
    _refused(e, *parts)
    # named by the file read (from-hf has no --format flag; the message named one)
    assert str(e.value).startswith(f"{bad / 'config.json'}") and "--format" not in str(e.value)


def test_a_jaxmoe_checkpoint_given_to_from_hf_is_named(tmp_path):
    """A jaxmoe export's config.json (jaxmoe's config) read as a Hugging Face one said
    "model_type None is not supported"."""
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps({"model": {"num_layers": 2}}))
    with pytest.raises(ConversionError) as e:
        from_hf(tmp_path / "export", tmp_path / "out")
    _refused(e, f"{tmp_path / 'export' / 'config.json'}: a jaxmoe config, not a Hugging Face "
             "one; expected a Hugging Face model directory (`jaxmoe convert to-hf` converts a "
             "jaxmoe checkpoint)")


@pytest.mark.parametrize("text,parts", [
    ('{"model_type": "mixtral", ', ["config.json: not valid JSON ("]),
    ("[1, 2]", ["config.json: expected a JSON object, got list"]),
    (None, ["config.json: missing key 'num_experts_per_tok' (needed for a mixtral model)"]),
    ("hidden", ["config.json: a value of an unexpected type ("]),
])
def test_damaged_hf_config_is_one_line(hf_mixtral, tmp_path, text, parts):
    from jaxmoe.convert.hf import hf_model_config

    config = json.loads((hf_mixtral / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    if text is None:
        config.pop("num_experts_per_tok")
        text = json.dumps(config)
    elif text == "hidden":
        text = json.dumps({**config, "rope_parameters": "fast"})
    (bad / "config.json").write_text(text)
    with pytest.raises(ConversionError) as e:
        hf_model_config(bad)
    _refused(e, *parts)


def test_deepseek_skips_rotary_caches_and_prediction_layers():
    from types import SimpleNamespace

    from jaxmoe.convert import deepseek_v3

    m = SimpleNamespace(num_layers=2)
    assert deepseek_v3.ignored("model.layers.0.self_attn.rotary_emb.inv_freq", m)
    assert deepseek_v3.ignored("model.rotary_emb.inv_freq", m)
    assert deepseek_v3.ignored("model.layers.2.mlp.gate.weight", m)  # multi-token prediction
    assert not deepseek_v3.ignored("model.layers.1.mlp.gate.weight", m)
    assert not deepseek_v3.ignored("model.norm.weight", m)


def test_cli_converts_and_refuses_with_one_line(hf_mixtral, tmp_path, capsys):
    out = tmp_path / "jaxmoe"
    assert cli.main(["convert", "from-hf", str(hf_mixtral), str(out),
                     "model.compute_dtype=float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["convert", "to-hf", str(out), str(tmp_path / "hf"), "--format", "mixtral",
                     "--dtype", "bfloat16", "--max-shard-size", "100KB"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    capsys.readouterr()
    assert cli.main(["convert", "to-hf", str(out), str(tmp_path / "ds"), "--format",
                     "deepseek_v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxmoe convert: --format deepseek_v3: model.attention='gqa'")
    assert "\n" not in err


def _no_leftovers(directory):
    return [p.name for p in directory.iterdir() if ".partial-" in p.name]


def test_full_disk_during_conversion_says_one_line_and_leaves_nothing(hf_mixtral, tmp_path,
                                                                      capsys, file_size_limit):
    src = tmp_path / "jaxmoe"
    assert cli.main(["convert", "from-hf", str(hf_mixtral), str(src)]) == 0
    capsys.readouterr()
    # to-hf: the safetensors writer thread hits the limit with a shard file open
    with file_size_limit(32 * 1024):
        rc = cli.main(["convert", "to-hf", str(src), str(tmp_path / "hf"), "--format",
                       "mixtral"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"jaxmoe convert: writing {tmp_path}/.hf.partial-") and \
        "File too large" in err, err
    # from-hf: TensorStore's writes fail inside a future (the largest array is ~64 KB)
    with file_size_limit(4 * 1024):
        rc = cli.main(["convert", "from-hf", str(hf_mixtral), str(tmp_path / "back")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith(f"jaxmoe convert: {tmp_path / 'back'}: writing array ") and \
        "File too large" in err, err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "back").exists()
    assert _no_leftovers(tmp_path) == []


def test_damaged_inputs_are_one_line(hf_mixtral, tmp_path, capsys):
    """A truncated data file of a jaxmoe checkpoint, and a safetensors file cut inside its
    header, each give one line naming the file or array (were tracebacks)."""
    ckpt = _export(tmp_path, "mixtral")
    data = max((p for p in (ckpt / "params").rglob("*") if p.is_file() and
                "zarr.json" not in p.name), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:50])
    assert cli.main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf"), "--format",
                     "mixtral"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxmoe convert: checkpoint {ckpt}") and "\n" not in err, err
    assert not (tmp_path / "hf").exists()

    bad = _rewrite(hf_mixtral, tmp_path / "bad_hf")
    shard = next(bad.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])  # inside the JSON header
    assert cli.main(["convert", "from-hf", str(bad), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxmoe convert: {shard}: header of ") and "\n" not in err, err


def test_damaged_metadata_is_one_line(tmp_path, capsys):
    """A jaxmoe checkpoint's `_METADATA` or config.json that is not what orbax / jaxmoe
    wrote, and safetensors headers or indexes whose entries have the wrong types: one line
    naming the file (were JSONDecodeError, KeyError and TypeError tracebacks)."""
    ckpt = _export(tmp_path, "mixtral")
    meta = ckpt / "params" / "_METADATA"
    for text in (meta.read_text()[:100], "{}"):
        meta.write_text(text)
        assert cli.main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf"), "--format",
                         "mixtral"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jaxmoe convert: {meta}: not orbax tree metadata (") and \
            err.endswith("damaged checkpoint?)") and "\n" not in err, err
    config = ckpt / "config.json"
    config.write_text('{"model": ')
    with pytest.raises(CheckpointFormatError) as e:
        to_hf(ckpt, tmp_path / "hf", "mixtral")
    assert str(e.value).startswith(f"{config}: not a JSON config (") and "\n" not in str(e.value)

    def safetensors(directory, header: dict, index: dict | None = None):
        directory.mkdir()
        raw = json.dumps(header).encode()
        (directory / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
        if index is not None:
            (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        return directory

    from jaxmoe.convert.safetensors_io import SafetensorsError

    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    for i, bad in enumerate(["F32", {"dtype": "F32", "shape": [2]},
                             {**entry, "data_offsets": [8, 0]}, {**entry, "shape": ["2"]}]):
        d = safetensors(tmp_path / f"st{i}", {"w": bad})
        with pytest.raises(SafetensorsError) as e:
            SafetensorsReader(d)
        assert str(e.value) == (f"{d / 'model.safetensors'}: header entry 'w' is not {{dtype, "
                                "shape, data_offsets: [begin, end]}} (damaged file?)")
    d = safetensors(tmp_path / "indexed", {"w": entry}, {"weight_map": {"w": 1}})
    with pytest.raises(SafetensorsError, match=r"expected a 'weight_map' mapping of tensor names"):
        SafetensorsReader(d)


def test_special_token_ids_of_a_tokenizer_not_on_this_machine(tmp_path, caplog):
    """A checkpoint whose data.tokenizer file is gone exports without bos/eos/pad ids, and
    says so (writing the byte tokenizer's ids would be wrong for it)."""
    ckpt = _export(tmp_path, "mixtral")
    config = json.loads((ckpt / "config.json").read_text())
    config["data"]["tokenizer"] = str(tmp_path / "gone.json")
    (ckpt / "config.json").write_text(json.dumps(config))
    to_hf(ckpt, tmp_path / "hf", "mixtral")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(written)
    assert not (tmp_path / "hf" / "generation_config.json").exists()
    assert [r.getMessage() for r in caplog.records] == [
        "config.json gets no bos/eos/pad token ids and no tokenizer files: data.tokenizer="
        f"{str(tmp_path / 'gone.json')!r}: expected 'byte' or an existing tokenizer file"]
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_an_import_from_before_token_ids_were_kept_gets_none(hf_mixtral, tmp_path, caplog):
    """An export.json of `from-hf` without its 'hf' entry: its data section is the default
    (byte tokenizer), whose ids would be wrong for the imported model; none are written."""
    from_hf(hf_mixtral, tmp_path / "ckpt")
    marker = tmp_path / "ckpt" / "export.json"
    header = json.loads(marker.read_text())
    assert "hf" in header
    del header["hf"]
    marker.write_text(json.dumps(header))
    to_hf(tmp_path / "ckpt", tmp_path / "hf", "mixtral")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(written)
    assert "was imported before jaxmoe kept the source model's" in caplog.text

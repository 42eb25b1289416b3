"""Streaming, sharding, dtypes and on-disk formats of the converter.

Reads are counted to show a conversion holds one layer of one array at a time, from exports
and from training checkpoints (both store stacked arrays one layer per chunk; a plain orbax save
holds several per chunk); shards, index, metadata and bfloat16 output are checked tensor by
tensor against the source arrays (exact)."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from jaxmoe.config import to_dict
from jaxmoe.convert import from_hf, to_hf
from jaxmoe.convert.orbax_io import ParamsReader, abstract_params, fill_state
from jaxmoe.convert.safetensors_io import (
    DTYPES,
    SafetensorsError,
    SafetensorsReader,
    ShardedWriter,
    TensorPlan,
)
from tests.convert.helpers import (
    jaxmoe_config,
    load_hf,
    random_params,
    read_tensors,
    save_random_hf,
    write_export,
)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer DeepSeek-V3-style jaxmoe model (nonzero router bias) as an export."""
    cfg = jaxmoe_config("deepseek_v3", num_layers=4)
    arrays = random_params(cfg, bias=True)
    root = tmp_path_factory.mktemp("deep")
    return cfg, arrays, write_export(cfg, arrays, root / "export")


def _count_reads(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = ParamsReader.read

    def read(self, name, start=None, stop=None):
        out = original(self, name, start, stop)
        sizes.append(out.nbytes)
        return out

    monkeypatch.setattr(ParamsReader, "read", read)
    return sizes


def test_to_hf_reads_one_layer_of_one_array_at_a_time(deep, tmp_path, monkeypatch):
    _, arrays, export = deep
    assert ParamsReader(export).layers_per_chunk("params.moe.units.block0.ffn.w_gate.value") == 1
    sizes = _count_reads(monkeypatch)
    to_hf(export, tmp_path / "hf", "deepseek_v3")
    per_layer = max(a[0].nbytes if ".units." in n else a.nbytes for n, a in arrays.items())
    whole_layer = sum(a[0].nbytes for n, a in arrays.items() if ".moe." in n)
    assert max(sizes) == per_layer < whole_layer
    assert sum(sizes) >= sum(a.nbytes for a in arrays.values())  # and everything was read


def test_training_checkpoint_converts_like_its_export(deep, tmp_path, monkeypatch):
    from jaxmoe.checkpoint.manager import make_manager, save

    cfg, arrays, export = deep
    _, params, rest = fill_state(cfg.model, arrays)
    state = {"step": np.int32(3), "params": params, "rest": rest}
    manager = make_manager(tmp_path / "run" / "checkpoints", async_save=False)
    save(manager, 3, state, to_dict(cfg))
    manager.wait_until_finished()
    manager.close()
    reader = ParamsReader(tmp_path / "run")
    name = "params.moe.units.block0.ffn.w_gate.value"
    # the checkpoint manager stores stacked arrays one layer per chunk, like exports
    assert reader.layers_per_chunk(name) == 1
    sizes = _count_reads(monkeypatch)
    to_hf(tmp_path / "run", tmp_path / "from_run", "deepseek_v3")
    per_layer = max(a[0].nbytes if ".units." in n else a.nbytes for n, a in arrays.items())
    assert max(sizes) == per_layer  # one layer of one array at a time
    to_hf(export, tmp_path / "from_export", "deepseek_v3")
    assert read_tensors(tmp_path / "from_run") == read_tensors(tmp_path / "from_export")
    # Saved with plain orbax, a chunk holds several layers: each is sliced out of its chunk
    # (exporting every layer of a chunk as its first passed the tests above).
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    shutil.rmtree(step_dir / "state")
    ocp.PyTreeCheckpointer().save(step_dir / "state", state)
    assert ParamsReader(tmp_path / "run").layers_per_chunk(name) == cfg.model.num_layers - 1
    to_hf(tmp_path / "run", tmp_path / "from_plain", "deepseek_v3")
    assert read_tensors(tmp_path / "from_plain") == read_tensors(tmp_path / "from_export")


def test_sharded_bfloat16_export(deep, tmp_path):
    cfg, arrays, export = deep
    to_hf(export, tmp_path / "hf", "deepseek_v3", dtype="bfloat16", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    for f in files:
        with open(tmp_path / "hf" / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            assert json.loads(fh.read(n))["__metadata__"] == {"format": "pt"}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == cfg.model.rope_theta
    assert config["num_local_experts"] == config["n_routed_experts"] == 8
    assert config["norm_topk_prob"] is True and config["torch_dtype"] == "bfloat16"
    _, info = load_hf(tmp_path / "hf")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    tensors = read_tensors(tmp_path / "hf")
    want = arrays["params.moe.units.block0.ffn.w_gate.value"][1, 5].T  # layer 2, expert 5
    dtype, shape, raw = tensors["model.layers.2.mlp.experts.5.gate_proj.weight"]
    assert (dtype, shape) == ("torch.bfloat16", want.shape)
    assert raw == want.astype(ml_dtypes.bfloat16).tobytes()  # round-to-nearest-even, exact
    bias = arrays["rest.moe.units.block0.ffn.router.bias.value"][0]
    dtype, _, raw = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert dtype == "torch.float32" and raw == bias.tobytes()  # kept in float32


def test_bfloat16_hf_model_round_trips_byte_identical(tmp_path):
    hf_dir = save_random_hf("deepseek_v3", tmp_path / "hf", seed=3, dtype=torch.bfloat16)
    from_hf(hf_dir, tmp_path / "jaxmoe")
    to_hf(tmp_path / "jaxmoe", tmp_path / "again", "deepseek_v3", dtype="bfloat16")
    assert read_tensors(tmp_path / "again") == read_tensors(hf_dir)


def test_from_hf_output_restores_with_orbax(tmp_path):
    hf_dir = save_random_hf("qwen3_moe", tmp_path / "hf", seed=4)
    ckpt = from_hf(hf_dir, tmp_path / "jaxmoe").out
    reader = ParamsReader(ckpt)
    _, abstract = abstract_params(reader.config.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for item in ("params", "rest"):
        names = {n.split(".", 1)[1]: leaf for n, leaf in abstract.items() if n.startswith(item)}
        tree: dict = {}
        for name, leaf in names.items():
            node = tree
            *parents, last = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        restored = ocp.PyTreeCheckpointer().restore(
            ckpt / item, args=ocp.args.PyTreeRestore(
                item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree)))
        for name in names:
            node = restored
            for p in name.split("."):
                node = node[p]
            np.testing.assert_array_equal(np.asarray(node), reader.read(f"{item}.{name}"))


def test_safetensors_writer_round_trip_and_order(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
               "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
               "c": rng.integers(0, 9, (2, 2)).astype(np.int64), "d": np.zeros((0, 4), np.float32)}
    plan = [TensorPlan(n, a.dtype, a.shape) for n, a in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=64)
    with pytest.raises(SafetensorsError, match="expected a \\(3, 5\\) next"):
        writer.write("b", tensors["b"])
    for name, value in tensors.items():
        writer.write(name, value)
    writer.close()
    reader = SafetensorsReader(tmp_path)
    # 60 B | 14 + 32 + 0 B: a shard closes before a tensor that would pass 64 bytes
    assert sorted(reader.metadata) == [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)]
    for name, value in tensors.items():
        assert reader.get(name).dtype == value.dtype
        np.testing.assert_array_equal(reader.get(name), value)
    from safetensors.numpy import load_file

    loaded = load_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    np.testing.assert_array_equal(loaded["a"], tensors["a"])


# safetensors' dtype labels and the numpy dtypes they stand for, written out by hand
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_safetensors_reader_reads_every_dtype_of_the_reference_writer(name, tmp_path):
    """Reference: safetensors' own writer (`safetensors.numpy.save_file`) labels each numpy
    dtype; the reader gives back the same dtype and the same bytes (random bit patterns, NaNs
    included, compared bitwise). Every dtype the module maps is covered."""
    from safetensors.numpy import save_file

    assert set(DTYPES) == set(SAFETENSORS_DTYPES)
    dtype = np.dtype(SAFETENSORS_DTYPES[name])
    rng = np.random.default_rng(1)
    if dtype == np.bool_:
        x = rng.integers(0, 2, (3, 5)).astype(np.bool_)
    else:
        x = rng.integers(0, 256, 15 * dtype.itemsize, np.uint8).view(dtype).reshape(3, 5)
    save_file({"x": x}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["x"]["dtype"] == name  # the writer's own label
    got = SafetensorsReader(tmp_path).get("x")
    assert got.dtype == dtype and got.shape == x.shape
    assert got.tobytes() == x.tobytes()


def test_safetensors_writer_aligns_the_data_start_to_8_bytes(tmp_path):
    """Reference: the safetensors format spec (the header is padded with spaces so the data
    starts 8-byte aligned: (8 + header length) % 8 == 0); safetensors' reader loads the files.
    One tensor per shard, names of 1 to 8 characters: the unpadded headers take every length
    mod 8, not only 0 and 4, where a wrong padding formula happens to align too."""
    from safetensors.numpy import load_file

    tensors = {"abcdefgh"[:k]: np.full((1,), k, np.float32) for k in range(1, 9)}
    writer = ShardedWriter(tmp_path, [TensorPlan(n, a.dtype, a.shape) for n, a in
                                      tensors.items()], max_shard_bytes=4)
    for name, value in tensors.items():
        writer.write(name, value)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(tensors)
    unpadded = set()
    for path in files:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0, (path.name, n)
        unpadded.add(len(raw[8:8 + n].rstrip(b" ")) % 8)
        (name, value), = load_file(str(path)).items()
        np.testing.assert_array_equal(value, tensors[name])
    assert unpadded == set(range(8))


def test_a_tensor_that_exactly_fills_the_shard_limit_stays_in_the_shard(tmp_path):
    """Reference: byte sizes by hand, under the writer's rule (`plan_shards`): a new shard
    starts before a tensor only when the shard already holds some and its tensors' bytes
    (headers not counted) plus this one's would exceed max_shard_bytes; reaching it exactly
    is allowed. a (8 B) + b (24 B) = 32 = the limit: one shard; c (4 B) would make 36."""
    tensors = {"a": np.arange(2, dtype=np.float32), "b": np.arange(6, dtype=np.float32),
               "c": np.ones((1,), np.float32)}
    writer = ShardedWriter(tmp_path, [TensorPlan(n, a.dtype, a.shape) for n, a in
                                      tensors.items()], max_shard_bytes=32)
    for name, value in tensors.items():
        writer.write(name, value)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert index["weight_map"] == {"a": first, "b": first, "c": second}
    assert index["metadata"]["total_size"] == 36
    reader = SafetensorsReader(tmp_path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.get(name), value)


def test_safetensors_writer_reports_disk_errors(tmp_path):
    a = np.ones((4,), np.float32)
    writer = ShardedWriter(tmp_path / "missing_dir", [TensorPlan("a", a.dtype, a.shape)], 10**6)
    writer.write("a", a)
    with pytest.raises(SafetensorsError, match="writing .*missing_dir: .*No such file"):
        writer.close()


def test_safetensors_writer_reports_a_failed_final_fsync(tmp_path, monkeypatch):
    """Closing the last shard fails after the end mark was taken: an error, not a hang."""
    import threading

    from jaxmoe.convert import safetensors_io

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "fsync", fsync)
    a = np.ones((4,), np.float32)
    writer = ShardedWriter(tmp_path, [TensorPlan("a", a.dtype, a.shape)], 10**6)
    writer.write("a", a)
    outcome = []

    def close():
        try:
            writer.close()
        except SafetensorsError as e:
            outcome.append(str(e))

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    assert not closer.is_alive(), "close() hung after a failed fsync"
    assert outcome and "No space left on device" in outcome[0]


@pytest.mark.parametrize("shape", [(1, 1), (63, 5), (130, 257), (0, 3)])
def test_strip_transpose_equals_numpy(shape):
    from jaxmoe.convert.safetensors_io import contiguous

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        got = contiguous(x.T, dtype)
        assert got.flags.c_contiguous and got.dtype == dtype
        np.testing.assert_array_equal(got, x.T.astype(dtype))

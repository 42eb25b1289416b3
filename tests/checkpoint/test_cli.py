"""`jaxmoe checkpoint inspect` and `jaxmoe checkpoint export-params`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import cli
from jaxmoe import config as config_lib
from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.damage import flat_names
from jaxmoe.checkpoint.inspect import read_metadata, restore_params, spreader
from jaxmoe.train.loop import build_trainer
from tests.checkpoint._helpers import host, perturbed, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory with checkpoints 2 and 3, host copy of step 3's params)."""
    trainer = build_trainer(tiny_config("mesh.data=1"), jax.devices()[:1])
    with trainer.context():
        state = perturbed(trainer.init())
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    manager = ckpt.make_manager(ckpt.checkpoint_dir(run_dir))
    config = config_lib.to_dict(trainer.cfg)
    ckpt.save(manager, 2, state, config, {"batches": 2})
    ckpt.save(manager, 3, state, config, {"batches": 3})
    manager.close()
    return run_dir, flat_names(host(state.params)), flat_names(host(state.rest))


def test_inspect(run, capsys):
    run_dir, params, _ = run
    assert cli.main(["checkpoint", "inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint {run_dir / 'checkpoints' / '3'}\nstep 3; ")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("params.")}
    assert rows.keys() == {f"params.{n}" for n in params}
    for name, value in params.items():
        row = rows[f"params.{name}"]
        assert str(value.shape) in row and str(value.dtype) in row
        assert row.endswith(f"{value.nbytes:,}")
    assert "opt_state.1.0.mu.lm_head.value" in out and "rng" in out
    total = sum(v.nbytes for v in params.values())
    assert f"params {total / 1e6:.1f} MB" in out
    assert "data iterator: 1 process file(s) (process_0-of-1.json); batches consumed per " \
           "process: [3]" in out
    assert "config:" in out and "  embed_dim: 128" in out


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_export_params(run, tmp_path, capsys, dtype):
    run_dir, params, rest = run
    out = tmp_path / "export"
    argv = ["checkpoint", "export-params", str(run_dir / "checkpoints" / "2"), str(out)]
    assert cli.main(argv + (["--dtype", dtype] if dtype else [])) == 0
    assert f"to {out}" in capsys.readouterr().out
    exported = flat_names(restore_params(out))
    assert exported.keys() == params.keys()
    for name, value in params.items():
        want = value if dtype is None else np.asarray(jnp.asarray(value).astype(dtype))
        got = np.asarray(exported[name])
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # a cast is exact: no tolerance
    # the router selection biases travel too, never cast (DeepSeek routing depends on them)
    exported_rest = flat_names(restore_params(out, collection="rest"))
    assert exported_rest.keys() == rest.keys() and rest
    for name, value in rest.items():
        assert np.asarray(exported_rest[name]).dtype == value.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(exported_rest[name]), value, err_msg=name)
    # arrays were read and written in shards over the 8 devices (the others whole on one
    # device each, in turn), none whole on one device that all arrays go to
    stored = flat_names(read_metadata(out))
    spread = [n for n, v in stored.items() if any(d % 8 == 0 for d in v.shape)]
    specs = {n: getattr(stored[n].sharding, "partition_spec", ()) for n in spread}
    assert spread and all("devices" in spec for spec in specs.values()), specs
    assert cli.main(["checkpoint", "inspect", str(out), "--no-config"]) == 0
    listing = capsys.readouterr().out
    source = run_dir / "checkpoints" / "2"
    assert f"(params-only export of {source.absolute()})" in listing and "step 2;" in listing
    # every array is listed, the router biases under rest/ too (they were left out)
    rows = {line.split()[0] for line in listing.splitlines()
            if line.startswith(("params.", "rest."))}
    assert rows == {f"params.{n}" for n in params} | {f"rest.{n}" for n in rest}
    assert f"; {len(params) + len(rest)} arrays, " in listing
    # the output exists: refused as bad input (exit 2, as `jaxmoe convert` does), one line
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"jaxmoe: {out.resolve()}: exists and is not empty; "
                                       "choose a new output directory\n")
    if dtype is None:  # an existing empty folder is taken, as `jaxmoe convert` takes one
        empty = tmp_path / "empty"
        empty.mkdir()
        assert cli.main(argv[:3] + [str(empty)]) == 0
        assert flat_names(restore_params(empty)).keys() == params.keys()


def test_spreader_splits_the_largest_divisible_dimension_or_takes_devices_in_turn():
    devices = jax.devices()
    assert len(devices) == 8
    P = jax.sharding.PartitionSpec
    spread = spreader(devices)
    assert spread((16, 3)).spec == P("devices", None)
    assert spread((8, 64)).spec == P(None, "devices")
    whole = [spread((3, 5)), spread(()), spread((7,))]  # nothing divides: one device each
    assert [s.device_set for s in whole] == [{devices[0]}, {devices[1]}, {devices[2]}]
    assert spreader(devices[:1])((64,)).device_set == {devices[0]}
    x = jax.device_put(np.arange(16 * 3.0).reshape(16, 3), spread((16, 3)))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}


def test_export_params_refuses_several_processes(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    out = tmp_path / "export"
    assert cli.main(["checkpoint", "export-params", str(run[0]), str(out)]) == 1
    assert "export-params runs in one process; this is one of 2" in capsys.readouterr().err
    assert not out.exists()


def test_export_params_on_a_full_disk_says_one_line_and_leaves_nothing(run, tmp_path, capsys,
                                                                      file_size_limit):
    out = tmp_path / "export"
    with file_size_limit(16 * 1024):
        rc = cli.main(["checkpoint", "export-params", str(run[0]), str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err, err
    assert err.startswith(f"jaxmoe: writing {out}: ") and "File too large" in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_params_refuses_when_the_disk_lacks_space(run, tmp_path, capsys, monkeypatch):
    import shutil as shutil_lib

    from jaxmoe import staging

    usage = shutil_lib.disk_usage(tmp_path)
    monkeypatch.setattr(staging.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))  # 1 kB free
    out = tmp_path / "export"
    assert cli.main(["checkpoint", "export-params", str(run[0]), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxmoe: export-params: [Errno 28] {out}: needs 0.00 GB") and \
        err.endswith("its file system has 0.00 GB free") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_closed_loop_callback_errors_are_dropped_and_others_kept(monkeypatch):
    import sys
    import types

    from jaxmoe.checkpoint.damage import drop_closed_loop_callbacks

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    drop_closed_loop_callbacks()
    drop_closed_loop_callbacks()  # idempotent: one wrapper
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]

"""`jaxmoe compile`: the train step compiled for TPU topologies on this CPU host.

Needs `libtpu` (a plain PyPI wheel: `pip install libtpu`, or `pip install -e .[tpu]`).
"""

from __future__ import annotations

import re

import pytest

from jaxmoe.cli import main
from sharding import aot


@pytest.mark.parametrize("name, chips, dims", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-128", 64, (4, 4, 4)), ("v5p-256", 128, (4, 4, 8)),
    ("v5p:8x8x16", 1024, (8, 8, 16)), ("v6e-256", 256, (16, 16)), ("v5e-8", 8, (2, 4)),
    ("v4-16", 8, (2, 2, 2)), ("tpu7x:4x4x4", 64, (4, 4, 4)),
])
def test_topology_names(name, chips, dims):
    t = aot.target_from_name(name)
    assert (t.chips, t.dims) == (chips, dims)


@pytest.mark.parametrize("name", ["v5p", "v5p-7", "x9-8", "v5p-96"])
def test_bad_topology_names(name):
    with pytest.raises(aot.TargetError):
        aot.target_from_name(name)


def mfu(out: str) -> float:
    m = re.search(r"^estimated MFU: ([0-9.]+)%$", out, re.MULTILINE)
    assert m, out
    return float(m.group(1))


def test_tiny_on_small_topology_with_expert_parallelism(capsys):
    rc = main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "v5p-8",
               "mesh.data=2", "mesh.expert=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "v5p:2x2x1; 4 chips" in out and "source: compiled" in out
    assert re.search(r"ragged-all-to-all +\d+ ops", out), out  # the TPU exchange
    assert re.search(r"of 95\.00 GiB HBM \(0\.\d%\)", out), out
    assert 0 < mfu(out) < 100
    # Executed matmuls (megablox kernels included) cover at least the model's FLOPs.
    executed = float(re.search(r"loop trip counts applied\): ([0-9.e+]+)", out).group(1))
    per_device = float(re.search(r"\(([0-9.e+]+) per device\)", out).group(1))
    assert per_device <= executed < 4 * per_device


def test_gpu_target_falls_back_to_the_analytic_estimate(capsys):
    rc = main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8"])
    out = capsys.readouterr().out
    assert rc == 0 and "source: analytic" in out and 0 < mfu(out) < 100, out


def test_plan_that_does_not_fit_exits_3(capsys):
    rc = main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8",
               "model.embed_dim=16384", "model.num_layers=64", "model.num_heads=128",
               "model.num_kv_heads=128", "model.head_dim=128"])
    err = capsys.readouterr().err
    assert rc == 3 and "does not fit" in err and "\n" not in err.strip(), err


@pytest.mark.slow
def test_mixtral_on_v5p_128(capsys):
    rc = main(["compile", "--config", "configs/mixtral_8x7b.yaml", "--topology", "v5p-128",
               "mesh.data=1", "mesh.fsdp=64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    frac = float(re.search(r"GiB HBM \(([0-9.]+)%\)", out).group(1))
    assert 10 < frac < 100
    assert 10 < mfu(out) < 100

"""`jaxmoe compile`'s expert-parallel degree follows the logical-axis rules (`mesh.rules`), and
the expert receive buffers' fill at balanced load follows `mesh.expert_buffer_factor`."""

import pytest

import sharding
from jaxmoe.compile_cmd import expert_buffer_fill, expert_parallel_degree

SHAPE = {"data": 2, "fsdp": 3, "expert": 4, "tensor": 5}


@pytest.mark.parametrize("overrides, degree", [
    (None, 4),                                   # experts over the `expert` mesh axis
    ({"expert": "tensor"}, 5),                   # moved to another mesh axis
    ({"expert": ["fsdp", "expert"]}, 12),        # over two mesh axes
    ({"expert": None}, 1),                       # replicated: no expert parallelism
])
def test_expert_parallel_degree(overrides, degree):
    assert expert_parallel_degree(SHAPE, sharding.make_rules(overrides)) == degree


@pytest.mark.parametrize("factor, n_ep, fill", [
    (0.0, 4, 0.25),   # 0: worst-case buffers, n_ep x the balanced load
    (2.0, 4, 0.5),
    (1.0, 4, 1.0),
    (0.25, 2, 1.0),   # a buffer smaller than the balanced load is full (copies dropped)
    (0.5, 8, 1.0),
    (0.0, 1, 1.0),    # no expert parallelism: no receive buffer
    (3.0, 1, 1.0),
])
def test_expert_buffer_fill(factor, n_ep, fill):
    assert expert_buffer_fill(factor, n_ep) == pytest.approx(fill)
    # Capacity dispatch sends every slot through the expert kernel, empty or not.
    assert expert_buffer_fill(factor, n_ep, "capacity") == 1.0


def test_float16_compute_is_refused_on_every_target(capsys):
    """check_trainable ran only inside build_trainer: TPU plans refused float16, the
    analytic (GPU) path printed an estimate."""
    from jaxmoe.cli import main

    assert main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8",
                 "model.compute_dtype=float16"]) == 2
    assert "model.compute_dtype='float16': expected float32 or bfloat16 for training" in \
        capsys.readouterr().err


def test_json_report_says_whether_the_plan_fits(tmp_path, capsys):
    """`fits` is in every --json-out file (it was only in the compiler-out-of-HBM one, so a
    sweep reading it failed on every plan that fits). Reference: the printed report."""
    import json

    from jaxmoe.cli import main

    out = tmp_path / "plan.json"
    assert main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8",
                 "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["fits"] is True and report["target"] == "h100-8"
    assert f"estimated MFU: {100 * report['mfu']:.1f}%" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--json-out", "--hlo-out"])
def test_unwritable_report_paths_are_refused_before_compiling(tmp_path, capsys, flag):
    """A folder, or a file in a folder that does not exist: one line, exit 2, before any
    work (the report used to be printed, then an IsADirectoryError traceback; a missing
    folder was created)."""
    from jaxmoe.cli import main

    base = ["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8"]
    assert main([*base, flag, str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"jaxmoe compile: {flag} {tmp_path}: is a directory; expected a "
                            "file path\n")
    assert captured.out == ""  # nothing was planned
    missing = tmp_path / "none" / "r.json"
    assert main([*base, flag, str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"jaxmoe compile: {flag} {missing}: folder {tmp_path / 'none'} does not exist; "
        "expected an existing folder\n")
    assert not (tmp_path / "none").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main([*base, flag, str(a_file / "r.json")]) == 2
    assert capsys.readouterr().err == (f"jaxmoe compile: {flag} {a_file / 'r.json'}: {a_file} "
                                       "is a file; expected a path in a folder\n")
    same = str(tmp_path / "r.txt")
    assert main([*base, "--hlo-out", same, "--json-out", same]) == 2
    assert capsys.readouterr().err == (f"jaxmoe compile: --hlo-out and --json-out are both "
                                       f"{same}; expected two files\n")


def test_an_override_that_leaves_weights_unsplit_is_refused_by_the_estimate(capsys):
    """The analytic path (GPU targets, TPU without libtpu) estimated such a plan as if it were
    meant (Mixtral: 521.93 GiB of arguments per device); it is refused as build_trainer does."""
    from jaxmoe.cli import main

    assert main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", "h100-8",
                 "mesh.data=1", "mesh.fsdp=8", "mesh.rules={embed: [fsdp, tensor]}"]) == 2
    err = capsys.readouterr().err
    assert "mesh.rules.embed=['fsdp', 'tensor']: leaves the embed dimension of " in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "h100-4"])
def test_a_rule_override_that_splits_a_weight_unevenly_is_refused(capsys, topology):
    """`layers: [data]` over 4 devices on tiny_moe's 2 layers: the TPU path died in jax with
    an IndivisibleError traceback, and the analytic one (h100) printed a plan for the
    impossible layout (it rounded each shard up). Reference: the weight's shape by hand."""
    from jaxmoe.cli import main

    assert main(["compile", "--config", "configs/tiny_moe.yaml", "--topology", topology,
                 "mesh.data=4", "mesh.rules={layers: [data]}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "jaxmoe: mesh error: parameter moe.units.block0.attn.k of shape (2, 128, 2, 32): "
        "dimension 0 (logical axis 'layers', size 2) is not divisible by mesh.data=4, the mesh "
        "axes sharding it; expected mesh axes on 'layers' (mesh.rules) whose sizes divide 2\n")
    assert captured.out == ""

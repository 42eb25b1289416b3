"""Argument and directory handling of the benchmark tools (tools/bench_*.py), without timing.

Nothing here runs a measurement: each test stops a tool at its argument checks, or replaces
the measuring function, so a missing check fails fast instead of starting a benchmark.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time

import pytest

TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")


@functools.cache
def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Reached(Exception):
    """Raised by a stand-in for the first expensive call after argument checking."""


def _reached(*args, **kwargs):
    raise _Reached


def _rejects(main, argv: list[str], capsys, expected: str, tool: str) -> None:
    """`main(argv)` exits 2 with one `<tool>.py: error: ...` line naming `expected`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert lines == [lines[0]] and lines[0].startswith(f"{tool}.py: error: "), err
    assert expected in lines[0], err


def _user_dir(tmp_path):
    base = tmp_path / "mine"
    base.mkdir()
    (base / "precious.txt").write_text("user data")
    (base / "sub").mkdir()
    (base / "sub" / "more.txt").write_text("more")
    return base


def _untouched(base) -> None:
    assert sorted(os.listdir(base)) == ["precious.txt", "sub"]
    assert (base / "precious.txt").read_text() == "user data"
    assert (base / "sub" / "more.txt").read_text() == "more"


@pytest.mark.parametrize("name", ["bench_convert", "bench_checkpoint"])
def test_workdir_is_fresh_and_only_it_is_removed(tmp_path, name) -> None:
    tool = _tool(name)
    base = _user_dir(tmp_path)
    work = tool.make_workdir(str(base))
    assert work.parent == base and os.listdir(work) == []
    (work / "export").mkdir()
    (work / "export" / "x.bin").write_bytes(b"0" * 10)
    tool.remove_workdir(work)
    _untouched(base)
    new = tool.make_workdir(str(tmp_path / "new" / "dir"))  # a missing --dir is created
    assert new.parent == tmp_path / "new" / "dir"


def test_bench_convert_failure_removes_only_its_workdir(tmp_path, monkeypatch, capsys) -> None:
    tool = _tool("bench_convert")
    base = _user_dir(tmp_path)
    monkeypatch.setattr(tool, "build", _reached)
    with pytest.raises(_Reached):
        tool.main(["--layers", "1", "--dir", str(base)])
    _untouched(base)


def test_bench_checkpoint_failure_removes_only_its_workdir(tmp_path, monkeypatch) -> None:
    tool = _tool("bench_checkpoint")
    base = _user_dir(tmp_path)
    monkeypatch.setattr(tool, "reexec_with_hugepages", lambda: None)
    seen = []

    def benchmark(args, root):
        seen.append(root)
        (root / "1000").mkdir()
        raise _Reached

    monkeypatch.setattr(tool, "benchmark", benchmark)
    with pytest.raises(_Reached):
        tool.main(["--dir", str(base)])
    assert seen and seen[0].parent == base
    _untouched(base)


def _rejects_next_to_a_user_file(tool, name, argv, expected, tmp_path, capsys) -> None:
    """`{file}` in argv/expected stands for a user's file, which must survive the refusal."""
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    argv = [a.format(file=blocker) for a in argv]
    _rejects(tool.main, argv, capsys, expected.format(file=blocker), name)
    assert blocker.read_text() == "user data"


@pytest.mark.parametrize("argv, expected", [
    (["--layers", "0"], "--layers 0: expected"),
    (["--layers", "-2"], "--layers -2: expected"),
    (["--dir", "{file}"], "--dir '{file}'"),
])
def test_bench_convert_bad_arguments(tmp_path, monkeypatch, capsys, argv, expected) -> None:
    tool = _tool("bench_convert")
    monkeypatch.setattr(tool, "build", _reached)
    _rejects_next_to_a_user_file(tool, "bench_convert", argv, expected, tmp_path, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--layers", "0"], "--layers 0: expected"),
    (["--steps", "0"], "--steps 0: expected"),
    (["--repeats", "0"], "--repeats 0: expected"),
    (["--every", "0"], "--every 0: expected"),
    (["--width", "100"], "--width 100: expected"),
    (["--width", "1000"], "--width 1000: expected a multiple of 128"),
    (["--vocab", "3"], "--vocab 3: expected"),
    (["--batch", "0"], "--batch 0: expected"),
    (["--seq", "1"], "--seq 1: expected"),
    (["--dir", "{file}"], "--dir '{file}'"),
])
def test_bench_checkpoint_bad_arguments(tmp_path, monkeypatch, capsys, argv, expected) -> None:
    tool = _tool("bench_checkpoint")
    monkeypatch.setattr(tool, "reexec_with_hugepages", _reached)  # never restart pytest
    monkeypatch.setattr(tool, "benchmark", _reached)
    _rejects_next_to_a_user_file(tool, "bench_checkpoint", argv, expected, tmp_path, capsys)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"]])
def test_bench_train_rejects_steps(monkeypatch, capsys, argv) -> None:
    tool = _tool("bench_train")
    monkeypatch.setattr(tool, "reexec_with_hugepages", _reached)
    monkeypatch.setattr(tool, "matmul_flops_per_s", _reached)
    _rejects(tool.main, argv, capsys, f"--steps {argv[1]}: expected", "bench_train")


@pytest.mark.parametrize("flags, expected", [
    # An AMX host (the premise) and the 2026-11-30 VM (no bf16 units), cut to length.
    ("fpu avx512f amx_bf16 avx512_bf16 amx_tile avx512_fp16 amx_int8", "amx_bf16 amx_int8 "
     "amx_tile avx512_bf16"),
    ("fpu avx512f avx512_vnni avx512_bitalg", "none"),
])
def test_bench_train_names_the_cpu_bf16_features(flags, expected) -> None:
    """Reference: the flags written out above, as /proc/cpuinfo lists them per processor."""
    cpuinfo = f"processor\t: 0\nmodel name\t: Xeon\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert _tool("bench_train").cpu_bf16_features(cpuinfo) == expected
    assert _tool("bench_train").cpu_bf16_features("processor\t: 0\n") == "unknown"


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"]])
def test_bench_matmul_rejects_steps(monkeypatch, capsys, argv) -> None:
    tool = _tool("bench_matmul")
    monkeypatch.setattr(tool, "seconds", _reached)
    monkeypatch.setattr(tool, "jnp", None)  # anything past the checks fails at once
    _rejects(tool.main, argv, capsys, f"--steps {argv[1]}: expected", "bench_matmul")


@pytest.mark.parametrize("argv, expected", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--top", "-1"], "--top -1: expected an integer >= 1"),
    (["model.num_layers=0"], "model.num_layers=0: expected"),
])
def test_profile_train_bad_arguments(monkeypatch, capsys, argv, expected) -> None:
    tool = _tool("profile_train")
    monkeypatch.setattr(tool, "reexec_with_hugepages", _reached)
    _rejects(tool.main, argv, capsys, expected, "profile_train")


def test_profile_train_feeds_a_batch_of_the_overridden_sizes(monkeypatch) -> None:
    """train.batch_size, data.seq_len and model.vocab_size overrides were ignored by the
    batch (always 4 x 256, ids up to 1023). Reference: the override values."""
    import jaxmoe.train.loop

    tool = _tool("profile_train")
    fed = []

    class Trainer:
        def context(self):
            import contextlib
            return contextlib.nullcontext()

        def init(self):
            return None

        def put_batch(self, batch):
            fed.append(batch)
            raise _Reached

    monkeypatch.setattr(tool, "reexec_with_hugepages", lambda: None)
    monkeypatch.setattr(jaxmoe.train.loop, "build_trainer", lambda cfg, devices: Trainer())
    with pytest.raises(_Reached):
        tool.main(["train.batch_size=2", "data.seq_len=64", "model.vocab_size=300"])
    (batch,) = fed
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 64) for k in batch}
    assert batch["inputs"].max() < 300 and batch["targets"].max() < 300


def test_profile_train_thread_activity_by_hand() -> None:
    """Thread A runs x [0, 10) then y [10, 20); B runs z [5, 15); C a loop [0, 10) with a
    dot [2, 4) inside it (innermost wins). Counts worked out by hand."""
    activity = _tool("profile_train").thread_activity
    busy, per_op = activity({"A": [(0, 10, "x"), (10, 20, "y")], "B": [(5, 15, "z")]})
    assert busy == {1: 10, 2: 10}
    assert per_op == {"x": [10, 5], "y": [10, 5], "z": [10, 0]}
    busy, per_op = activity({"C": [(0, 10, "while"), (2, 4, "dot")], "D": [(3, 6, "add")]})
    assert busy == {1: 7, 2: 3}  # [0, 3) and [6, 10) one thread; [3, 6) both
    assert per_op == {"while": [8, 6], "dot": [2, 1], "add": [3, 0]}
    assert activity({}) == ({}, {})
    # Two events starting together: the longer one is the outer, whatever the order given.
    for events in ([(0, 2, "dot"), (0, 10, "while")], [(0, 10, "while"), (0, 2, "dot")]):
        assert activity({"E": events})[1] == {"dot": [2, 2], "while": [8, 8]}


def _fake_measure(cfg, batch_size, batches):
    return {"tokens_per_s": 1000.0 * (cfg.num_workers + 1), "slots_per_s": 2000.0,
            "efficiency": 0.5, "seconds": 1.0}


def test_bench_input_workers_list_keeps_overrides(monkeypatch, capsys) -> None:
    tool = _tool("bench_input")
    seen = []
    monkeypatch.setattr(tool, "measure",
                        lambda cfg, b, n: seen.append(cfg) or _fake_measure(cfg, b, n))
    assert tool.main(["--batches", "1", "--workers", "0,2", "seq_len=064",  # YAML 1.2: 64
                      "num_documents=50"]) == 0
    out = capsys.readouterr().out
    assert "seq_len=64" in out and "(0w)" in out and "(2w)" in out
    assert [(c.packing, c.num_workers) for c in seen] == [(True, 0), (True, 2), (False, 0)]
    assert {(c.seq_len, c.num_documents) for c in seen} == {(64, 50)}


@pytest.mark.parametrize("argv, expected", [
    (["--batches", "0"], "--batches 0: expected"),
    (["--batch-size", "0"], "--batch-size 0: expected"),
    (["--workers", "0,x"], "'0,x': expected a comma-separated list"),
    (["--workers=-1"], "'-1': expected a comma-separated list"),
    (["--workers", ""], "'': expected a comma-separated list"),
    (["seq_len"], "override 'seq_len': expected key=value"),
    (["no_such_field=1"], "data.no_such_field: unknown key; expected one of"),
    (["seq_len=["], "data.seq_len='[': expected a YAML value"),
    (["seq_len=1"], "data.seq_len=1: expected"),
    (["seq_len=abc"], "data.seq_len='abc': expected an integer"),
    (["seq_len=1e3"], "data.seq_len=1000.0: expected an integer"),  # not the string '1e3'
])
def test_bench_input_bad_arguments(monkeypatch, capsys, argv, expected) -> None:
    tool = _tool("bench_input")
    monkeypatch.setattr(tool, "measure", _reached)
    _rejects(tool.main, argv, capsys, expected, "bench_input")


def test_bench_input_dataset_errors_are_one_line(tmp_path, capsys) -> None:
    tool = _tool("bench_input")
    missing = tmp_path / "none_*.jsonl"
    rc = tool.main(["--batches", "1", "--workers", "0", "source=jsonl", f"paths={missing}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_input.py: error: ")
    assert "none_*.jsonl" in err and "Traceback" not in err


def test_bench_checkpoint_slowdown_is_the_mean() -> None:
    """Reference: arithmetic. Two of four steps twice as slow cost 50% (their median says 0)."""
    tool = _tool("bench_checkpoint")
    assert tool.slowdown([1.0, 1.0, 2.0, 2.0], base=1.0) == pytest.approx(0.5)
    assert tool.slowdown([1.0, 1.0, 1.0, 1.0], base=1.0, blocking=0.4) == pytest.approx(0.1)
    # a writer thread that exited mid-save takes its CPU time out of the sum: not a number
    assert tool.cpu_seconds([1.0, 2.0]) == "1.50 s"
    assert tool.cpu_seconds([1.0, -0.5]).startswith("n/a")


@pytest.mark.parametrize("mode", ["buffered", "direct", "touch"])
def test_bench_checkpoint_external_writers_run_and_clean_up(tmp_path, mode) -> None:
    """Each external process finishes (3 MB; `direct` writes one whole 64 MB chunk and cuts
    it to size) and leaves no file."""
    tool = _tool("bench_checkpoint")
    steps = []

    def step() -> float:  # a training step stand-in; sleeps so the loop does not spin
        time.sleep(0.01)
        steps.append(1)
        return 0.01

    out = tool.external_writer_steps(step, mode, 3 << 20, tmp_path / "external")
    if isinstance(out, str):  # O_DIRECT refused by this file system: said, not raised
        assert mode == "direct" and "O_DIRECT" in out
    else:
        assert out == [0.01] * len(steps) and steps
    assert os.listdir(tmp_path / "external") == []


def test_a_tool_stopped_by_ctrl_c_says_one_line(capsys) -> None:
    """Every tool ends through tools/_run.py: Ctrl-C is one line and exit 130 (tracebacks
    before); the status main() returns is the exit status."""
    import glob

    run = _tool("_run").run

    def interrupted():
        raise KeyboardInterrupt

    for main, code in ((interrupted, 130), (lambda: 2, 2), (lambda: None, None)):
        with pytest.raises(SystemExit) as e:
            run(main)
        assert e.value.code == code
    assert capsys.readouterr().err.endswith(": interrupted\n")
    tools = glob.glob(os.path.join(TOOLS, "*.py"))
    assert [t for t in tools if "__main__" in open(t).read()
            and "    run(main)\n" not in open(t).read()] == []


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(TOOLS) if p.endswith(".py")))
def test_main_blocks_rebind_no_module_name(path) -> None:
    """`if __name__ == "__main__": from _run import run` replaced bench_convert's own
    `run(task)`, so the script failed on every run ('str' object is not callable) while
    these tests, which call `main()` directly, passed. Reference: the module's top-level
    names, read from the source; the main block may bind none of them."""
    import ast

    tree = ast.parse(open(os.path.join(TOOLS, path)).read())
    mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    top |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Name)}
    bound = {a.asname or a.name for m in mains for n in ast.walk(m)
             if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    bound |= {t.id for m in mains for n in ast.walk(m) if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name)}
    assert not bound & top, f"{path}: the main block rebinds {sorted(bound & top)}"

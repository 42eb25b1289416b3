"""The README's main command end to end (fewer steps): the tiny MoE trains on the embedded
corpus, the progress bar shows loss and tokens/s, metrics and a checkpoint are written, a
sample is printed, and the held-out loss falls well below the corpus's unigram entropy.

Bound: after 120 steps, held-out loss < 0.6 x unigram entropy (3.33 nats/token for the
default corpus; a model that only learned byte frequencies would sit at the entropy)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_readme_main_command_trains_and_learns(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "jaxmoe train --config configs/tiny_moe.yaml" in (ROOT / "Makefile").read_text()
    assert "make run" in readme
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxmoe.cli", "train", "--config", "configs/tiny_moe.yaml",
           "--run-dir", str(run_dir), "train.steps=120", "train.eval_every=60",
           "train.log_every=20"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"loss=\d+\.\d+", out) and "tok_s=" in out  # progress bar postfix
    assert "sample: '12+7=" in out  # the prompt; greedy_generate is tested in tests/inference

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "checkpoints" / "120").is_dir()
    assert any((run_dir / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if r["split"] == "train"]
    eval_losses = [r["loss"] for r in rows if r["split"] == "eval"]
    assert len(train_losses) == 6 and len(eval_losses) == 2
    # The progress bar's tokens/s: the logged interval's tokens over its time (checked
    # step by step in tests/train/test_loop.py), so its mean tokens a step is a packed
    # step's (>= 90% tokens); model TFLOP/s from the closed-form FLOPs per token (rtol 1e-6)
    from jaxmoe.config import load_config
    from jaxmoe.model.params import training_flops_per_token
    cfg = load_config(ROOT / "configs" / "tiny_moe.yaml")
    per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    timed = [r for r in rows if r["split"] == "train" and "tokens_per_s" in r]
    assert len(timed) == 6, rows
    for r in timed:
        assert 0.9 * cfg.train.batch_size * cfg.data.seq_len <= r["tokens"] <= (
            cfg.train.batch_size * cfg.data.seq_len)
        mean_tokens = r["tokens_per_s"] * r["step_time_s"]
        assert 0.9 * cfg.train.batch_size * cfg.data.seq_len <= mean_tokens <= (
            cfg.train.batch_size * cfg.data.seq_len * (1 + 1e-6))
        assert r["model_tflops_per_s"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12,
                                                        rel=1e-6)
    assert train_losses[-1] < train_losses[0] - 2.0
    entropy = summary["unigram_entropy"]
    assert entropy == pytest.approx(3.3269, abs=1e-4)  # as the README shows
    assert eval_losses[-1] < 0.6 * entropy, (eval_losses, entropy)


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """`train.steps=1` twice in one run directory (in-process, a cut-down tiny model): the
    second run, with a changed model setting, exits 0, says the checkpoint is at step 1 and
    there is nothing to train, and leaves every file of the run directory (metrics.jsonl,
    the checkpoint folders, the config) byte for byte as the first run left it: config.yaml
    still describes the run's checkpoints."""
    from jaxmoe.cli import main

    run_dir = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
            "--no-progress", "train.steps=1", "model.num_layers=1", "data.seq_len=32",
            "train.batch_size=8", "train.eval_batches=1", "train.sample_tokens=0",
            "train.tensorboard=false", "data.num_documents=100"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert (run_dir / "checkpoints" / "1").is_dir(), first

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(run_dir)): p.read_bytes()
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = files()
    assert "metrics.jsonl" in before and any(k.startswith("checkpoints/1/state/") for k in before)
    assert main(argv + ["model.rope_theta=500"]) == 0
    out = capsys.readouterr().out
    assert "model.rope_theta: 10000.0 -> 500" in out, out
    step_dir = run_dir.absolute() / "checkpoints" / "1"
    assert (f"checkpoint: {step_dir} is at step 1 >= train.steps=1; nothing to train (raise "
            "train.steps to continue: the learning-rate schedule is laid over train.steps, so "
            "the rate moves to where the longer schedule has it; or use a new --run-dir to "
            "start over)") in out.splitlines(), out
    after = files()
    assert sorted(after) == sorted(before)
    assert [k for k in before if after[k] != before[k]] == []


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command (`make test`), stops on the first
    failure, and `make test` runs pytest over the whole suite (no test paths or -k in it)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [ln.split("#")[0].strip() for ln in block.splitlines()] == ["make run", "make test"]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert ci[0] == "set -euo pipefail" and ci[-1] == "make test", ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    make = (ROOT / "Makefile").read_text().split("\ntest: install-dev\n", 1)[1].split("\n")[0]
    assert re.fullmatch(r"\tJAX_PLATFORMS=cpu \$\(BIN\)/python -m pytest -q [-\w ]*\$\(ARGS\)",
                        make), make
    assert " -k" not in make and "tests/" not in make

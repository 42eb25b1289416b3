"""Shared set-up for the checkpoint tests: tiny configs, training subprocesses, host copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmoe import config as config_lib

ROOT = Path(__file__).resolve().parents[2]

# The tiny model, cut down further so that a training subprocess is mostly start-up and
# compilation (~10 s). Router-bias updates are on, so the biases in TrainState.rest change
# every step and an exact resume must restore them too.
TINY = ["model.num_layers=1", "data.seq_len=64", "train.batch_size=4",
        "train.optimizer.warmup_steps=2", "train.log_every=1", "train.eval_every=1000",
        "train.eval_batches=1", "train.sample_tokens=0", "train.tensorboard=false",
        "model.bias_update_rate=0.01"]


def with_tiny(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """TINY with `overrides` replacing the keys they name."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in TINY if o.split("=", 1)[0] not in keys] + list(overrides)


def tiny_config(*overrides: str) -> config_lib.Config:
    return config_lib.load_config(ROOT / "configs/tiny_moe.yaml", with_tiny(overrides))


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """CPU-only environment with `devices` simulated devices (the session's conftest sets 8
    for in-process tests; training subprocesses use 1 to compile faster)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxmoe.cli", "train", "--config",
            str(ROOT / "configs/tiny_moe.yaml"), "--run-dir", str(run_dir), "--no-progress",
            *with_tiny(overrides)]


def start_training(run_dir: Path, *overrides: str, log: Path | None = None) -> subprocess.Popen:
    with open(log or run_dir.with_suffix(".log"), "w") as out:  # the child keeps its copy
        return subprocess.Popen(train_command(run_dir, *overrides), cwd=ROOT,
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)


def run_training(run_dir: Path, *overrides: str, timeout: float = 240) -> str:
    """Runs a training subprocess to completion; returns its output (stdout + stderr)."""
    proc = subprocess.run(train_command(run_dir, *overrides), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"training failed (rc {proc.returncode}):\n{proc.stdout}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen, timeout: float,
             what: str) -> Any:
    """Polls `predicate` every 10 ms until it is truthy; fails if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited (rc {proc.returncode}) "
                                 f"before {what}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric_rows(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl; a step logged twice (by a killed run and
    again by its resumption) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line),
               default=0)


def host(tree: Any) -> Any:
    """A NumPy copy of a pytree of arrays (typed PRNG keys as their key data)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x))
    return jax.tree.map(one, tree)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Bitwise equality of two pytrees of arrays (names the first differing leaf)."""
    a = jax.tree_util.tree_flatten_with_path(host(actual))[0]
    b = jax.tree_util.tree_flatten_with_path(host(expected))[0]
    assert [p for p, _ in a] == [p for p, _ in b], "tree structures differ"
    for (path, x), (_, y) in zip(a, b):
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name}: {x.dtype}{x.shape} vs " \
                                                           f"{y.dtype}{y.shape}"
        np.testing.assert_array_equal(x, y, err_msg=name)


def perturbed(state, seed: int = 0):
    """`state` with every array replaced by seeded random values of its shape, dtype and
    sharding (Adam moments and router biases are zero at init and would not show a mix-up).
    Built on the host shard by shard, so nothing compiles; keys are kept as they are, or
    folded with a nonzero `seed` (different seeds give different values in every array)."""
    def one(path, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, seed) if seed else x
        base = sum(map(ord, jax.tree_util.keystr(path)))
        rng = np.random.default_rng([seed, base] if seed else base)
        if np.issubdtype(x.dtype, np.integer):
            full = rng.integers(0, 1000, size=x.shape).astype(x.dtype)
        else:
            full = (rng.standard_normal(x.shape) * 3).astype(x.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda index: full[index])
    return jax.tree_util.tree_map_with_path(one, state)


class DataIterator:
    """Stands in for the training data iterator: its state is a batch counter."""

    def __init__(self, batches: int = 0):
        self.state = {"batches": batches}

    def get_state(self) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        self.state = dict(state)



def fake_step_folder(directory: Path, step: int, files: tuple[str, ...] | None = None) -> Path:
    """`directory/step` holding `files` (default: every `manager.STEP_FILES`, as a finished
    Orbax save leaves them), each a placeholder `{}`: for tests of step-folder scans."""
    from jaxmoe.checkpoint.manager import STEP_FILES

    folder = Path(directory) / str(step)
    for name in STEP_FILES if files is None else files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder

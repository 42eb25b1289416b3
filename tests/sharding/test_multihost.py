"""Two CPU processes (gloo collectives) train the tiny model through `jaxmoe train
--coordinator-address ...` and log the same losses as one process fed the same global
batches: data-parallel, process 0's rows then process 1's; with tensor parallelism across
the processes, the rows both of them feed. Tolerance 1e-5 relative (float32; the processes
only change the order of the sums)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import input_pipeline
from jaxmoe.train.loop import build_trainer
from jaxmoe.train.metrics import read_metrics
from tests.sharding._helpers import TINY_OVERRIDES, tiny_config

OVERRIDES = ["train.steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
             "train.sample_tokens=0", "train.tensorboard=false", "train.batch_size=8",
             "mesh.data=-1", "train.checkpoint_every=0"]
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(run_dir: Path, extra: list[str] = (), timeout: int = 600,
                         rc: int = 0, only: dict[int, list[str]] | None = None):
    """`jaxmoe train` in two local processes (2 CPU devices each); returns their outputs
    after checking that both exited with `rc`. `only`: more arguments for one process."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = [sys.executable, "-m", "jaxmoe.cli", "train", "--config", "configs/tiny_moe.yaml",
            "--run-dir", str(run_dir), "--no-progress",
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    merged = {o.split("=", 1)[0]: o for o in TINY_OVERRIDES + OVERRIDES + list(extra)}
    procs = [subprocess.Popen(args + ["--process-id", str(i)] + list(merged.values())
                              + (only or {}).get(i, []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == rc, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("mesh, shards", [
    (["mesh.data=-1"], 2),
    # tensor parallelism across the two processes: the batch is not split between them, so
    # both feed the same rows (each fed its own half, and the step saw one of them: half
    # train.batch_size, with different data on each process, and no error)
    (["mesh.data=1", "mesh.tensor=4"], 1),
], ids=["data_parallel", "tensor_across_processes"])
def test_two_processes_match_one(tmp_path: Path, mesh: list[str], shards: int):
    cfg = tiny_config(*OVERRIDES, *mesh)
    outs = _train_two_processes(tmp_path / "run", mesh)
    assert "model:" in outs[0] and "model:" not in outs[1]  # only process 0 logs
    logged = read_metrics(tmp_path / "run", "train")
    assert len(logged) == 3

    trainer = build_trainer(tiny_config(*OVERRIDES), jax.devices()[:1])  # one device
    iters = [input_pipeline.make_dataset(cfg.data, split="train",
                                         batch_size=cfg.train.batch_size // shards,
                                         seed=cfg.train.seed, process_index=i,
                                         process_count=shards) for i in range(shards)]
    expected = []
    with trainer.context():
        state = trainer.init()
        for _ in range(3):
            parts = [next(it) for it in iters]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
            expected.append((float(metrics["loss"]), float(metrics["tokens"])))
    assert [r["tokens"] for r in logged] == [t for _, t in expected]
    np.testing.assert_allclose([r["loss"] for r in logged], [loss for loss, _ in expected],
                               rtol=RTOL)


@pytest.mark.slow
def test_one_process_with_an_empty_eval_shard_still_trains(tmp_path: Path):
    """Process 1's share of the held-out split is all bad records (empty text), process 0's
    is not: the held-out split as a whole has tokens, so both train (process 1 used to stop
    with a config error while process 0 waited for it in the first collective)."""
    import json

    docs = [json.dumps({"text": f"document number {i} " * 3}) for i in range(30)]
    docs += [json.dumps({"text": f"held out {i} " * 3 if i % 2 == 0 else " "})
             for i in range(30, 40)]  # eval: records 30..39; process 1 reads the odd ones
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(docs) + "\n")
    overrides = ["train.steps=1", "data.source=jsonl", f"data.paths=[{path}]",
                 "data.eval_fraction=0.25", "data.shuffle=false"]
    # the premise, read here: process 0's held-out share has 5 documents, process 1's none
    from input_pipeline.pipeline import document_dataset
    from jaxmoe.config import load_config
    data_cfg = load_config("configs/tiny_moe.yaml", overrides[1:]).data
    shares = [list(document_dataset(data_cfg, split="eval", seed=0, process_index=i,
                                    process_count=2, num_epochs=1)) for i in (0, 1)]
    assert [len(s) for s in shares] == [5, 0]
    _train_two_processes(tmp_path / "run", overrides, timeout=240)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "eval")] == [1]


def test_a_held_run_dir_stops_every_process_in_one_line(tmp_path: Path):
    """Another process holds the run directory's lock: both processes of the job exit 2
    with the refusal (only process 0 takes the lock; process 1 used to wait at a barrier
    until the distributed service gave up minutes later). Reference: the message in full."""
    from jaxmoe.config import dump_config
    from tests.train.test_run_dir import _holder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(tiny_config(*OVERRIDES)))
    holder = _holder(run_dir)
    try:
        outs = _train_two_processes(run_dir, timeout=180, rc=2)
    finally:
        holder.communicate("", timeout=30)
    line = (f"jaxmoe: config error: --run-dir {run_dir}: another jaxmoe train is running in "
            f"it (pid {holder.pid} holds {run_dir}/run.lock); expected one run per directory")
    for out in outs:
        assert line in out.splitlines(), out[-3000:]


@pytest.mark.parametrize("only, line", [
    (["train.seed=1"], "jaxmoe: multi-host settings: process 1's config differs from process "
     "0's (train.seed: 0 -> 1); expected the same config and overrides in every process"),
    (["--num-processes", "3"], "jaxmoe: multi-host settings: process 1 was started with "
     "num_processes=3 but the run has 2 processes (counted by process 0's coordinator); "
     "expected num_processes=2 in every process"),
], ids=["seed", "num_processes"])
def test_processes_started_unalike_stop_in_one_line(tmp_path: Path, only, line):
    """Process 1 alone given another seed trained different replicas without a word, and
    alone given --num-processes 3 had it ignored: both processes exit 2 with one line before
    anything is built (no run directory). Reference: the settings as given."""
    outs = _train_two_processes(tmp_path / "run", ["train.steps=1"], timeout=180, rc=2,
                                only={1: only})
    for out in outs:
        assert line in out.splitlines(), out[-3000:]
    assert not (tmp_path / "run").exists()

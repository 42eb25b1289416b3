"""Two processes (2 CPU devices each, gloo collectives) save one checkpoint, each writing
its own shards and its own data-iterator state, and restore it onto a different mesh."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.checkpoint._helpers import ROOT, subprocess_env

WORKER = ROOT / "tests" / "checkpoint" / "_multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_save_and_restore(tmp_path):
    directory = tmp_path / "checkpoints"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(directory)],
                              cwd=ROOT, env=subprocess_env(devices=2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"OK process {i}:" in out, out[-2000:]
    step = directory / "5"
    # Each process wrote its own shards (an OCDBT sub-database per process) and its own
    # data-iterator file.
    assert sorted(p.name for p in (step / "state").glob("ocdbt.process_*")) == \
        ["ocdbt.process_0", "ocdbt.process_1"]
    assert sorted(p.name for p in (step / "data").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]

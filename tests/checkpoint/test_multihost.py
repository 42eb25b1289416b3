"""Two processes (2 CPU devices each, gloo collectives) save one checkpoint, each writing
its own shards and its own data-iterator state, and restore it onto a different mesh; then a
SIGTERM to one process makes both stop and save at the same step (JAX preemption service)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.checkpoint._helpers import ROOT, subprocess_env

WORKER = ROOT / "tests" / "checkpoint" / "_multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A worker process whose output lines are collected by a thread."""

    def __init__(self, port: int, index: int, directory):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(index), str(directory)], cwd=ROOT,
            env=subprocess_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
def test_two_process_save_restore_and_preemption(tmp_path):
    directory = tmp_path / "checkpoints"
    port = free_port()
    procs = [Process(port, i, directory) for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not all("looping\n" in p.lines for p in procs):
            assert time.monotonic() < deadline, [p.output()[-2000:] for p in procs]
            assert all(p.proc.poll() is None for p in procs), [p.output()[-4000:]
                                                               for p in procs]
            time.sleep(0.05)
        procs[1].proc.send_signal(signal.SIGTERM)  # a preemption notice to one host only
        for p in procs:
            p.proc.wait(timeout=120)
            p.reader.join(timeout=10)
    finally:
        for p in procs:
            p.proc.kill()
    stops = []
    for i, p in enumerate(procs):
        out = p.output()
        assert p.proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"OK process {i}:" in out, out[-2000:]
        match = re.search(r"preempted by SIGTERM at step (\d+)", out)
        assert match, out[-2000:]
        stops.append(int(match.group(1)))
    assert stops[0] == stops[1], stops  # both stopped (and saved) at the same step
    step = directory / "5"
    # Each process wrote its own shards (an OCDBT sub-database per process) and its own
    # data-iterator file.
    assert sorted(p.name for p in (step / "state").glob("ocdbt.process_*")) == \
        ["ocdbt.process_0", "ocdbt.process_1"]
    assert sorted(p.name for p in (step / "data").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    assert (directory / str(stops[0]) / "state").is_dir()

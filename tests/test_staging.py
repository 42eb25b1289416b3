"""Staging directories: fresh per process; stale ones of dead processes removed, live ones kept."""

import os
import subprocess

from jaxmoe.staging import stale_staging_dirs, staging_dir


def test_staging_dir_removes_only_dead_processes_dirs(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    live = tmp_path / f".out.partial-{os.getppid()}"  # pytest's parent: alive
    other = tmp_path / f".other.partial-{dead.pid}"  # another output's: not ours to touch
    for d in (stale, live, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x")
    assert stale_staging_dirs(out) == [stale]
    tmp = staging_dir(out)
    assert tmp == tmp_path / f".out.partial-{os.getpid()}"
    assert tmp.is_dir() and list(tmp.iterdir()) == []
    assert not stale.exists() and live.exists() and other.exists()
    (tmp / "f").write_bytes(b"x")
    assert list(staging_dir(out).iterdir()) == []  # our own leftover is emptied

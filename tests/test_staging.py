"""Staging directories: fresh per process; stale ones of dead processes removed, live ones kept."""

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jaxmoe.staging import (
    output_folder,
    remove_failed_staging_dir,
    staging_dir,
    stale_staging_dirs,
)


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


def test_stale_dirs_of_a_name_with_glob_characters(tmp_path):
    """`run[1]` is a file name, not the pattern `run1`: its stale folders are found, and a
    folder of output `run1` is not."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours, theirs = tmp_path / f".run[1].partial-{dead.pid}", tmp_path / f".run1.partial-{dead.pid}"
    ours.mkdir()
    theirs.mkdir()
    assert stale_staging_dirs(tmp_path / "run[1]") == [ours]


def test_stale_dirs_of_a_name_with_a_dash(tmp_path):
    """`my-out`'s staging folder `.my-out.partial-PID`: the pid is what follows the last
    dash (splitting at the first one read `out.partial-PID`, no pid, and kept it forever).
    Reference: the naming in the module docstring; a pid of a process that has exited."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".my-out.partial-{dead.pid}"
    stale.mkdir()
    assert stale_staging_dirs(tmp_path / "my-out") == [stale]
    staging_dir(tmp_path / "my-out")
    assert not stale.exists()


def test_staging_dir_of_an_output_whose_parents_do_not_exist_yet(tmp_path):
    """The free-space check looks at the nearest folder that exists (the parents are made
    with the staging folder); checking the missing parent raised FileNotFoundError.
    Reference: the naming in the module docstring."""
    out = tmp_path / "new" / "sub" / "out"
    tmp = staging_dir(out, 1)
    assert tmp == tmp_path / "new" / "sub" / f".out.partial-{os.getpid()}" and tmp.is_dir()


def test_output_folder_is_new_or_empty_and_follows_a_symlink(tmp_path):
    """Reference: rename(2), which puts a folder in place of a missing or empty one only."""
    empty, full, link = tmp_path / "empty", tmp_path / "full", tmp_path / "link"
    empty.mkdir()
    full.mkdir()
    (full / "x").write_text("mine")
    link.symlink_to(empty)
    assert output_folder(tmp_path / "new") == (tmp_path / "new", None)
    assert output_folder(empty) == (empty, None)
    assert output_folder(link) == (empty, None)  # the folder the link names
    assert output_folder(full)[1] == f"{full}: exists and is not empty; choose a new output " \
                                     "directory"
    assert output_folder(full / "x")[1] == f"{full / 'x'}: is a file; choose a new output " \
                                           "directory"


def test_a_mount_point_or_the_current_directory_is_refused(tmp_path, monkeypatch):
    """An empty mount point (a container volume): the staged output, beside it on another
    file system, was built whole and then deleted when rename(2) failed with EBUSY. The
    current directory: the rename put a new folder in place of the shell's."""
    empty = tmp_path / "volume"
    empty.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == empty)
    assert output_folder(empty)[1] == (
        f"{empty}: is a mount point, which an output written beside it cannot be renamed "
        f"over; choose a new directory inside it, e.g. {empty / 'export'}")
    assert output_folder(empty / "export") == (empty / "export", None)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert output_folder(".")[1] == (f"{here}: is the current directory, which the output "
                                     "would replace; choose a new output directory")


class _HalfWriter:
    """A file whose write puts half the text on disk, then fails (a full disk)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["half_written", "rename_fails"])
def test_write_text_atomic_leaves_the_old_file_or_the_new(tmp_path, monkeypatch, failure):
    """Reference: the file holds either all of the old text or all of the new, and no
    temporary file is left, also when the write fails half-way (half the new text on disk)
    or the final rename fails."""
    from jaxmoe import staging

    path = tmp_path / "sub" / "config.yaml"
    staging.write_text_atomic(path, "old\n")
    assert path.read_text() == "old\n"
    with monkeypatch.context() as m:
        if failure == "half_written":
            fdopen = os.fdopen
            m.setattr(staging.os, "fdopen", lambda *a, **k: _HalfWriter(fdopen(*a, **k)))
        else:
            def refuse(*a, **k):
                raise OSError(5, "Input/output error")
            m.setattr(staging.os, "replace", refuse)
        with pytest.raises(OSError):
            staging.write_text_atomic(path, "new text, long enough to be cut in half\n")
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    staging.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    # the mode a plain open() gives (mkstemp's 0600 made config.yaml owner-only)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_failed_staging_dir_is_removed_after_late_writes(tmp_path):
    """A writer thread the failed call abandoned re-creates the folder after the first
    removal (TensorStore's file driver makes missing folders): removed again once quiet.
    Reference: the folder is gone after both writes and the removal (one rmtree left it)."""
    tmp = tmp_path / ".out.partial-1"
    (tmp / "params").mkdir(parents=True)

    def late_write():  # right after the first removal, well inside the settle window
        while tmp.exists():
            time.sleep(0.001)
        (tmp / "params" / "d").mkdir(parents=True)
        (tmp / "params" / "d" / "x").write_text("late")
    writer = threading.Thread(target=late_write)
    writer.start()
    remove_failed_staging_dir(tmp, settle_s=1.0)
    writer.join()
    assert not tmp.exists()

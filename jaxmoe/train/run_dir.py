"""The run directory a `jaxmoe train` writes into: checked before anything is built, and
locked while a run trains in it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from jaxmoe.config_schema import ConfigError

CONFIG_SECTIONS = frozenset({"model", "train", "data", "mesh"})
LOCK_FILE = "run.lock"


def _foreign_config(path: Path) -> str | None:
    """Why `path` is not the config.yaml a jaxmoe run writes (None when it looks like one:
    a YAML mapping of jaxmoe's config sections; values are not validated, so a run written
    by an older jaxmoe still resumes)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"unreadable as YAML ({type(e).__name__})"
    if not isinstance(data, dict) or not data:
        return f"a YAML {type(data).__name__}, not a mapping of config sections"
    other = sorted(map(str, set(data) - CONFIG_SECTIONS))
    if other or "model" not in data:
        return (f"top-level keys {sorted(map(str, data))}, expected "
                f"{sorted(CONFIG_SECTIONS)}")
    return None


def check_run_dir(run_dir: Path) -> None:
    """A run directory is new, empty, or a run (it has the config.yaml every run writes
    first): training into a folder of other files would scatter checkpoints among them, and
    would overwrite a config.yaml of something else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: is a file; expected a directory")
    ancestor = run_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not run_dir.exists() and not ancestor.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: {ancestor} is a file; expected a path whose "
                          "folders are folders")
    config = run_dir / "config.yaml"
    # run.lock alone is what a run that died before writing its config leaves
    if run_dir.is_dir() and not config.is_file() and any(p.name != LOCK_FILE
                                                         for p in run_dir.iterdir()):
        raise ConfigError(
            f"--run-dir {run_dir}: holds other files and no jaxmoe run (no config.yaml); "
            "expected a new or empty directory, or a run to resume")
    why = _foreign_config(config) if config.is_file() else None
    if why:
        raise ConfigError(
            f"--run-dir {run_dir}: its config.yaml is not a jaxmoe run's ({why}); expected a "
            "new or empty directory, or a run to resume")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: {checkpoints} is a file; expected the run's "
                          "checkpoints folder")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `run_dir/run.lock` while a run trains in `run_dir`: a
    second `jaxmoe train` on the same directory (which would resume from the first one's
    checkpoints and delete its save in progress) is refused in one line. The lock goes with
    the process, so a killed run leaves none behind. Take it in one process of a multi-host
    job (the others share the directory). Best effort: a file system without locks is said
    once on stderr and the run goes on unprotected; some (NFS mounted with
    `local_lock=flock`, Lustre's `localflock`, some FUSE mounts) grant the lock per client
    without saying so, and then protect only against a second run on the same host."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: cannot open {path} ({e.strerror}); expected "
                          "a writable directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(f"jaxmoe: cannot lock {path} ({e.strerror}); a second run started on "
                      "this directory would not be refused", file=sys.stderr)
            else:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise ConfigError(
                    f"--run-dir {run_dir}: another jaxmoe train is running in it (pid "
                    f"{holder} holds {path}); expected one run per directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

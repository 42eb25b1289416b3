"""Staging directories for outputs that appear atomically (exports and conversions).

An output `DIR` is written into a sibling `.DIR.partial-PID` and renamed into place only
when complete, so an interrupted run never leaves a half-written `DIR`. A run killed hard
(SIGKILL, power loss) cannot remove its own staging directory; the next run that writes the
same output removes the ones whose process is gone, so they do not pile up.
`scratch_dir` gives a tool a fresh directory inside a user's folder that it may delete whole.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_staging_dirs(out: Path) -> list[Path]:
    """Staging directories of `out` left by processes that no longer run on this host."""
    stale = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stale.append(path)
    return sorted(stale)


def staging_dir(out: str | Path, nbytes: int = 0) -> Path:
    """A fresh, empty `.OUT.partial-PID` next to `out` (stale ones of dead processes removed).

    nbytes: what will be written; raises OSError(ENOSPC) naming both sizes if the file
    system holds less free space, before anything is written."""
    out = Path(out).absolute()
    for path in stale_staging_dirs(out):
        log.warning("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)
    free = shutil.disk_usage(_existing_parent(out)).free
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"{out}: needs {nbytes / 1e9:,.2f} GB, its file system has "
                      f"{free / 1e9:,.2f} GB free")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def output_folder(out: str | Path) -> tuple[Path, str | None]:
    """(the folder an export is to be renamed to, a symlink followed; why it cannot be, or
    None). It must be new or an empty folder: a rename replaces only an empty one."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        return out, f"{out}: is a file; choose a new output directory"
    if out.exists() and any(out.iterdir()):
        return out, f"{out}: exists and is not empty; choose a new output directory"
    if out.is_dir() and os.path.ismount(out):  # the rename into place would fail at the end
        return out, (f"{out}: is a mount point, which an output written beside it cannot be "
                     f"renamed over; choose a new directory inside it, e.g. {out / 'export'}")
    if out.is_dir() and out == Path.cwd().resolve():
        return out, (f"{out}: is the current directory, which the output would replace; "
                     "choose a new output directory")
    return out, None


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it would
    race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `path` whole or not at all: a temporary file beside it, flushed to disk, then a
    rename (a crash leaves the old file or the new one). The file gets the mode a plain
    `open(path, "w")` would give it (mkstemp's is owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove_failed_staging_dir(tmp: Path, settle_s: float = 0.5, timeout_s: float = 30.0) -> None:
    """Removes the staging directory of a write that failed. Writer threads of the failed
    library call may still finish other arrays' writes (Orbax abandons them to TensorStore,
    whose file driver re-creates missing folders): the directory is removed again until it
    stayed away for `settle_s` seconds, for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(settle_s)
        if not tmp.exists():
            return
        if time.monotonic() > deadline:
            log.warning("%s: still being written to by abandoned writer threads; left behind "
                        "(the next run of this output removes it)", tmp)
            return


def scratch_dir(base: str | Path, prefix: str = "jaxmoe-") -> Path:
    """A fresh, empty directory inside `base` (created if missing) for one run's scratch
    files; nothing already in `base` is touched. Raises OSError when `base` cannot hold it."""
    os.makedirs(base, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base, prefix=prefix))


def remove_scratch_dir(path: Path) -> None:
    """Deletes what `scratch_dir` created, and nothing else."""
    shutil.rmtree(path, ignore_errors=True)

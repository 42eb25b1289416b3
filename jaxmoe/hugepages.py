"""Start `jaxmoe train` with glibc malloc asking for transparent huge pages.

XLA:CPU allocates each step's temporary buffer afresh; on the CPU models measured it is
larger than a glibc thread arena's heap, so malloc maps it with mmap and unmaps it after the
step, and every step faults in tens of thousands of fresh 4 KiB pages. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc madvise its mappings for transparent huge
pages (2 MiB per fault). Measured side by side: tools/bench_hugepages.py, numbers in
docs/benchmarks.md. The tunable is read only when a process starts, hence a re-exec of the
same command line (same pid, so signals and supervisors are unaffected; the package has
already been imported once by then, ~1 s).

Done by the command-line entry point for `jaxmoe train` (and the benchmarks) only where it
was measured to act: Linux, glibc >= 2.35 (which has the tunable), THP mode `madvise` (in
`always` mode the kernel does not wait for malloc's advice). A GLIBC_TUNABLES of the user's
is kept and the tunable appended, unless it already sets `glibc.malloc.hugetlb`.
JAXMOE_HUGEPAGES=0 (or false/off/no) turns it off. Caveat: with THP `defrag` set to
`madvise`, the kernel may compact memory on such faults, which can stall on a badly
fragmented host.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXMOE_HUGEPAGES"
_MARK = "JAXMOE_HUGEPAGES_REEXEC"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_madvise(path: str = _THP) -> bool:
    """True if the kernel's THP mode (the bracketed entry of `path`) is `madvise`."""
    try:
        with open(path) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def _glibc_has_tunable() -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        return False


def with_tunable(current: str | None) -> str | None:
    """The GLIBC_TUNABLES value to run with, or None if `current` already decides hugetlb."""
    if not current:
        return TUNABLE
    if "glibc.malloc.hugetlb" in current:
        return None
    return f"{current}:{TUNABLE}"


def wanted(environ=os.environ) -> bool:
    """Whether the command should re-exec itself with the tunable set."""
    return (sys.platform == "linux" and bool(sys.executable)
            and sys.argv[:1] not in (["-"], [""])  # a script read from stdin cannot rerun
            and environ.get(OPT_OUT, "1").lower() not in ("0", "false", "off", "no")
            and _MARK not in environ
            and with_tunable(environ.get("GLIBC_TUNABLES")) is not None
            and _glibc_has_tunable() and _thp_madvise())


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command line with the tunable set, if `wanted`.

    Returns normally when nothing is to be done, when the exec fails (with a line on
    stderr), and in the re-executed process, which says on stderr what it runs with."""
    if os.environ.get(_MARK) == "1":
        os.environ[_MARK] = "done"  # children (data workers, subprocesses) inherit quietly
        print(f"jaxmoe: running with GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')} "
              f"(transparent huge pages for malloc; {OPT_OUT}=0 turns this off)",
              file=sys.stderr, flush=True)
        return
    if not wanted():
        return
    tunables = with_tunable(os.environ.get("GLIBC_TUNABLES"))
    env = dict(os.environ, GLIBC_TUNABLES=tunables, **{_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:
        print(f"jaxmoe: could not restart with GLIBC_TUNABLES={tunables} ({e}); continuing "
              "without", file=sys.stderr, flush=True)

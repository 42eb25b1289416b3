"""Start the `jaxmoe` command with glibc malloc asking for transparent huge pages.

XLA:CPU allocates each step's temporary buffer afresh; for the models run on CPU it is
larger than a glibc thread arena's heap, so malloc maps it with mmap and unmaps it after the
step: ~26,000-30,000 fresh 4 KiB pages per step, each a page fault that zeroes a page.
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc madvise such mappings for transparent
huge pages (2 MiB per fault). Measured side by side (tools/bench_hugepages.py,
docs/benchmarks.md): the benchmark model's step 1.12x faster, faults per step 26,800 -> 350;
transformers on the same model unchanged. The tunable is read only when a process starts,
hence a re-exec of the command line (same pid, so signals and supervisors are unaffected).

It is done only by the command-line entry point for `jaxmoe train` (and the benchmarks), on
Linux with glibc and transparent huge pages enabled (`always` or `madvise`), when
GLIBC_TUNABLES is unset (a user's own setting is left alone) and JAXMOE_HUGEPAGES is not "0".
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXMOE_HUGEPAGES"
_MARK = "JAXMOE_HUGEPAGES_REEXEC"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_enabled(path: str = _THP) -> bool:
    """True if the kernel's THP mode is `always` or `madvise` (the bracketed entry)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def wanted(environ=os.environ) -> bool:
    """Whether the command should re-exec itself with the tunable set."""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
            and "GLIBC_TUNABLES" not in environ and environ.get(OPT_OUT, "1") != "0"
            and _MARK not in environ and _thp_enabled())


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command line with GLIBC_TUNABLES set, if `wanted`.

    Returns normally when nothing is to be done, and in the re-executed process (which logs
    one line to stderr so the restart is never silent)."""
    if os.environ.get(_MARK) == "1":
        os.environ[_MARK] = "done"  # children (data workers, subprocesses) inherit quietly
        print(f"jaxmoe: running with GLIBC_TUNABLES={TUNABLE} (transparent huge pages for "
              f"malloc; {OPT_OUT}=0 turns this off)", file=sys.stderr, flush=True)
        return
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLE, **{_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

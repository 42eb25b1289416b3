"""Test-session set-up: CPU only, 8 simulated devices (set before jax is imported).

Single-device tests pass `devices=jax.devices()[:1]` explicitly; multi-device tests use all 8.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0 for the CPU programs the tests compile: XLA's HLO passes are unchanged (the
# tiny train step's optimised HLO is identical), and compiling is most of this suite's time:
# tests/train/test_step.py alone took 82 s instead of 120, the suite 876 s instead of 1,014
# (session 19). Results may differ from -O3's in the last bits (a loss of 6.08 by 2e-5
# after 3 steps); the whole suite passes at either level. The README's main command runs in
# its own process at the default level (tests/train/test_main_job.py).
_OPT = "" if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "") else (
    " --xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _OPT +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import contextlib  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """One persistent compilation cache for the session: many modules and the `jaxmoe`
    processes tests start compile the same tiny programs, and a compiled program found in
    the cache is loaded instead of compiled again (JAX keys it by the program, the compile
    options and the versions, so a changed program compiles). It is made by the first
    process (pytest-xdist's controller, before its workers start: they inherit it, as do
    the processes tests start) and removed when that process ends, so every session starts
    empty. A size limit makes JAX lock the folder (filelock) for each read and write: two
    processes may compile the same program at once, and JAX writes an entry in place, so
    without the lock one could read another's half-written entry (a warning, and a compile).
    A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="jaxmoe-test-jit-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
        config.stash[_CACHE_DIR] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_CACHE_DIR, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


_CACHE_DIR = pytest.StashKey[str]()


@pytest.fixture
def file_size_limit():
    """`with file_size_limit(nbytes):` files this process writes cannot grow past `nbytes`
    (writes fail with EFBIG, as on a full disk; Python ignores the SIGXFSZ signal)."""
    @contextlib.contextmanager
    def limit(nbytes: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return limit

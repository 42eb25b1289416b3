"""Test-session set-up: CPU only, 8 simulated devices (set before jax is imported).

Single-device tests pass `devices=jax.devices()[:1]` explicitly; multi-device tests use all 8.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import contextlib  # noqa: E402
import resource  # noqa: E402

import pytest  # noqa: E402


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

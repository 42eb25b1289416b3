"""Test-session set-up: CPU only, 8 simulated devices (set before jax is imported).

Single-device tests pass `devices=jax.devices()[:1]` explicitly; multi-device tests use all 8.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

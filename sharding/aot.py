"""Ahead-of-time compilation of a train step for a TPU topology, on any host.

`target_from_name("v5p-128")` describes the slice; `topology_devices` asks libtpu for
compile-only devices of that topology (`jax.experimental.topologies`), so the full train step
(forward, backward, optimizer update) is lowered with abstract inputs only
(`jax.ShapeDtypeStruct` with shardings: nothing is allocated) and compiled by the real TPU
compiler. `plan_report` then reads the compiled program: per-device memory, matmul FLOPs
and collectives (`sharding.hlo`), and turns them into a step-time and MFU estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import jax

from sharding.chips import CORES_IN_NAME, Chip, get_chip


class TargetError(ValueError):
    """A topology name that cannot be parsed or described."""


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `chips` chips of `chip`, as `dims` (TPU torus) x `num_slices`."""

    name: str
    chip: Chip
    chips: int  # per slice
    dims: tuple[int, ...]
    num_slices: int = 1

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.dims))}"

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices

    @property
    def devices(self) -> int:
        return self.total_chips * self.chip.devices_per_chip


def default_dims(chips: int, ndim: int) -> tuple[int, ...]:
    """The usual slice shape for `chips` chips: powers of two kept as even as possible
    (v5p: 64 -> 4x4x4, 128 -> 4x4x8; v6e: 256 -> 16x16); a trailing 1 for small 3D ones."""
    if chips & (chips - 1):
        raise TargetError(f"{chips} chips: not a power of two; give the shape explicitly")
    dims = [1] * ndim
    while math.prod(dims) < chips:
        i = dims.index(min(dims))
        dims[i] *= 2
    dims.sort()
    if ndim == 3 and dims[0] == 1:  # Cloud names the flat shapes 2x2x1, 2x4x1 (sic: 2x2x1)
        dims = dims[1:] + [1]
    return tuple(dims)


def target_from_name(name: str, num_slices: int = 1) -> Target:
    """"v5p-128" (cores for v4/v5p/tpu7x, chips otherwise), "v5p:4x4x8", "v6e-256", "h100-8"."""
    m = re.fullmatch(r"([a-z0-9]+)[-:](\d+(?:x\d+)*)", name.strip().lower())
    if not m:
        raise TargetError(f"--topology {name!r}: expected e.g. v5p-128, v5p:4x4x4, v6e-256 "
                          "or h100-8")
    try:
        chip = get_chip(m.group(1))
    except ValueError as e:
        raise TargetError(f"--topology {name!r}: {e}") from None
    if num_slices < 1:
        raise TargetError(f"--num-slices {num_slices}: expected >= 1")
    spec = m.group(2)
    if "x" in spec or ":" in name:
        dims = tuple(int(v) for v in spec.split("x"))
        if min(dims) < 1:
            raise TargetError(f"--topology {name!r}: every dimension of the shape must be "
                              f">= 1 (e.g. {chip.name}:{_example_shape(chip)})")
        if chip.platform == "tpu" and len(dims) != chip.torus_dims:
            raise TargetError(f"--topology {name!r}: {chip.name} is a {chip.torus_dims}D torus; "
                              f"expected {chip.torus_dims} dimensions "
                              f"(e.g. {chip.name}:{_example_shape(chip)})")
        return Target(name, chip, math.prod(dims), dims, num_slices)
    count = int(spec)
    if count < 1:
        raise TargetError(f"--topology {name!r}: expected a positive "
                          f"{'GPU' if chip.platform == 'gpu' else 'TensorCore/chip'} count")
    if chip.platform == "gpu":
        return Target(name, chip, count, (count,), num_slices)
    cores = CORES_IN_NAME.get(chip.name, 1)
    if count % cores:
        raise TargetError(f"--topology {name!r}: {chip.name} names count TensorCores "
                          f"({cores} per chip); expected a multiple of {cores}")
    chips = count // cores
    try:
        dims = default_dims(chips, chip.torus_dims)
    except TargetError:
        raise TargetError(f"--topology {name!r}: {chips} chips is not a power of two; give "
                          f"the torus shape explicitly (e.g. {chip.name}:"
                          f"{_example_shape(chip, chips)})") from None
    return Target(name, chip, chips, dims, num_slices)


def _example_shape(chip: Chip, chips: int = 0) -> str:
    """A shape of `chip`'s torus rank to suggest in messages (`chips` of them when that
    factors simply, else a small power of two)."""
    ndim = max(chip.torus_dims, 1)
    if chips > 1:
        dims = [1] * ndim
        rest = chips
        for p in (2, 3, 5, 7):  # spread small prime factors, largest dims last
            while rest % p == 0:
                dims[dims.index(min(dims))] *= p
                rest //= p
        if rest == 1:  # ones last, as Cloud names the flat shapes (2x2x1)
            return "x".join(map(str, sorted(dims, key=lambda v: (v == 1, v))))
    return "x".join(["4"] * ndim)


@contextlib.contextmanager
def _quiet_libtpu_off_tpu(target: Target) -> Iterator[None]:
    """On a host without TPU chips, libtpu looks for the slice it runs on and prints an
    `E... INVALID_ARGUMENT` trace and warnings on every (successful) compile: it is told the
    target's accelerator type and a local worker while it describes the topology (unset
    again after, so child processes see the environment they were given). Compile-only
    devices do not depend on these settings (checked with libtpu 0.0.42.1, v4 and v5p
    targets); a TPU host's own values are never replaced."""
    try:
        from jax._src import hardware_utils

        on_tpu = bool(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except (ImportError, AttributeError):  # a jax without it: leave libtpu as it is
        on_tpu = True
    cores = CORES_IN_NAME.get(target.chip.name, 1)
    defaults = {} if on_tpu else {
        "TPU_ACCELERATOR_TYPE": f"{target.chip.topology_prefix}-{target.chips * cores}",
        "TPU_WORKER_HOSTNAMES": "localhost"}
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def topology_devices(target: Target) -> list[Any] | None:
    """Compile-only devices of `target`; None when no compiler for it is installed (no
    libtpu, no GPU plugin): the caller falls back to the analytic estimate. A shape that the
    installed compiler refuses raises TargetError with its reason."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    # libtpu takes a host-wide lock file on load; compile-only use needs no exclusive access,
    # and a test run or a second `jaxmoe compile` must not fail on it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if target.chip.platform == "tpu":
        if xla_bridge.get_tpu_library_path() is None:
            return None  # no libtpu
        quiet = _quiet_libtpu_off_tpu(target)
        name = target.topology_name
        kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
        if target.chip.chip_config:
            kwargs["chip_config_name"] = target.chip.chip_config
    else:
        name, kwargs, quiet = target.name, {}, contextlib.nullcontext()
    platform = "tpu" if target.chip.platform == "tpu" else "cuda"
    try:
        with quiet:
            topo = topologies.get_topology_desc(platform=platform, topology_name=name,
                                                **kwargs)
    except (ImportError, NotImplementedError):  # no plugin registered for the platform
        return None
    except (RuntimeError, ValueError) as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        slices = f" x {target.num_slices} slices" if target.num_slices > 1 else ""
        who = "libtpu" if platform == "tpu" else f"the {platform} plugin"
        raise TargetError(f"--topology {target.name!r}: {who} refuses {name}"
                          f"{slices}: {reason}") from None
    return list(topo.devices)


def abstract_inputs(trainer: Any) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
    """(abstract TrainState, abstract batch) carrying the trainer's shardings."""
    import jax.numpy as jnp

    state = jax.eval_shape(trainer.init)
    b, seq = trainer.cfg.train.batch_size, trainer.cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, seq), jnp.int32, sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    return state, batch


def compile_train_step(trainer: Any) -> Any:
    """Lowers and compiles `trainer.train_step` for its mesh's devices (abstract inputs);
    nothing of it goes into JAX's persistent compilation cache (`_no_cache_writes`)."""
    state, batch = abstract_inputs(trainer)
    with trainer.context():
        lowered = trainer.train_step.lower(state, batch)
    with _no_cache_writes():
        return lowered.compile()


@contextlib.contextmanager
def _no_cache_writes() -> Iterator[None]:
    """Keeps the plans compiled here out of JAX's persistent compilation cache
    (JAX_COMPILATION_CACHE_DIR). A program compiled for compile-only devices (a TPU topology
    this host does not have) cannot be loaded back: JAX warned "Error reading persistent
    compilation cache entry" on every later compile, and a full-size plan took hundreds of
    MB. JAX writes only what took longer than `jax_persistent_cache_min_compile_time_secs`
    to compile, reading that setting at each write. (Asking `jax.devices()` whether the
    devices are compile-only would start this host's backend, which `jaxmoe compile` never
    needs.)"""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, float("inf"))
    try:
        yield
    finally:
        jax.config.update(key, before)


def memory_stats(compiled: Any) -> dict[str, float]:
    """Per-device bytes: arguments, outputs, aliased (donated), temporaries, code, total."""
    m = compiled.memory_analysis()
    args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    return {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp,
            "code": code, "total": args + out - alias + temp + code}


def cost_flops(compiled: Any) -> float:
    """XLA's own FLOP count (a scanned layer body counted once)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))

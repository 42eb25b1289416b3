"""Multi-process (multi-host) start-up: `jax.distributed` from flags, environment or cluster.

Call `initialize` before anything else touches JAX devices. Sources, in order:
  1. explicit arguments (the CLI's `--coordinator-address/--num-processes/--process-id`);
  2. the environment: JAXMOE_COORDINATOR_ADDRESS, JAXMOE_NUM_PROCESSES, JAXMOE_PROCESS_ID;
  3. with `auto=True` (`--distributed`), JAX's own cluster detection (Cloud TPU pods, SLURM,
     Open MPI, Kubernetes/GKE ...), which needs no arguments there.
On CPU the collectives across processes use gloo. After start-up each process sees all
devices (`jax.devices()`) but feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`), and only process 0 writes logs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import jax
import numpy as np

ENV_ADDRESS = "JAXMOE_COORDINATOR_ADDRESS"
ENV_COUNT = "JAXMOE_NUM_PROCESSES"
ENV_ID = "JAXMOE_PROCESS_ID"


class MultiHostError(ValueError):
    """Inconsistent multi-process settings."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise MultiHostError(f"{name}={raw!r}: expected an integer") from None


def check_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, *, auto: bool = False
                   ) -> tuple[str | None, int | None, int | None]:
    """(address, process count, process id) that `initialize` starts with, arguments before
    the environment; a MultiHostError when they cannot start a run. Touches no device, so
    a command can refuse bad settings before anything else (e.g. the huge-pages restart)."""
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(ENV_COUNT)
    pid = process_id if process_id is not None else _env_int(ENV_ID)
    if address is None and not auto:
        if count not in (None, 1) or pid not in (None, 0):
            raise MultiHostError(f"num_processes={count}, process_id={pid}: expected a "
                                 f"coordinator address too (--coordinator-address or "
                                 f"{ENV_ADDRESS}), or --distributed to auto-detect")
    elif address is not None:
        if count is None or pid is None:
            raise MultiHostError(f"coordinator {address}: expected --num-processes and "
                                 f"--process-id (or {ENV_COUNT} and {ENV_ID}) as well")
        if count < 1 or not 0 <= pid < count:
            raise MultiHostError(f"process_id={pid}, num_processes={count}: expected "
                                 f"0 <= process_id < num_processes")
    return address, count, pid


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Starts `jax.distributed`; returns whether this run is multi-process.

    Without an address (argument or environment) and without `auto`, does nothing (single
    process). Calling it again after a successful start is a no-op.
    """
    address, count, pid = check_settings(coordinator_address, num_processes, process_id,
                                         auto=auto)
    if address is None and not auto:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    # Only the CPU client reads this; TPU/GPU processes talk over ICI/NCCL as usual.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=pid)
    return jax.process_count() > 1


def said_by(text: str, source: int = 0, size: int = 2048) -> str:
    """`text` (its first `size` bytes) as process `source` has it, in every process (a
    collective: all processes call it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode()[:size].ljust(size, b"\0"), np.uint8)
    got = multihost_utils.broadcast_one_to_all(data, is_source=jax.process_index() == source)
    return bytes(got).rstrip(b"\0").decode(errors="replace")


def check_same_start(config_text: str, num_processes: int | None = None,
                     describe: Callable[[str, str], str] | None = None) -> None:
    """Refuses a multi-process run whose processes were not started alike, with the same
    one-line MultiHostError in every process (a collective: all processes call it, after
    `initialize`). Each process loads its own config and overrides, and the coordinator
    alone decides the process count: a process given another seed trained different
    replicas without a word, another mesh crashed in gloo, and another --num-processes
    was ignored. `config_text`: this process's resolved config (e.g. `dump_config`);
    `num_processes`: the count this process was started with (None: auto-detected);
    `describe(process 0's text, the other's)`: how they differ, for the message."""
    n = jax.process_count()
    if n == 1:
        return
    from jax.experimental import multihost_utils

    raw = config_text.encode()
    digest = np.frombuffer(hashlib.sha256(raw).digest(), np.uint8).astype(np.int32)
    mine = np.concatenate([digest, np.asarray([num_processes or 0, len(raw)], np.int32)])
    rows = np.asarray(multihost_utils.process_allgather(mine))  # [process, 34]
    asked = [int(c) for c in rows[:, 32]]
    wrong = [p for p, c in enumerate(asked) if c and c != n]
    if wrong:
        p = wrong[0]
        raise MultiHostError(f"process {p} was started with num_processes={asked[p]} but the "
                             f"run has {n} processes (counted by process 0's coordinator); "
                             f"expected num_processes={n} in every process")
    differ = [p for p in range(n) if (rows[p, :32] != rows[0, :32]).any()]
    if not differ:
        return
    q = differ[0]
    size = int(max(rows[0, 33], rows[q, 33]))
    ours, theirs = said_by(config_text, 0, size), said_by(config_text, q, size)
    how = describe(ours, theirs) if describe else ""
    raise MultiHostError(f"process {q}'s config differs from process 0's"
                         + (f" ({how})" if how else "")
                         + "; expected the same config and overrides in every process")


def batch_rows(batch_sharding: jax.sharding.Sharding, batch_shape: tuple[int, ...],
               process: int | None = None) -> tuple[int, int]:
    """(data shard of `process`, number of data shards): which rows of a global batch of
    `batch_shape` (`[batch, length]`) a process feeds, from where the sharding puts them.

    Usually every process holds its own block of rows (shard = process index). When a mesh
    axis the batch is not split over spans processes (tensor parallelism across hosts, or
    `mesh.rules` mapping `batch` to fewer axes), several processes hold the same rows: they
    read the same shard, and the shards are fewer than the processes. Raises MultiHostError
    when a process's rows are not one block, or the blocks overlap or differ in size.
    """
    process = jax.process_index() if process is None else process
    batch_size = batch_shape[0]
    try:
        where = batch_sharding.devices_indices_map(tuple(batch_shape))
    except ValueError as e:  # e.g. a length the mesh axes it is split over do not divide
        raise MultiHostError(f"a batch of shape {tuple(batch_shape)} cannot be laid out: "
                             f"{' '.join(str(e).split())}") from None
    held: dict[int, list[tuple[int, int]]] = {}  # process -> its devices' row ranges
    for device, index in where.items():
        start, stop, _ = index[0].indices(batch_size)
        held.setdefault(device.process_index, []).append((start, stop))
    if process not in held:
        raise MultiHostError(f"process {process} has no device in the mesh; expected every "
                             "process's devices in it")
    blocks: dict[int, tuple[int, int]] = {}
    for p, ranges in held.items():
        ranges.sort()
        end = ranges[0][0]
        for start, stop in ranges:  # merged: the ranges must leave no gap
            if start > end:
                raise MultiHostError(f"process {p} holds rows {ranges} of the batch: expected "
                                     "one contiguous block per process (check the mesh's "
                                     "device order)")
            end = max(end, stop)
        blocks[p] = (ranges[0][0], end)
    distinct = sorted(set(blocks.values()))
    sizes = {stop - start for start, stop in distinct}
    tiled = all(a[1] == b[0] for a, b in zip(distinct, distinct[1:]))
    if len(sizes) != 1 or not tiled or distinct[0][0] != 0 or distinct[-1][1] != batch_size:
        raise MultiHostError(f"the processes hold the batch rows {distinct} of "
                             f"{batch_size}: expected equal blocks that tile the batch")
    return distinct.index(blocks[process]), len(distinct)

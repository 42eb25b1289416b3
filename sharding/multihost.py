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

import os

import jax

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

"""Checkpoint benchmark: save / restore throughput on local disk, and how much an async save
slows the training steps that run while it is written.

Model: a dense, wide decoder (default: 8 layers, width 1024, MLP 4096, vocab 32768, ~200M
float32 parameters), so the checkpointed TrainState (parameters + two Adam moments) is
~2.4 GB. One process, one CPU device, checkpoints through `jaxmoe.checkpoint.manager` exactly
as `jaxmoe train` writes them (OCDBT + zarr3, no compression unless --compression).

Measured:
  1. baseline step time (mean over --steps steps per repeat, no save in flight);
  2. async save: how long `save` blocks the loop, the wall time until the bytes are on disk
     (-> GB/s), and the steps that ran while the write was in flight: slowdown = (their
     total time + the blocking time) / (as many baseline steps) - 1 (the mean; the median
     step is printed too, but a save that hits a few steps hard costs their total), and the
     same amortised over --every steps (a save every N steps); for TensorStore writer
     threads at normal priority and moved to SCHED_IDLE (what `jaxmoe train` does), each
     saving the state itself or a reused copy of it (`--snapshot`; the copy is what
     `jaxmoe train` saves from on CPU, jaxmoe/checkpoint/snapshot.py: its buffers are
     allocated once before the measurement, as a run does when it starts), in one run;
     and the CPU time (user / system) the writer threads spent per save; and, to tell the
     costs apart, the slowdown of the steps while a *separate* SCHED_IDLE process
     handles the same number of bytes: written the way the zarr3 encoder does (fresh buffer
     per chunk, copy, buffered write, fsync), written with O_DIRECT from one reused buffer
     (no page cache, no fresh memory), and only allocated and filled (nothing written);
  3. synchronous save (GB/s), next to one plain file write + fsync of the same bytes (what
     the disk itself sustains);
  4. restore onto the same sharding, warm (files in the page cache) and cold (their pages
     dropped first with posix_fadvise(DONTNEED), which needs no privileges) (GB/s).

The process restarts itself with glibc malloc's hugetlb tunable, as `jaxmoe train` does
(jaxmoe/hugepages.py; JAXMOE_HUGEPAGES=0 measures without).

All files go into a fresh `bench_checkpoint-XXXXXX` directory created inside --dir (which is
created if missing; default: the system temporary directory); only that directory is deleted
afterwards.

Usage: JAX_PLATFORMS=cpu python tools/bench_checkpoint.py [--dir /tmp]
       [--layers 8] [--width 1024] [--steps 4] [--repeats 2] [--every 100] [--compression]
       [--writer-priority idle|normal|both] [--snapshot on|off|both] [--batch 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint import priority
from jaxmoe.checkpoint.run import abstract_state
from jaxmoe.checkpoint.snapshot import StateSnapshot
from jaxmoe.config import load_config, to_dict
from jaxmoe.hugepages import reexec_with_hugepages
from jaxmoe.staging import remove_scratch_dir, scratch_dir
from jaxmoe.train.loop import build_trainer


def overrides(args: argparse.Namespace) -> list[str]:
    heads = args.width // 128
    return [f"model.vocab_size={args.vocab}", f"model.embed_dim={args.width}",
            f"model.num_layers={args.layers}", f"model.num_heads={heads}",
            f"model.num_kv_heads={heads}", "model.head_dim=128",
            f"model.mlp_dim={4 * args.width}", "model.num_experts=0",
            f"train.batch_size={args.batch}", f"data.seq_len={args.seq}", "train.steps=1000",
            "mesh.data=1"]


def random_batch(vocab: int, seed: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def drop_page_cache(directory: Path) -> None:
    """Evicts the checkpoint's files from the page cache (they were fsynced: pages clean)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_write_seconds(directory: Path, arrays: list[np.ndarray]) -> float:
    """Seconds to write `arrays` to one file and fsync it: what this disk can do."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.writelines(memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


# A separate process at SCHED_IDLE that handles `size` bytes in one of three ways, to tell
# apart what an in-process writer costs the training steps on this machine:
#   buffered  the way TensorStore's zarr3 encoder does (a freshly allocated buffer per 64 MB
#             chunk, filled by a copy, written through the page cache), then fsync;
#   direct    the same bytes from one reused, aligned buffer with O_DIRECT (no page cache,
#             no fresh memory): what the disk's DMA alone costs;
#   touch     only the fresh buffers and the copies, nothing written: what allocating and
#             filling new memory costs.
_EXTERNAL_WRITER = """
import mmap, os, sys
import numpy as np
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
mode, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CHUNK = 64 << 20
chunk = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8)
if mode == "direct":
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    buf[:] = chunk.tobytes()
    try:  # a file system without O_DIRECT may create the file before refusing the flag
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            for start in range(0, size, CHUNK):  # whole aligned chunks; truncated below
                os.write(fd, buf)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(path):
            os.unlink(path)
elif mode == "touch":
    for start in range(0, size, CHUNK):
        buf = np.empty(min(CHUNK, size - start), np.uint8)
        buf[:] = chunk[:buf.size]
        del buf
else:
    with open(path, "wb") as f:
        for start in range(0, size, CHUNK):
            n = min(CHUNK, size - start)
            buf = np.empty(n, np.uint8)
            buf[:] = chunk[:n]
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)
"""
EXTERNAL_MODES = ("buffered", "direct", "touch")


def external_writer_steps(step, mode: str, size: int, directory: Path) -> list[float] | str:
    """Times of the training steps that run while a separate SCHED_IDLE process handles
    `size` bytes in `directory` (`mode`: see _EXTERNAL_WRITER), or why it could not (a file
    system without O_DIRECT, such as tmpfs)."""
    import subprocess
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _EXTERNAL_WRITER, mode, str(size),
                             str(directory / "external.bin")], stderr=subprocess.PIPE)
    times = [step()]  # at least one step overlaps the write
    while proc.poll() is None:
        times.append(step())
    if proc.returncode:
        lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
        if mode == "direct" and lines and "Invalid argument" in lines[-1]:
            return "no O_DIRECT on this file system"
        raise RuntimeError(f"external {mode} writer failed with exit code {proc.returncode}: "
                           f"{lines[-1] if lines else ''}")
    return times


def slowdown(times: list[float], base: float, blocking: float = 0.0) -> float:
    """Extra wall time of `times` (plus `blocking`) over as many baseline steps, as a
    fraction. The mean, not the median: a save that hits a few steps hard costs its total."""
    return (sum(times) + blocking) / (len(times) * base) - 1


def writer_cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds so far of this process's TensorStore writer threads
    (`priority.writer_threads`), from /proc/self/task/<tid>/stat (Linux). A thread that
    exits between two samples takes its time with it, so a difference is a lower bound."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for tid in priority.writer_threads():
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread exited
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def cpu_seconds(per_save) -> str:
    """Mean of per-save CPU times, or "n/a" when a writer thread exited during a save (its
    time left the sum with it, so a difference can even come out negative)."""
    values = list(per_save)
    return "n/a (threads exited)" if min(values) < 0 else f"{statistics.mean(values):.2f} s"


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state)
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


# A fresh directory inside --dir for this run's files, and its removal (nothing else in
# --dir is touched).
make_workdir = functools.partial(scratch_dir, prefix="bench_checkpoint-")
remove_workdir = remove_scratch_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="parent of the run's fresh bench_checkpoint-XXXXXX directory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024, help="a multiple of 128")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="baseline steps per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="async saves measured")
    parser.add_argument("--every", type=int, default=100, help="save interval to amortise")
    parser.add_argument("--compression", action="store_true", help="zstd on every chunk")
    parser.add_argument("--writer-priority", choices=("idle", "normal", "both"), default="both",
                        help="SCHED_IDLE writer threads (what jaxmoe train does), normal, or both")
    parser.add_argument("--snapshot", choices=("on", "off", "both"), default="both",
                        help="save from a reused copy of the state (what jaxmoe train does "
                             "on CPU), from the state itself, or both")
    args = parser.parse_args(argv)
    minimum = {"layers": 1, "width": 128, "vocab": 4, "batch": 1, "seq": 2, "steps": 1,
               "repeats": 1, "every": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            parser.error(f"--{name} {getattr(args, name)}: expected an integer >= {low}")
    if args.width % 128:
        parser.error(f"--width {args.width}: expected a multiple of 128 (heads of width 128)")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir!r}: expected a directory (it is a file)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reexec_with_hugepages()  # see the module docstring
    try:
        root = make_workdir(args.dir)
    except OSError as e:
        print(f"{os.path.basename(__file__)}: error: --dir {args.dir!r}: expected a directory "
              f"this run can create files in ({e.strerror or e})", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        benchmark(args, root)
    finally:
        remove_workdir(root)


def benchmark(args: argparse.Namespace, root: Path) -> None:
    """The measurements, with every file under `root`."""
    cfg = load_config(None, overrides(args))
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    holder = {}
    batch = trainer.put_batch(random_batch(args.vocab, 0, args.batch, args.seq))

    def step() -> float:
        t0 = time.perf_counter()
        with trainer.context():
            holder["state"], metrics = trainer.train_step(holder["state"], batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    with trainer.context():
        holder["state"] = trainer.init()
    size = state_bytes(holder["state"])
    gb = size / 1e9
    print(f"model: {args.layers} layers, width {args.width}; {args.batch}x{args.seq} tokens per "
          f"step; checkpoint {gb:.2f} GB "
          f"({len(jax.tree.leaves(holder['state']))} arrays); dir {root}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    step()  # compile
    manager = ckpt.make_manager(root, keep_last=2, compression=args.compression)
    config = to_dict(cfg)

    priorities = ["normal", "idle"] if args.writer_priority == "both" else [args.writer_priority]
    copies = ["off", "on"] if args.snapshot == "both" else [args.snapshot]
    # "normal" first: threads moved to SCHED_IDLE cannot be moved back
    modes = [f"{p}, snapshot {c}" for p in priorities for c in copies]
    snapshot = StateSnapshot()
    if "on" in copies:  # a run allocates the copy when it starts; measured apart here
        t0 = time.perf_counter()
        jax.block_until_ready(snapshot.take(holder["state"]))
        print(f"snapshot buffers allocated and filled once in {time.perf_counter() - t0:.2f} s",
              flush=True)
        # The next take copies into those buffers with another jitted function: compile it
        # here, not inside the first timed save() (the run's first save does compile it).
        jax.block_until_ready(snapshot.take(holder["state"]))
    baseline = []
    results = {}
    for mode in modes:
        during, blocking, async_wall, cpu = [], [], [], []
        for r in range(args.repeats):
            baseline += [step() for _ in range(args.steps)]
            cpu0 = writer_cpu_seconds()
            t0 = time.perf_counter()
            ckpt.save(manager, 10 * (len(results) * args.repeats + r + 1), holder["state"],
                      config, {"batches": r}, writer_priority=mode.split(",")[0],
                      snapshot=snapshot if mode.endswith("on") else None)
            blocking.append(time.perf_counter() - t0)
            done: list[float] = []
            # A side thread notes when the bytes are on disk; the loop keeps training meanwhile.
            watcher = threading.Thread(target=lambda done=done: (
                manager.wait_until_finished(), done.append(time.perf_counter())))
            watcher.start()
            overlapped = []
            while watcher.is_alive():
                if mode.startswith("idle"):
                    priority.deprioritize_writers()  # as the training loop does every step
                overlapped.append(step())
            watcher.join()
            async_wall.append(done[0] - t0)
            cpu.append(tuple(b - a for a, b in zip(cpu0, writer_cpu_seconds())))
            during += overlapped
            print(f"async save [{mode}] {r + 1}: blocked {blocking[-1]:.3f} s, on disk "
                  f"after {async_wall[-1]:.2f} s, {len(overlapped)} steps ran meanwhile",
                  flush=True)
        results[mode] = (during, blocking, async_wall, cpu)
    # the mean, as for the steps during a save: steps alternate between two times here
    base = statistics.mean(baseline)
    async_rows = []
    for mode, (during, blocking, async_wall, cpu) in results.items():
        n_over = len(during) / args.repeats
        window = slowdown(during, base, sum(blocking)) if during else float("nan")
        window_median = (statistics.median(during) / statistics.median(baseline) - 1) \
            if during else float("nan")
        extra = (sum(during) + sum(blocking)) / args.repeats - n_over * base
        amortised = extra / (args.every * base)
        async_rows += [
            (f"[{mode}] step time while an async save runs (mean)",
             f"{statistics.mean(during):.3f} s" if during else "n/a"),
            (f"[{mode}] save() blocks the loop for (mean)", f"{statistics.mean(blocking):.3f} s"),
            (f"[{mode}] async save, start -> on disk", f"{statistics.mean(async_wall):.2f} s"),
            (f"[{mode}] async save throughput", f"{gb / statistics.mean(async_wall):.2f} GB/s"),
            (f"[{mode}] writer threads' CPU per save, user", cpu_seconds(c[0] for c in cpu)),
            (f"[{mode}] writer threads' CPU per save, system", cpu_seconds(c[1] for c in cpu)),
            (f"[{mode}] slowdown of the steps during the save", f"{100 * window:.1f} %"),
            (f"[{mode}]   the same from the median step", f"{100 * window_median:.1f} %"),
            (f"[{mode}] slowdown amortised over {args.every} steps", f"{100 * amortised:.2f} %"),
        ]

    # --repeats rounds, each running every mode once; a refused mode (no O_DIRECT) says why
    external: dict[str, list[float] | str] = {mode: [] for mode in EXTERNAL_MODES}
    for _ in range(args.repeats):
        for mode in EXTERNAL_MODES:
            if isinstance(external[mode], list):
                got = external_writer_steps(step, mode, size, root / "external")
                external[mode] = got if isinstance(got, str) else external[mode] + got
    for mode, got in external.items():
        value = got if isinstance(got, str) else f"{100 * slowdown(got, base):.1f} %"
        async_rows.append((f"steps during an idle external process, {mode}", value))

    t0 = time.perf_counter()
    ckpt.save(manager, 1000, holder["state"], config, {"batches": 0})
    manager.wait_until_finished()
    sync_s = time.perf_counter() - t0
    raw_s = raw_write_seconds(root / "raw", [np.asarray(x) for x in jax.tree.leaves(
        holder["state"]) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)])
    target = abstract_state(trainer)
    del holder["state"]  # keep peak memory at one state
    restores = {}
    for kind in ("cold", "warm"):
        if kind == "cold":
            drop_page_cache(root / "1000")
        t0 = time.perf_counter()
        restored = ckpt.restore(manager, 1000, target)
        jax.block_until_ready(restored.state)
        restores[kind] = time.perf_counter() - t0
        del restored
    manager.close()
    on_disk = sum(p.stat().st_size for p in (root / "1000").rglob("*") if p.is_file()) / 1e9

    print(f"\ncheckpoint: {gb:.2f} GB of arrays, {on_disk:.2f} GB on disk"
          f"{' (zstd)' if args.compression else ''}")
    print(f"{'measure':<62}{'value':>12}")
    rows = [
        ("baseline step time (mean)", f"{base:.3f} s"),
        ("baseline step time (median)", f"{statistics.median(baseline):.3f} s"),
        *async_rows,
        ("synchronous save throughput", f"{gb / sync_s:.2f} GB/s"),
        ("raw write + fsync of the same bytes", f"{gb / raw_s:.2f} GB/s"),
        ("restore throughput, cold page cache", f"{gb / restores['cold']:.2f} GB/s"),
        ("restore throughput, warm page cache", f"{gb / restores['warm']:.2f} GB/s"),
    ]
    for name, value in rows:
        print(f"{name:<62}{value:>12}")


if __name__ == "__main__":
    from _run import run

    run(main)

"""Where the benchmark training step spends its time on XLA:CPU: ops and thread use.

Profiles the model of `tools/bench_train.py` (or its dense-MLP reference) with
`jax.profiler`, then reports from the trace

- how long 0, 1, 2, ... of XLA's compute threads were busy at once, per step, and what the
  step would take if the busy thread-time were spread evenly over all threads;
- the ops with the most thread-time per step, how much of it ran while every other thread
  was idle, their result shapes and the JAX operation they come from.

    JAX_PLATFORMS=cpu python tools/profile_train.py [--model moe|dense] [--steps 10]
        [--top 20] [key=value ...]

Overrides are jaxmoe config overrides applied on top of the benchmark model's (for example
`model.gmm_block_size=256`). A profile is not a benchmark: the tracer costs a few percent;
compare speeds with `tools/bench_train.py`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from bench_train import BENCH, DENSE, random_batch  # noqa: E402

from jaxmoe.config import ConfigError, load_config  # noqa: E402
from jaxmoe.hugepages import reexec_with_hugepages  # noqa: E402

# Trace events that wrap the ops a thread runs, rather than being one.
WRAPPERS = ("ThunkExecutor::", "SlinkyThreadPool::")
COMPUTE_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")

Event = tuple[int, int, str]  # (start ns, end ns, op name)


def thread_activity(threads: dict[str, list[Event]]):
    """Sweeps the threads' op events.

    Returns (busy: {number of threads running an op at once: ns},
             per_op: {op: [ns of thread-time, ns of it while no other thread ran an op]}).
    Nested events on one thread count for the innermost (latest-started) one.
    """
    marks = []
    for thread, events in threads.items():
        for start, end, name in events:
            if end > start:
                marks.append((start, 1, thread, name, end))
                marks.append((end, 0, thread, name, end))  # 0: ends before starts at a tie
    # At one time: ends first, then starts of the longer events (outer before inner).
    marks.sort(key=lambda m: (m[0], m[1], -m[4] if m[1] else 0))
    active: dict[str, list[str]] = collections.defaultdict(list)
    busy: collections.Counter = collections.Counter()
    per_op: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    last = marks[0][0] if marks else 0
    for t, is_start, thread, name, _ in marks:
        if t > last:
            running = [stack[-1] for stack in active.values() if stack]
            busy[len(running)] += t - last
            for op in running:
                per_op[op][0] += t - last
                if len(running) == 1:
                    per_op[op][1] += t - last
        last = t
        if is_start:
            active[thread].append(name)
        else:
            active[thread].remove(name)
    return dict(busy), dict(per_op)


def trace_events(trace_dir: str) -> dict[str, list[Event]]:
    """{thread: [(start, end, op)]} of XLA's compute threads in a `jax.profiler` trace."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        raise RuntimeError(f"{trace_dir}: no *.xplane.pb written by jax.profiler")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    threads: dict[str, list[Event]] = {}
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith(COMPUTE_THREADS):
                threads[f"{plane.name}/{line.name}"] = [
                    (ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events
                    if not ev.name.startswith(WRAPPERS)]
    return threads


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (result shape, JAX op_name)} from an optimized HLO module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), src.group(1) if src else "")
    return ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", choices=("moe", "dense"), default="moe",
                        help="the benchmark MoE model or its dense-MLP reference")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (>= 1)")
    parser.add_argument("--top", type=int, default=20, help="ops listed (>= 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    for flag in ("steps", "top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: expected an integer >= 1")
    given = {o.split("=", 1)[0] for o in args.overrides}  # these replace the benchmark's
    base = [o for o in (BENCH if args.model == "moe" else DENSE)
            if o.split("=", 1)[0] not in given]
    try:
        cfg = load_config(None, base + ["model.dispatch=dropless", *args.overrides])
    except ConfigError as e:
        parser.error(str(e))
    reexec_with_hugepages()  # as bench_train does: the step it measures runs with them

    from jaxmoe.train.loop import build_trainer

    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    with trainer.context(), tempfile.TemporaryDirectory(prefix="profile_train-") as trace_dir:
        state = trainer.init()
        batch = trainer.put_batch(random_batch(  # of the overridden sizes too
            0, cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size))
        hlo = trainer.train_step.lower(state, batch).compile().as_text()

        def steps(n: int) -> float:
            nonlocal state
            t0 = time.perf_counter()
            for _ in range(n):
                state, metrics = trainer.train_step(state, batch)
                jax.block_until_ready(metrics)
            return (time.perf_counter() - t0) / n

        steps(3)  # compile and warm up
        untraced = steps(args.steps)
        with jax.profiler.trace(trace_dir):
            traced = steps(args.steps)
        threads = trace_events(trace_dir)
    busy, per_op = thread_activity(threads)
    n = args.steps
    work = sum(k * v for k, v in busy.items())
    cores = len(os.sched_getaffinity(0))
    print(f"{args.model} step: {untraced * 1e3:.1f} ms untraced, {traced * 1e3:.1f} ms traced; "
          f"{len(threads)} compute threads, {work / n / 1e6:.1f} thread-ms of ops per step")
    print("threads running an op at once, ms per step: " + ", ".join(
        f"{k}: {v / n / 1e6:.1f}" for k, v in sorted(busy.items())))
    print(f"the same thread-time spread evenly over the {cores} cores: "
          f"{work / cores / n / 1e6:.1f} ms per step")
    ops = hlo_ops(hlo)
    print("\n| op | result | thread-ms / step | alone | from |\n|---|---|---:|---:|---|")
    for name, (total, alone) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:args.top]:
        shape, src = ops.get(name, ("?", ""))
        src = re.sub(r"^jit\([^)]*\)/", "", src)
        print(f"| {name} | {shape} | {total / n / 1e6:.2f} | {alone / n / 1e6:.2f} | "
              f"{src[-70:]} |")


if __name__ == "__main__":
    from _run import run

    run(main)

"""Input-pipeline throughput: tokens/s with 0/1/2 grain workers, packing vs padding efficiency.

    JAX_PLATFORMS=cpu python tools/bench_input.py --batches 200 --workers 0,1,2 seq_len=1024

Prints a markdown table; the last row is a one-line summary for docs. Tokens/s counts real
(non-padding) tokens delivered to the caller, measured after the first batch (worker start-up
excluded). `--workers` is a comma-separated list of grain worker counts (the padded row uses
the first). Extra `key=value` arguments override DataConfig fields as `data.key=value` does
for `jaxmoe train` (YAML 1.2 values, e.g. seq_len=1024 or source=jsonl paths=[a.jsonl,b.jsonl]).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import DataConfig, make_dataset
from jaxmoe.config import ConfigError, load_config


def measure(cfg: DataConfig, batch_size: int, batches: int) -> dict[str, float]:
    it = make_dataset(cfg, split="train", batch_size=batch_size, seed=0)
    try:
        next(it)  # start-up (worker processes, first read) is not throughput
        before = it.stats()
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
        after = it.stats()
    finally:
        it.close()
    real, slots = after.real_tokens - before.real_tokens, after.slots - before.slots
    return {"tokens_per_s": real / seconds, "slots_per_s": slots / seconds,
            "efficiency": real / slots, "seconds": seconds}


def worker_counts(text: str) -> list[int]:
    """`--workers 0,1,2` -> [0, 1, 2] (argparse type: one-line error on bad input)."""
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(w < 0 for w in counts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of integers >= 0, e.g. 0,1,2")
    return counts


def parse_overrides(p: argparse.ArgumentParser, overrides: list[str]) -> DataConfig:
    """DataConfig from `key=value` overrides, read as `jaxmoe train` reads `data.key=value`
    (YAML 1.2 values, types checked); bad input -> p.error (one line, exit 2)."""
    for o in overrides:
        if "=" not in o:
            p.error(f"override {o!r}: expected key=value with key a DataConfig field")
    try:
        return load_config(None, [f"data.{o}" for o in overrides]).data
    except ConfigError as e:
        p.error(" ".join(str(e).split()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--batches", type=int, default=200, help="timed batches (>= 1)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size",
                   type=int, default=32)
    p.add_argument("--workers", type=worker_counts, default=[0, 1, 2],
                   help="comma-separated grain worker counts, e.g. 0,1,2")
    p.add_argument("overrides", nargs="*", help="DataConfig key=value overrides")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error(f"--batches {args.batches}: expected an integer >= 1")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    base = parse_overrides(p, args.overrides)
    print(f"config: source={base.source} tokenizer={base.tokenizer} seq_len={base.seq_len} "
          f"batch={args.batch_size} batches={args.batches} cpus={os.cpu_count()}")
    print("| mode | workers | tokens/s (real) | slots/s | packing efficiency |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for packing in (True, False):
        for workers in args.workers if packing else args.workers[:1]:
            cfg = dataclasses.replace(base, packing=packing, num_workers=workers)
            try:
                r = measure(cfg, args.batch_size, args.batches)
            except (ValueError, OSError, StopIteration) as e:
                msg = " ".join(str(e).split()) or "the dataset ended before the timed batches"
                print(f"{p.prog}: error: {msg}", file=sys.stderr)
                return 2
            results[(packing, workers)] = r
            print(f"| {'packed' if packing else 'padded'} | {workers} | "
                  f"{r['tokens_per_s']:,.0f} | {r['slots_per_s']:,.0f} | "
                  f"{r['efficiency']:.1%} |", flush=True)
    packed = {w: results[(True, w)] for w in args.workers}
    padded = results[(False, args.workers[0])]
    row = " | ".join(f"{packed[w]['tokens_per_s'] / 1e3:,.0f}k tok/s ({w}w)" for w in args.workers)
    print(f"\nsummary row: | input pipeline (seq_len {base.seq_len}, batch {args.batch_size}) | "
          f"{row} | packing {packed[args.workers[0]]['efficiency']:.1%} vs padding "
          f"{padded['efficiency']:.1%} |")
    return 0


if __name__ == "__main__":
    from _run import run

    run(main)

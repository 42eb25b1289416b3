"""Input-pipeline throughput: tokens/s with 0/1/2 grain workers, packing vs padding efficiency.

    JAX_PLATFORMS=cpu python tools/bench_input.py --batches 200 --workers 0 1 2

Prints a markdown table; the last row is a one-line summary for docs. Tokens/s counts real
(non-padding) tokens delivered to the caller, measured after the first batch (worker start-up
excluded). Extra `key=value` arguments override DataConfig fields (e.g. seq_len=1024).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import DataConfig, make_dataset


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("overrides", nargs="*", help="DataConfig key=value overrides")
    args = p.parse_args(argv)
    kw = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    base = DataConfig(**kw)
    print(f"config: source={base.source} tokenizer={base.tokenizer} seq_len={base.seq_len} "
          f"batch={args.batch_size} batches={args.batches} cpus={os.cpu_count()}")
    print("| mode | workers | tokens/s (real) | slots/s | packing efficiency |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for packing in (True, False):
        for workers in args.workers if packing else args.workers[:1]:
            cfg = dataclasses.replace(base, packing=packing, num_workers=workers)
            r = measure(cfg, args.batch_size, args.batches)
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
    sys.exit(main())

"""Training step with and without transparent huge pages for malloc (glibc `hugetlb` tunable).

XLA:CPU allocates each execution's temporary buffer afresh (about 105 MB for the
tools/bench_train.py model). It is larger than a glibc thread arena's heap, so malloc maps it
with mmap and unmaps it after the step: every step touches ~26,000 fresh 4 KiB pages, each a
page fault that zeroes a page. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc ask for
transparent huge pages (madvise) on such mappings: 2 MiB per fault instead of 4 KiB. The
tunable is read when a process starts, so each measurement runs in its own child process;
settings alternate round by round (the machine is shared and noisy: compare the ratios).

Rows: the jaxmoe default (dropless, blocks) step of tools/bench_train.py and transformers'
Mixtral in bfloat16 on the same model, with minor page faults per step (getrusage).

Usage: JAX_PLATFORMS=cpu python tools/bench_hugepages.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TUNABLE = "glibc.malloc.hugetlb=1"


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(step, steps: int) -> dict:
    """Median seconds per step and mean minor faults per step, after two warm-up steps."""
    step()
    step()
    times, f0 = [], _faults()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "faults": (_faults() - f0) / steps}


def child(which: str, steps: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_train as bt

    if which == "torch":
        return _measure(bt.torch_mixtral_step("bfloat16"), steps)
    import jax

    from jaxmoe.config import load_config
    from jaxmoe.train.loop import build_trainer

    trainer = build_trainer(load_config(None, bt.BENCH + ["model.dispatch=dropless"]),
                            devices=jax.devices()[:1])
    with trainer.context():
        holder = {"state": trainer.init()}
        batch = trainer.put_batch(bt.random_batch(0))

        def step():
            holder["state"], m = trainer.train_step(holder["state"], batch)
            jax.block_until_ready(m)
        return _measure(step, steps)


def run_child(which: str, steps: int, hugepages: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("GLIBC_TUNABLES", None)
    if hugepages:
        env["GLIBC_TUNABLES"] = TUNABLE
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which,
                          "--steps", str(steps)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {which} (hugepages={hugepages}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=("jaxmoe", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds {args.rounds} --steps {args.steps}: expected both >= 1")
    if os.environ.get("GLIBC_TUNABLES"):
        print(f"note: GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']!r} is replaced in the "
              "children (off, or exactly the hugetlb tunable)")
    results = {(w, h): [] for w in ("jaxmoe", "torch") for h in (False, True)}
    for r in range(args.rounds):
        for which in ("jaxmoe", "torch"):
            for hugepages in ((False, True) if r % 2 == 0 else (True, False)):
                res = run_child(which, args.steps, hugepages)
                results[(which, hugepages)].append(res)
                print(f"round {r + 1}/{args.rounds} {which:6s} hugepages={hugepages!s:5s} "
                      f"{res['seconds'] * 1e3:7.1f} ms/step {res['faults']:9,.0f} faults/step",
                      flush=True)

    def med(which, hugepages, key):
        return statistics.median(x[key] for x in results[(which, hugepages)])

    print(f"\n{datetime.date.today()}  `JAX_PLATFORMS=cpu python tools/bench_hugepages.py "
          f"--rounds {args.rounds} --steps {args.steps}`  ({os.cpu_count()} cores; medians "
          "over rounds)\n")
    print("| run | step (ms), default | step (ms), hugetlb=1 | speed-up | faults/step, "
          "default | faults/step, hugetlb=1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for which, name in (("jaxmoe", "jaxmoe dropless, blocks (bf16)"),
                        ("torch", "transformers Mixtral (bfloat16)")):
        off, on = med(which, False, "seconds"), med(which, True, "seconds")
        print(f"| {name} | {off * 1e3:.1f} | {on * 1e3:.1f} | {off / on:.2f}x | "
              f"{med(which, False, 'faults'):,.0f} | {med(which, True, 'faults'):,.0f} |")
    ratio_off = med("torch", False, "seconds") / med("jaxmoe", False, "seconds")
    ratio_on = med("torch", True, "seconds") / med("jaxmoe", True, "seconds")
    print(f"\njaxmoe vs transformers (tokens/s ratio): {ratio_off:.2f}x default, "
          f"{ratio_on:.2f}x with hugetlb=1 in both")


if __name__ == "__main__":
    main()

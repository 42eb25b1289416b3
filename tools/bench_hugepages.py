"""Training step with and without transparent huge pages for malloc (glibc `hugetlb` tunable).

Why it matters is in jaxmoe/hugepages.py (`jaxmoe train` restarts itself with the tunable);
results in docs/benchmarks.md. The tunable is read when a process starts, so each
measurement runs in its own child process; settings alternate round by round (the machine
is shared and noisy: compare the ratios).

Rows: the jaxmoe default (dropless, blocks) step of tools/bench_train.py and transformers'
Mixtral in bfloat16 on the same model, with minor page faults per step (getrusage).

Usage: JAX_PLATFORMS=cpu python tools/bench_hugepages.py [--rounds 3] [--steps 20]
       [--setting TUNABLES ...] [--no-torch]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

from jaxmoe.hugepages import TUNABLE


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


def _thp_modes() -> str:
    """The kernel's THP `enabled` and `defrag` modes (the bracketed entries), or 'n/a'."""
    modes = []
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                text = f.read()
            modes.append(f"{name}={text[text.index('[') + 1:text.index(']')]}")
        except (OSError, ValueError):
            modes.append(f"{name}=n/a")
    return " ".join(modes)


def run_child(which: str, steps: int, tunables: str) -> dict:
    """Runs `child` in a fresh process with GLIBC_TUNABLES=tunables ("" = glibc defaults)."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which,
                          "--steps", str(steps)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {which} (GLIBC_TUNABLES={tunables!r}) failed:\n"
                         f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--setting", action="append", dest="settings", metavar="TUNABLES",
                        help="a GLIBC_TUNABLES value to compare ('' = glibc defaults); "
                             f"repeatable; default: '' and {TUNABLE!r}")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--child", choices=("jaxmoe", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds {args.rounds} --steps {args.steps}: expected both >= 1")
    settings = args.settings or ["", TUNABLE]
    if len(settings) < 2 or len(set(settings)) != len(settings):
        raise SystemExit(f"--setting {settings}: expected at least two different values")
    if os.environ.get("GLIBC_TUNABLES"):
        print(f"note: GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']!r} is replaced in the "
              "children by each --setting")
    workloads = ("jaxmoe",) if args.no_torch else ("jaxmoe", "torch")
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"{e}: install the dev extra (torch, transformers) or pass "
                             "--no-torch")
    results = {(w, t): [] for w in workloads for t in settings}
    for r in range(args.rounds):
        order = settings if r % 2 == 0 else settings[::-1]
        for which in workloads:
            for tunables in order:
                res = run_child(which, args.steps, tunables)
                results[(which, tunables)].append(res)
                print(f"round {r + 1}/{args.rounds} {which:6s} {tunables or 'default':60s} "
                      f"{res['seconds'] * 1e3:7.1f} ms/step {res['faults']:9,.0f} faults/step",
                      flush=True)

    def med(which, tunables, key):
        return statistics.median(x[key] for x in results[(which, tunables)])

    print(f"\n{datetime.date.today()}  `JAX_PLATFORMS=cpu python tools/bench_hugepages.py "
          f"--rounds {args.rounds} --steps {args.steps}"
          + "".join(f" --setting {shlex.quote(t)}" for t in args.settings or [])
          + (" --no-torch" if args.no_torch else "")
          + f"`  ({os.cpu_count()} cores; {' '.join(platform.libc_ver())}; THP "
          f"{_thp_modes()}; medians over rounds; speed-up vs the first setting)\n")
    print("| run | GLIBC_TUNABLES | step (ms) | speed-up | faults/step |")
    print("|---|---|---:|---:|---:|")
    names = {"jaxmoe": "jaxmoe dropless, blocks (bf16)", "torch": "transformers Mixtral (bf16)"}
    for which in workloads:
        first = med(which, settings[0], "seconds")
        for tunables in settings:
            sec = med(which, tunables, "seconds")
            print(f"| {names[which]} | {tunables or 'default'} | {sec * 1e3:.1f} | "
                  f"{first / sec:.2f}x | {med(which, tunables, 'faults'):,.0f} |")
    if "torch" in workloads:
        for tunables in settings:
            ratio = med("torch", tunables, "seconds") / med("jaxmoe", tunables, "seconds")
            print(f"\njaxmoe vs transformers (tokens/s ratio), {tunables or 'default'} in both: "
                  f"{ratio:.2f}x", end="")
        print()


if __name__ == "__main__":
    from _run import run

    run(main)

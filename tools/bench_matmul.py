"""Matmul-path benchmark on XLA:CPU: why `jaxmoe/model/matmul.py` exists.

Measured side by side in one process (compare ratios; the machine is shared):
  1. [1024, 256] x [256, 512] with bfloat16 inputs: bfloat16 result, float32 result
     (`preferred_element_type`), and float32 inputs;
  2. the weight gradient x^T dy (x [1024, 256], dy [1024, 512]): one contracted leading
     dimension as autodiff writes it, and split in two as `matmul.einsum` does on CPU;
  3. a SwiGLU MLP (x [4, 256, 256], width 512), forward + gradient: `jnp.einsum` with float32
     accumulation under autodiff vs `jaxmoe.model.matmul.einsum` (explicit bf16 backward).

Usage: JAX_PLATFORMS=cpu python tools/bench_matmul.py [--steps 30]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmoe.model.matmul import einsum  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def seconds(fn, *args, steps: int) -> float:
    """Median seconds per call after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def swiglu(contract):
    def mlp(x, wg, wu, wd):
        x, wg, wu, wd = (a.astype(BF16) for a in (x, wg, wu, wd))
        h = jax.nn.silu(contract("bli,io->blo", x, wg)) * contract("bli,io->blo", x, wu)
        return contract("blf,fo->blo", h.astype(BF16), wd).astype(F32)
    return jax.jit(jax.grad(lambda *a: jnp.sum(mlp(*a) ** 2), argnums=(0, 1, 2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    m, k, n = 1024, 256, 512
    x = jnp.asarray(rng.normal(size=(m, k)), BF16)
    w = jnp.asarray(rng.normal(size=(k, n)), BF16)
    dy = jnp.asarray(rng.normal(size=(m, n)), BF16)
    flops = 2 * m * k * n
    rows = []

    def dot(lhs, rhs, dims, out=None):
        return jax.lax.dot_general(lhs, rhs, (dims, ((), ())), preferred_element_type=out)

    cases = [
        ("x @ w, bf16 inputs, bf16 result", lambda a, b: a @ b, (x, w)),
        ("x @ w, bf16 inputs, f32 result", lambda a, b: dot(a, b, ((1,), (0,)), F32), (x, w)),
        ("x @ w, f32 inputs", lambda a, b: a @ b, (x.astype(F32), w.astype(F32))),
        ("x^T dy, leading dim contracted (autodiff)",
         lambda a, b: dot(a, b, ((0,), (0,)), F32), (x, dy)),
        ("x^T dy, split in two (matmul.einsum on CPU)",
         lambda a, b: dot(a.reshape(2, m // 2, k), b.reshape(2, m // 2, n), ((0, 1), (0, 1)),
                          F32), (x, dy)),
    ]
    for name, fn, fn_args in cases:
        s = seconds(jax.jit(fn), *fn_args, steps=args.steps)
        rows.append((name, s, flops / s))

    def autodiff_einsum(spec, a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=F32).astype(a.dtype)

    mlp_args = [jnp.asarray(rng.normal(size=s) * 0.05, F32)
                for s in ((4, 256, 256), (256, 512), (256, 512), (512, 256))]
    mlp_flops = 3 * 3 * 2 * 1024 * 256 * 512  # three matmuls, forward + two gradients each
    for name, contract in (("SwiGLU fwd+grad, jnp.einsum f32-acc + autodiff", autodiff_einsum),
                           ("SwiGLU fwd+grad, matmul.einsum (explicit VJP)", einsum)):
        s = seconds(swiglu(contract), *mlp_args, steps=args.steps)
        rows.append((name, s, mlp_flops / s))

    print(f"\n{datetime.date.today()}  `JAX_PLATFORMS=cpu python tools/bench_matmul.py "
          f"--steps {args.steps}`  (jax {jax.__version__}, {os.cpu_count()} cores)\n")
    print("| case | ms | GFLOP/s |")
    print("|---|---:|---:|")
    for name, s, rate in rows:
        print(f"| {name} | {s * 1e3:.3f} | {rate / 1e9:,.0f} |")


if __name__ == "__main__":
    main()

"""Matmul-path benchmark on XLA:CPU: why `jaxmoe/model/matmul.py` exists.

Measured side by side in one process (compare ratios; the machine is shared):
  1. [1024, 256] x [256, 512] with bfloat16 inputs: bfloat16 result, float32 result
     (`preferred_element_type`), and float32 inputs;
  2. the weight gradient x^T dy (x [1024, 256], dy [1024, 512]): one contracted leading
     dimension as autodiff writes it, and split in two as `matmul.einsum` does on CPU;
  3. a SwiGLU MLP (x [4, 256, 256], width 512), forward + gradient: `jnp.einsum` with float32
     accumulation under autodiff vs `jaxmoe.model.matmul.einsum` (explicit bf16 backward);
  4. the MoE block matmul of the benchmark model, [35 blocks, 64 rows, 256] x per-block
     weights [35, 256, 512], with the token block as the first operand (as
     `moe/block_swiglu.py` does) or the weights first ([35, 512, 256] x [35, 64, 256] ->
     [35, 512, 64]), next to one dense [2240, 256] x [256, 512] matmul of the same FLOPs;
  5. attention scores after rotary embeddings, [4, 256, 4, 64] q/k: rope, transpose to
     [b, heads, t, d], then QK^T (the old layout: XLA runs the matmul on float32 operands)
     vs projections that write heads-major directly (`jaxmoe/model/attention.py`);
  6. the attention core (QK^T, masked softmax, PV) forward + gradient, [4, 4 heads, 256, 64]
     with a packed causal mask: the softmax under autodiff (its backward reduces over the
     [t, s] scores) vs `attention.dot_product_attention` (written-out backward, row sums
     from the output);
  7. the expert SwiGLU of one MoE layer, forward + gradient: `moe/block_swiglu.py` over
     35 blocks of 64 rows, 9 of 256, and the default two sizes (`dropless.block_tiers`: 5 of
     256 + 15 of 64), vs four dense SwiGLUs over static groups of 512 rows (perfectly
     balanced experts known at compile time; on the AMX host of session 5 this was 2x faster
     than 35 blocks of 64, on a host without bf16 units 9 blocks of 256 match it).

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


def attention_rows(rng: np.random.Generator, steps: int) -> list[tuple[str, float, float]]:
    """Rope + QK^T with a transpose after the rope vs heads-major projections."""
    b, t, h, d, e = 4, 256, 4, 64, 256
    x = jnp.asarray(rng.normal(size=(b, t, e)), BF16)
    wq, wk = (jnp.asarray(rng.normal(size=(e, h, d)) * 0.05, BF16) for _ in range(2))
    angles = np.arange(t)[None, :, None] * (1e-4 ** (np.arange(d // 2) / (d // 2)))
    cos = jnp.asarray(np.broadcast_to(np.cos(angles), (b, t, d // 2)), F32)
    sin = jnp.asarray(np.broadcast_to(np.sin(angles), (b, t, d // 2)), F32)

    def rope(q, cos, sin):
        q1, q2 = jnp.split(q.astype(F32), 2, -1)
        return jnp.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], -1).astype(BF16)

    def transposed(x, wq, wk, cos, sin):
        q, k = (jnp.einsum("ble,enh->blnh", x, w, preferred_element_type=F32).astype(BF16)
                for w in (wq, wk))
        q, k = (rope(a, cos[:, :, None], sin[:, :, None]).transpose(0, 2, 1, 3) for a in (q, k))
        return jnp.einsum("bnqd,bnsd->bnqs", q, k, preferred_element_type=F32)

    def heads_major(x, wq, wk, cos, sin):
        q, k = (jnp.einsum("ble,enh->bnlh", x, w, preferred_element_type=F32).astype(BF16)
                for w in (wq, wk))
        q, k = (rope(a, cos[:, None], sin[:, None]) for a in (q, k))
        return jnp.einsum("bnqd,bnsd->bnqs", q, k, preferred_element_type=F32)

    flops = 2 * 2 * b * t * e * h * d + 2 * b * h * t * t * d
    rows = []
    for name, fn in (("rope + transpose + QK^T (old attention layout)", transposed),
                     ("rope + QK^T, heads-major projections (attention.py)", heads_major)):
        s = seconds(jax.jit(fn), x, wq, wk, cos, sin, steps=steps)
        rows.append((name, s, flops / s))
    return rows


def attention_backward_rows(rng: np.random.Generator, steps: int):
    """Attention core forward + gradient: autodiff of the softmax vs the written-out VJP."""
    from jaxmoe.model.attention import _attend, attention_mask, dot_product_attention

    b, n, t, d = 4, 4, 256, 64
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, t, d)), BF16) for _ in range(3))
    r = jnp.asarray(rng.normal(size=(b, n, t, d)), F32)
    segments = np.repeat(np.arange(1, 5), t // 4)[None].repeat(b, 0)
    mask = attention_mask(jnp.asarray(segments))

    def autodiff(q, k, v, mask):  # the same forward, its softmax left to autodiff
        return _attend(q, k, v, mask)[0]

    flops = 6 * 2 * b * n * t * t * d  # QK^T and PV forward, four matmuls backward
    rows = []
    for name, fn in (("attention core fwd+grad, softmax under autodiff", autodiff),
                     ("attention core fwd+grad, written-out backward (attention.py)",
                      dot_product_attention)):
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(
            fn(q, k, v, mask).astype(F32) * r), argnums=(0, 1, 2)))
        s = seconds(grad, q, k, v, steps=steps)
        rows.append((name, s, flops / s))
    return rows


def expert_swiglu_rows(rng: np.random.Generator, steps: int):
    """Expert SwiGLU fwd+grad: row blocks with per-block weights vs static dense groups."""
    from jaxmoe.model.moe.dropless import block_tiers, tiered_swiglu

    experts, embed, mlp, rows = 4, 256, 512, 2048
    rows_per = rows // experts
    ws = [jnp.asarray(rng.normal(size=s) * 0.05, F32)
          for s in ((experts, embed, mlp), (experts, embed, mlp), (experts, mlp, embed))]
    slots = 9 * 256  # the largest layout below
    x = jnp.asarray(rng.normal(size=(slots, embed)), BF16)
    r = jnp.asarray(rng.normal(size=(slots, embed)), F32)

    def blocks(tiers):  # tiers: ((block rows, blocks), ...), blocks spread evenly over experts
        n = sum(blk * nb for blk, nb in tiers)
        groups = [jnp.asarray(np.arange(nb) * experts // nb, jnp.int32) for _, nb in tiers]

        def fn(x, *ws):
            y = tiered_swiglu(x[:n], tiers, groups, *(w.astype(BF16) for w in ws))
            return jnp.sum(y.astype(F32) * r[:n])
        return fn

    def static_groups(x, *ws):
        wg, wu, wd = (w.astype(BF16) for w in ws)
        ys = []
        for e in range(experts):
            xe = x[e * rows_per:(e + 1) * rows_per]
            h = jax.nn.silu(einsum("ri,io->ro", xe, wg[e], out_dtype=F32))
            h = h * einsum("ri,io->ro", xe, wu[e], out_dtype=F32)
            ys.append(einsum("rf,fo->ro", h.astype(BF16), wd[e]))
        return jnp.sum(jnp.concatenate(ys).astype(F32) * r[:experts * rows_per])

    two = block_tiers(rows, experts)  # the default layout: ((256, 5), (64, 15))
    out = []
    useful = 3 * 3 * 2 * experts * rows_per * embed * mlp  # the 2,048 routed rows' FLOPs
    for name, fn in (
            ("expert SwiGLU fwd+grad, 35 blocks x 64 rows (one size)", blocks(((64, 35),))),
            ("expert SwiGLU fwd+grad, 9 blocks x 256 rows (one size, 2,304 slots)",
             blocks(((256, 9),))),
            (f"expert SwiGLU fwd+grad, {' + '.join(f'{n} x {b}' for b, n in two)} rows "
             "(two sizes, the default)", blocks(two)),
            ("expert SwiGLU fwd+grad, 4 static dense groups x 512 rows", static_groups)):
        grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
        s = seconds(grad, x, *ws, steps=steps)
        out.append((name, s, useful / s))  # the blocks' padding rows count as no work
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=30, help="timed calls per row (>= 1)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected an integer >= 1")
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

    nb, blk = 35, 64
    xb = jnp.asarray(rng.normal(size=(nb, blk, k)), BF16)
    wb = jnp.asarray(rng.normal(size=(nb, k, n)), BF16)
    wbt = jnp.swapaxes(wb, 1, 2)
    block_flops = 2 * nb * blk * k * n
    for name, fn, fn_args in (
            ("MoE blocks: token block first, nbi,nio->nbo", "nbi,nio->nbo", (xb, wb)),
            ("MoE blocks: weights first, noi,nbi->nob", "noi,nbi->nob", (wbt, xb)),
            ("dense [2240, 256] x [256, 512] (same FLOPs)", "ri,io->ro",
             (xb.reshape(-1, k), wb[0]))):
        s = seconds(jax.jit(lambda a, b, spec=fn: jnp.einsum(spec, a, b,
                                                              preferred_element_type=F32)),
                    *fn_args, steps=args.steps)
        rows.append((name, s, block_flops / s))

    rows += attention_rows(rng, args.steps)
    rows += attention_backward_rows(rng, args.steps)
    rows += expert_swiglu_rows(rng, args.steps)

    print(f"\n{datetime.date.today()}  `JAX_PLATFORMS=cpu python tools/bench_matmul.py "
          f"--steps {args.steps}`  (jax {jax.__version__}, {os.cpu_count()} cores)\n")
    print("| case | ms | GFLOP/s |")
    print("|---|---:|---:|")
    for name, s, rate in rows:
        print(f"| {name} | {s * 1e3:.3f} | {rate / 1e9:,.0f} |")


if __name__ == "__main__":
    from _run import run

    run(main)

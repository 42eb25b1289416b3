"""Training-step benchmark: jaxmoe vs a bf16 matmul roofline vs Hugging Face transformers.

Measured side by side in one process (the machine is shared and noisy; compare ratios):
  1. tokens/s and step time of a Mixtral-layout model (2 layers, 4 experts top-2, width 256,
     4 heads x 64, expert width 512, vocab 1024, seq 256, batch 4, AdamW) in jaxmoe, for the
     dropless and capacity dispatch paths (bf16 compute, float32 params);
  2. compiled FLOPs of one step (XLA cost analysis, layers unrolled and no remat so nothing is
     counted once or twice) over the analytic model FLOPs (6 x active params x tokens +
     attention), per dispatch path;
  3. achieved model FLOP/s over the FLOP/s of the host's fastest large matmul, measured in the
     same run: a 2048^2 bf16 matmul accumulated in float32 (the fast path on CPUs with bf16
     matrix units, AMX or AVX512-BF16) or the same in float32, whichever is faster here; the
     CPU's bf16 features are printed with it (without them bf16 operands are widened to float32);
  4. the same model trained in transformers (torch CPU, float32 and bfloat16 autocast);
  5. for reference, the model with a dense MLP of the active expert width instead of the MoE,
     and both models with float32 compute (for CPUs without bf16 matrix units).

The process restarts itself with glibc malloc's hugetlb tunable, as `jaxmoe train` does
(jaxmoe/hugepages.py; JAXMOE_HUGEPAGES=0 measures without; tools/bench_hugepages.py measures
the difference).

Usage: JAX_PLATFORMS=cpu python tools/bench_train.py [--steps 20] [--no-torch]
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

from jaxmoe.config import load_config  # noqa: E402
from jaxmoe.hugepages import reexec_with_hugepages  # noqa: E402
from jaxmoe.model.moe.dropless import block_tiers  # noqa: E402
from jaxmoe.model.params import training_flops_per_token  # noqa: E402
from jaxmoe.train.loop import build_trainer  # noqa: E402

BENCH = ["model.vocab_size=1024", "model.embed_dim=256", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=64",
         "model.num_experts=4", "model.num_experts_per_tok=2", "model.expert_mlp_dim=512",
         "model.aux_loss_coef=0.01", "model.z_loss_coef=0", "train.batch_size=4",
         "data.seq_len=256", "train.steps=1000", "mesh.data=1"]
BATCH, SEQ, VOCAB = 4, 256, 1024


def random_batch(seed: int, batch: int = BATCH, seq: int = SEQ,
                 vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Random token ids in [3, vocab), one document per row: `[batch, seq]` each."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def time_it(fn, steps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_flops_per_s(n: int = 2048, steps: int = 10, dtype=jnp.bfloat16) -> float:
    """FLOP/s of an n x n matmul with `dtype` operands accumulated in float32 (for bf16 the fast
    library path; with a bfloat16 *result* XLA:CPU takes a ~6x slower path, which an earlier
    version used)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / time_it(lambda: f(a).block_until_ready(), steps)


def cpu_bf16_features(cpuinfo: str | None = None) -> str:
    """The bf16 matrix features among the CPU's flags (Linux /proc/cpuinfo), e.g.
    "amx_bf16 amx_tile avx512_bf16", "none", or "unknown" where there is no cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return "unknown"
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            found = sorted({f for f in flags if f.startswith("amx") or f == "avx512_bf16"})
            return " ".join(found) or "none"
    return "unknown"


# The same model with one dense SwiGLU MLP of the active expert width (2 x 512) in place of
# the MoE: what the step would cost if routing and grouped matmuls were free.
DENSE = [o for o in BENCH if not o.startswith(("model.num_experts", "model.expert_mlp_dim",
                                                "model.aux_loss_coef"))]
DENSE += ["model.num_experts=0", "model.mlp_dim=1024"]


def jaxmoe_step(dispatch: str, steps: int, extra: list[str] = (), base: list[str] = BENCH) -> dict:
    cfg = load_config(None, base + [f"model.dispatch={dispatch}", "model.capacity_factor=1.25",
                                    *extra])
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    with trainer.context():
        state = trainer.init()
        batch = trainer.put_batch(random_batch(0))
        holder = {"state": state}

        def step():
            holder["state"], m = trainer.train_step(holder["state"], batch)
            jax.block_until_ready(m)
        seconds = time_it(step, steps)
    return {"cfg": cfg, "seconds": seconds, "tokens_per_s": BATCH * SEQ / seconds}


def compiled_flops(dispatch: str, extra: list[str] = ()) -> tuple[float, float]:
    """(XLA-counted FLOPs of one step, analytic model FLOPs of one step)."""
    cfg = load_config(None, BENCH + [f"model.dispatch={dispatch}", "model.scan_layers=false",
                                     "model.remat=none", *extra])
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    with trainer.context():
        state = jax.eval_shape(trainer.init)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch(0).items()}
        compiled = trainer.train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = training_flops_per_token(cfg.model, SEQ)["total"] * BATCH * SEQ
    return float(cost["flops"]), analytic


def torch_mixtral(steps: int, dtype: str) -> float:
    """tokens/s of transformers' Mixtral (eager) training with AdamW on CPU."""
    return BATCH * SEQ / time_it(torch_mixtral_step(dtype), steps)


def torch_mixtral_step(dtype: str):
    """One training step of transformers' Mixtral (eager, AdamW, CPU) as a function."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf = MixtralConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=SEQ, output_router_logits=True,
                       router_aux_loss_coef=0.01, attn_implementation="eager")
    model = MixtralForCausalLM(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, VOCAB, (BATCH, SEQ))).long()

    def step():
        opt.zero_grad()
        if dtype == "bfloat16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (>= 1)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected an integer >= 1")
    reexec_with_hugepages()  # see the module docstring

    bf16_peak, f32_peak = matmul_flops_per_s(), matmul_flops_per_s(dtype=jnp.float32)
    peak = max(bf16_peak, f32_peak)
    print(f"2048^2 matmul: bf16 {bf16_peak / 1e9:,.0f} GFLOP/s, float32 {f32_peak / 1e9:,.0f} "
          f"GFLOP/s (CPU bf16 features: {cpu_bf16_features()}); the fraction column is of the "
          f"faster, {'bf16' if bf16_peak >= f32_peak else 'float32'}")
    rows = []

    def add(name, r, flops_ratio=None):
        model_flops = training_flops_per_token(r["cfg"].model, SEQ)["total"] * r["tokens_per_s"]
        rows.append((name, r["tokens_per_s"], r["seconds"], flops_ratio, model_flops / peak))

    tiers = block_tiers(BATCH * SEQ * 2, 4)  # the default layout of BENCH's 2 x 4 experts
    default = " + ".join(str(b) for b, _ in tiers)
    variants = [("dropless", [], f"dropless, blocks of {default} rows (default)"),
                ("dropless", ["model.gmm_block_size=64"], "dropless, blocks of 64 rows"),
                ("dropless", ["model.gmm_block_size=256"], "dropless, blocks of 256 rows"),
                ("dropless", ["model.grouped_matmul=ragged_dot"], "dropless, lax.ragged_dot"),
                ("capacity", [], "capacity 1.25")]
    for dispatch, extra, name in variants:
        flops, analytic = compiled_flops(dispatch, extra)
        add(f"jaxmoe {name} (bf16)", jaxmoe_step(dispatch, args.steps, extra), flops / analytic)
    add("jaxmoe dropless, blocks (bf16, no remat)",
        jaxmoe_step("dropless", args.steps, ["model.remat=none"]))
    add("jaxmoe dropless, blocks (float32)",
        jaxmoe_step("dropless", args.steps, ["model.compute_dtype=float32"]))
    add("reference: dense MLP of the active width (bf16)",
        jaxmoe_step("dropless", args.steps, base=DENSE))
    add("reference: dense MLP of the active width (float32)",
        jaxmoe_step("dropless", args.steps, ["model.compute_dtype=float32"], base=DENSE))
    torch_best = None
    if not args.no_torch:
        for dtype in ("float32", "bfloat16"):
            tps = torch_mixtral(max(3, args.steps // 4), dtype)
            rows.append((f"transformers Mixtral ({dtype})", tps, BATCH * SEQ / tps, None, None))
            torch_best = max(torch_best or 0.0, tps)

    print(f"\n{datetime.date.today()}  `JAX_PLATFORMS=cpu python tools/bench_train.py "
          f"--steps {args.steps}{' --no-torch' if args.no_torch else ''}`  "
          f"(jax {jax.__version__}, {os.cpu_count()} cores, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})\n")
    print("| run | tokens/s | step (s) | compiled/analytic FLOPs | model FLOP/s / best matmul |"
          + (" vs transformers best |" if torch_best else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if torch_best else ""))
    for name, tps, sec, ratio, frac in rows:
        cells = [name, f"{tps:,.0f}", f"{sec:.3f}", "" if ratio is None else f"{ratio:.3f}",
                 "" if frac is None else f"{frac:.1%}"]
        if torch_best:
            cells.append(f"{tps / torch_best:.2f}x")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    from _run import run

    run(main)

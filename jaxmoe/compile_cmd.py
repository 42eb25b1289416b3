"""`jaxmoe compile`: compile the full train step for a TPU topology on this host and report.

    jaxmoe compile --config configs/mixtral_8x7b.yaml --topology v5p-128 mesh.fsdp=64

The train step (forward, backward, optimizer update) is built exactly as `jaxmoe train`
builds it (`build_trainer`), but on libtpu's compile-only devices for the topology, lowered
with abstract inputs and compiled by the TPU compiler; nothing is allocated. The report
(`sharding.estimate.format_report`) gives per-device memory, FLOPs, collectives, a step-time
estimate and `estimated MFU: X%`. Exit status 3 when the plan does not fit in HBM.
Targets this JAX cannot describe (GPUs without their plugin) get the analytic estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxmoe import config as config_lib
from jaxmoe.staging import write_text_atomic

EXIT_DOES_NOT_FIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", required=True,
                   help="v5p-128 (TensorCores for v4/v5p/tpu7x, chips otherwise), v5p:4x4x8, "
                        "v6e-256, tpu7x:4x4x4, h100-64 (analytic)")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN")
    p.add_argument("--hlo-out", help="write the compiled HLO text here")
    p.add_argument("--json-out", help="write the report as JSON here")


def expert_parallel_degree(mesh_shape: Mapping[str, int], rules: Any) -> int:
    """The number of devices the experts are split over: the product of the sizes of the mesh
    axes that the logical `expert` axis maps to under `rules` (`mesh.rules` may move it)."""
    from sharding import mesh_axes_of

    return math.prod(mesh_shape[a] for a in mesh_axes_of("expert", rules))


def expert_buffer_fill(buffer_factor: float, n_ep: int, dispatch: str = "dropless") -> float:
    """The fraction of each expert receive buffer that holds tokens at balanced load.

    A device receives as many rows as it sends (its local token copies) when the experts are
    balanced; its buffer holds `buffer_factor` x that (0: the worst case, `n_ep` x). A factor
    below 1 makes the buffer smaller than the balanced load: it is full (and copies are
    dropped), so the fill is 1, never more. Without expert parallelism there is no buffer;
    capacity dispatch runs every slot, empty or not, through the expert kernel (fill 1)."""
    if n_ep <= 1 or dispatch != "dropless":
        return 1.0
    factor = buffer_factor if buffer_factor > 0 else n_ep
    return min(1.0, 1.0 / factor)


def _model_flops(cfg: config_lib.Config) -> float:
    from jaxmoe.model.params import training_flops_per_token

    per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    return per_token * cfg.train.batch_size * cfg.data.seq_len


def plan(cfg: config_lib.Config, topology: str, num_slices: int = 1,
         hlo_out: str | None = None):
    """Compiles (or estimates) `cfg` on `topology`; returns a `sharding.estimate.Report`."""
    config_lib.check_trainable(cfg)  # the same refusals on every target
    import jax

    import sharding
    from jaxmoe.train.loop import build_trainer
    from sharding import aot, estimate, hlo

    target = aot.target_from_name(topology, num_slices)
    devices = aot.topology_devices(target)
    model_flops = _model_flops(cfg)
    if devices is None:
        from flax import nnx
        from jax.sharding import AbstractMesh

        from jaxmoe.train.optimizer import make_optimizer
        from jaxmoe.train.state import init_state
        from sharding.rules import variable_axes

        rules = sharding.make_rules(cfg.mesh.rules)
        ici, dcn = sharding.config_degrees(cfg.mesh)
        n_dcn = math.prod(dcn.values())
        if n_dcn != target.num_slices:
            set_dcn = {f"mesh.dcn_{a}": v for a, v in dcn.items() if v > 1}
            raise sharding.MeshError(
                f"mesh: DCN degrees {set_dcn or '(none)'} (product {n_dcn}) != --num-slices "
                f"{target.num_slices}; expected mesh.dcn_* degrees whose product is "
                f"{target.num_slices}")
        shape = sharding.mesh_shape(ici, target.devices // n_dcn)
        shape = {a: shape[a] * dcn[a] for a in sharding.MESH_AXES}
        sharding.check_model_fits(shape, rules, cfg.model, cfg.train.batch_size,
                                  cfg.train.grad_accum_steps)
        mesh = AbstractMesh(tuple(shape.values()), tuple(shape))
        tx = make_optimizer(cfg.train.optimizer, cfg.train.steps)
        abstract = jax.eval_shape(lambda: init_state(cfg.model, tx, cfg.train.seed))
        sharding.check_overrides(abstract.params, mesh, rules, cfg.mesh.rules,
                                 sharding.MeshError)  # as build_trainer does
        sharding.check_params_divide(abstract.params, shape, rules)
        specs = sharding.state_shardings(abstract, mesh, rules)
        params = [(v.get_value(), variable_axes(v) or ())
                  for v in jax.tree.leaves(abstract.params,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))]
        report = estimate.analytic(target, cfg, shape, abstract, specs, model_flops, dcn,
                                   params=params, rules=rules)
        if hlo_out:
            report.notes.append(f"--hlo-out {hlo_out}: not written (an analytic estimate "
                                "compiles no program)")
        return report
    start = time.perf_counter()
    trainer = build_trainer(cfg, devices)
    compiled = aot.compile_train_step(trainer)
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    if hlo_out:
        write_text_atomic(hlo_out, text)
    chip = target.chip
    stats = hlo.analyse(text, estimate.link_model(chip, list(trainer.mesh.devices.flat)),
                        num_slices=target.num_slices,
                        dcn_bw=chip.dcn_bw / chip.devices_per_chip)
    n_ep = expert_parallel_degree(trainer.mesh.shape, trainer.rules)
    report = estimate.from_compiled(target, dict(trainer.mesh.shape),
                                    aot.memory_stats(compiled), stats,
                                    aot.cost_flops(compiled), model_flops,
                                    buffer_fill=expert_buffer_fill(cfg.mesh.expert_buffer_factor,
                                                                   n_ep, cfg.model.dispatch))
    report.notes.append(f"compiled in {seconds:.0f} s on this host")
    return report


def _output_file_problem(path: str) -> str | None:
    """Why a report cannot be written to `path`, or None."""
    p = Path(path)
    parent = p.absolute().parent
    if p.is_dir():
        return "is a directory; expected a file path"
    if parent.exists() and not parent.is_dir():
        return f"{parent} is a file; expected a path in a folder"
    if not parent.is_dir():
        return f"folder {parent} does not exist; expected an existing folder"
    if not os.access(parent, os.W_OK):
        return f"folder {parent} is not writable; expected a writable folder"
    return None


def cmd_compile(args: argparse.Namespace) -> int:
    from sharding import aot, estimate

    cfg = config_lib.load_config(args.config, args.overrides)
    if args.hlo_out and args.json_out and Path(args.hlo_out).absolute() == Path(
            args.json_out).absolute():
        print(f"jaxmoe compile: --hlo-out and --json-out are both {args.json_out}; expected "
              "two files", file=sys.stderr)
        return 2
    for flag, out in (("--hlo-out", args.hlo_out), ("--json-out", args.json_out)):
        problem = _output_file_problem(out) if out else None
        if problem:  # said before the (long) compilation, not after it
            print(f"jaxmoe compile: {flag} {out}: {problem}", file=sys.stderr)
            return 2
    try:
        report = plan(cfg, args.topology, args.num_slices, args.hlo_out)
    except aot.TargetError as e:
        print(f"jaxmoe compile: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
            first = next((ln for ln in msg.splitlines() if "memory" in ln.lower()),
                         msg[:300]).strip()
            print(f"jaxmoe compile: the plan does not fit in HBM on {args.topology} "
                  f"(compiler: {first})", file=sys.stderr)
            if args.json_out:  # a sweep's record of this plan: no report, but the verdict
                write_text_atomic(args.json_out, json.dumps(
                    {"target": args.topology, "source": "compiled", "fits": False,
                     "compiler_error": first}, indent=2))
            return EXIT_DOES_NOT_FIT
        raise
    print(estimate.format_report(report))
    if args.json_out:
        d = dataclasses.asdict(report)
        d.update(step_s=report.step_s, mfu=report.mfu(), hbm_fraction=report.hbm_fraction,
                 fits=report.fits)
        write_text_atomic(args.json_out, json.dumps(d, indent=2, default=float))
    if not report.fits:
        print(f"jaxmoe compile: the plan does not fit: {report.memory['total'] / 2**30:.2f} "
              f"GiB per device > {report.hbm_per_device / 2**30:.2f} GiB HBM on "
              f"{args.topology}; shard more (mesh.fsdp/expert/tensor), lower train.batch_size "
              f"or raise train.grad_accum_steps", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0

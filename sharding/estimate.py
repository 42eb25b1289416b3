"""Step-time, memory and MFU estimates for a training plan on a target slice.

Two sources, one report:
  * `from_compiled`: a train step compiled for the target (`sharding.aot`): memory from
    XLA's memory analysis, matmul FLOPs and collectives from the optimised HLO
    (`sharding.hlo`, loop trip counts applied);
  * `analytic`: when the target cannot be described by this JAX (e.g. GPUs without their
    plugin): memory from the exact parameter/optimizer shardings plus an activation
    estimate, FLOPs from the model, and the collectives each parallelism implies.

Step time model: compute = executed matmul FLOPs / peak; each collective's wire bytes /
bandwidth (the bytes a device sends; one mesh axis is a ring on one torus dimension: 2 of
a TPU chip's links, one direction each; DCN at the per-chip DCN bandwidth). FSDP gathers,
reduce-scatters and gradient all-reduces are issued asynchronously by XLA and assumed
hidden under compute; expert all-to-alls sit
between the router and the experts, so they are counted as exposed:
  step = max(compute, overlapped communication) + exposed communication.
MFU = model FLOPs per step (6 x active matmul params + attention, `jaxmoe info`) /
(step time x peak x chips): rematerialisation and dispatch overheads count against it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sharding.chips import NVLINK_DOMAIN
from sharding.collective_cost import CollectiveStats, wire_bytes

EXPOSED = ("all-to-all", "ragged-all-to-all")


@dataclasses.dataclass
class Report:
    target: str
    topology: str
    chips: int
    devices: int
    mesh: dict[str, int]
    source: str  # "compiled" | "analytic"
    memory: dict[str, float]  # per device
    hbm_per_device: float
    xla_flops: float | None  # XLA cost analysis (scanned bodies once), per device
    executed_flops: float  # matmul FLOPs per device per step, loops applied
    model_flops: float  # per step, whole model (jaxmoe info)
    collectives: dict[str, CollectiveStats]
    compute_s: float
    overlapped_comm_s: float
    exposed_comm_s: float
    peak_flops_per_device: float
    notes: list[str] = dataclasses.field(default_factory=list)
    # Grouped-matmul kernels are costed over their whole receive buffer; at balanced expert
    # load only `buffer_fill` of it holds tokens (1 without EP; 1/buffer factor with it).
    kernel_flops: float = 0.0
    buffer_fill: float = 1.0
    # Ragged expert exchanges are costed at balanced load (sharding/hlo.py); the exposed
    # communication of a device whose receive buffers fill (None: no ragged exchange).
    exposed_full_s: float | None = None
    # Extra passes of float32 matmuls at HIGH/HIGHEST precision (the router), priced at the
    # bf16 rate as the matrix units run them; in `compute_s`, not in `executed_flops`.
    multipass_flops: float = 0.0

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.overlapped_comm_s) + self.exposed_comm_s

    @property
    def no_overlap_s(self) -> float:
        return self.compute_s + self.overlapped_comm_s + self.exposed_comm_s

    def mfu(self, step_s: float | None = None) -> float:
        step = self.step_s if step_s is None else step_s
        return self.model_flops / (step * self.peak_flops_per_device * self.devices)

    @property
    def hbm_fraction(self) -> float:
        return self.memory["total"] / self.hbm_per_device

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.hbm_per_device


def link_model(chip: Any, devices: list[Any]):
    """`sharding.hlo.Link` for compiled programs on `devices` (the mesh's device order):
    a group spanning k of the torus's dimensions runs bidirectional rings on all k of them
    (2k links, sending one way on each: half their bidirectional bandwidth); groups across
    slices go at the DCN bandwidth. Devices of one chip share its links."""
    import numpy as np

    def link(group):
        devs = [devices[int(i)] for i in group if int(i) < len(devices)]
        if len({getattr(d, "slice_index", 0) for d in devs}) > 1:
            return chip.dcn_bw / chip.devices_per_chip, True
        coords = np.asarray([getattr(d, "coords", (0,)) for d in devs])
        spanned = int((coords.max(0) != coords.min(0)).sum()) if len(devs) else 1
        dims = max(chip.torus_dims, 1)
        return chip.ici_bw / 2 * max(spanned, 1) / dims / chip.devices_per_chip, False

    return link


def comm_times(colls: dict[str, CollectiveStats], chip: Any) -> tuple[float, float]:
    """(overlapped, exposed) seconds for one device's collectives: the analysed `seconds`,
    plus one ring per collective for the wire bytes they do not cover (no device layout)."""
    share = chip.devices_per_chip  # devices of one chip share its links
    over = exp = 0.0
    for kind, s in colls.items():
        dcn = s.dcn_wire_bytes - s.timed_dcn_wire_bytes
        ici = s.wire_bytes - s.timed_wire_bytes - dcn
        t = s.seconds + (ici / chip.ring_bw() + dcn / chip.dcn_bw) * share
        if kind in EXPOSED:
            exp += t
        else:
            over += t
    return over, exp


def from_compiled(target: Any, mesh_shape: dict[str, int], memory: dict[str, float],
                  hlo_stats: dict, xla_flops: float, model_flops: float,
                  buffer_fill: float = 1.0) -> Report:
    """`buffer_fill`: the fraction of expert receive buffers holding tokens at balanced load
    (the compute estimate counts kernels at that fill; the full-buffer bound is printed)."""
    chip = target.chip
    peak = chip.peak_flops / chip.devices_per_chip
    over, exp = comm_times(hlo_stats["collectives"], chip)
    ragged_full = hlo_stats.get("ragged_full")
    exp_full = None if ragged_full is None else comm_times(
        {**hlo_stats["collectives"], "ragged-all-to-all": ragged_full}, chip)[1]
    kernel = hlo_stats.get("kernel_flops", 0.0)
    balanced = hlo_stats["flops"] - kernel * (1 - buffer_fill)
    multipass = hlo_stats.get("multipass_flops", 0.0)
    notes = []
    if multipass:
        notes.append(f"float32 matmuls at HIGH/HIGHEST precision (the router) take 2-6 bf16 "
                     f"passes: {multipass:.4g} FLOPs of extra passes per device, "
                     f"{multipass / peak * 1e3:.4g} ms of the compute time")
    if hlo_stats["unknown_loops"]:
        notes.append(f"{len(hlo_stats['unknown_loops'])} loop(s) with unreadable trip "
                     "counts were counted once")
    if hlo_stats.get("conditionals"):
        notes.append(f"{len(hlo_stats['conditionals'])} conditional(s): the FLOPs and "
                     "collectives of every branch are counted, as if all ran")
    if hlo_stats.get("unknown_groups"):
        names = hlo_stats["unknown_groups"]
        notes.append(f"{len(names)} collective(s) with unreadable device groups (e.g. "
                     f"{names[0]}): their bytes are counted, their communication time is not")
    return Report(target.name, target.topology_name, target.total_chips, target.devices,
                  mesh_shape, "compiled", memory, chip.hbm_bytes / chip.devices_per_chip,
                  xla_flops, balanced, model_flops, hlo_stats["collectives"],
                  (balanced + multipass) / peak, over, exp, peak, notes, kernel, buffer_fill,
                  exp_full, multipass)


# ----------------------------------------------------------------------------- analytic

def _dim_axes(spec: Any, ndim: int) -> list[tuple[str, ...]]:
    """The mesh axes of each of `ndim` dimensions of a PartitionSpec-like tuple."""
    spec = tuple(spec)[:ndim] + (None,) * max(0, ndim - len(tuple(spec)))
    return [() if a is None else a if isinstance(a, tuple) else (a,) for a in spec]


def _local_elements(shape: tuple[int, ...], dim_axes: list[tuple[str, ...]],
                    mesh_shape: dict[str, int]) -> int:
    """Elements of one device's shard (a dimension split n ways holds ceil(dim / n))."""
    return math.prod(math.ceil(d / math.prod(mesh_shape[a] for a in axes))
                     for d, axes in zip(shape, dim_axes))


def _shard_bytes(abstract_state: Any, specs: Any, mesh_shape: dict[str, int]) -> float:
    import jax

    total = 0.0
    for leaf, spec in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(
            specs, is_leaf=lambda x: hasattr(x, "spec")), strict=True):
        dims = _dim_axes(spec.spec, len(leaf.shape))
        total += _local_elements(leaf.shape, dims, mesh_shape) * leaf.dtype.itemsize
    return total


def weight_traffic(params: list[tuple[Any, tuple]], rules: Any, mesh_shape: dict[str, int]):
    """Data-parallel traffic of the parameters, from their logical axes.

    params: (ShapeDtypeStruct, logical names) per parameter. Returns
    (gathered: {mesh axes: [local elements, local bytes] of the parameters FSDP-gathered
                over those axes},
     reduced: {mesh axes: local bytes whose gradients are all-reduced over them}).
    A parameter dimension split over a batch axis (one that also splits the tokens) is
    FSDP: gathered before use, its gradient reduce-scattered; an `expert` dimension is
    expert parallelism instead (each device keeps its own experts); batch axes that split
    no dimension of it see replicas, whose gradients are all-reduced."""
    from sharding.rules import logical_to_spec, mesh_axes_of

    batch_axes = mesh_axes_of("batch", rules)
    gathered: dict[tuple[str, ...], list[float]] = {}
    reduced: dict[tuple[str, ...], float] = {}
    for leaf, names in params:
        names = tuple(names) + (None,) * (len(leaf.shape) - len(names))  # unnamed: whole
        dims = _dim_axes(logical_to_spec(names, rules), len(leaf.shape))
        elements = _local_elements(leaf.shape, dims, mesh_shape)
        used = {a for axes in dims for a in axes}
        fsdp = [a for name, axes in zip(names, dims) if name != "expert"
                for a in axes if a in batch_axes]
        local = elements * leaf.dtype.itemsize
        total = gathered.setdefault(tuple(fsdp), [0.0, 0.0])
        total[0] += elements
        total[1] += local
        rest = tuple(a for a in batch_axes if a not in used)
        reduced[rest] = reduced.get(rest, 0.0) + local
    return gathered, reduced


def analytic(target: Any, cfg: Any, mesh_shape: dict[str, int], abstract_state: Any,
             state_specs: Any, model_flops: float, dcn: dict[str, int] | None = None, *,
             params: list[tuple[Any, tuple]], rules: Any) -> Report:
    """Estimate without a compiler (see the module docstring for the model).

    `mesh_shape` holds the full axis sizes (ICI x DCN); `dcn` the DCN part of each (default 1);
    `params`: (ShapeDtypeStruct, logical axis names) of every parameter, mapped to mesh axes
    by `rules` (`weight_traffic`) for the FSDP and data-parallel collectives.

    Collectives are per micro-batch: `train.grad_accum_steps` micro-batches run in a
    `lax.scan` inside the one jitted step, and XLA keeps the FSDP all-gathers and
    reduce-scatters and the data-parallel gradient all-reduces inside the scan body (checked
    on tiny_moe, v5p-8, data=2 fsdp=2: with 2 micro-batches each of those moves twice the
    bytes of 1), like the tensor all-reduces and expert all-to-alls. An axis with a DCN
    degree > 1, and on GPUs an axis whose groups span more than one NVLink domain
    (`sharding.chips.NVLINK_DOMAIN` GPUs), communicates at the DCN bandwidth."""
    m, chip = cfg.model, target.chip
    n = math.prod(mesh_shape.values())
    get = mesh_shape.get
    dcn = {a: (dcn or {}).get(a, 1) for a in mesh_shape}
    accum = max(cfg.train.grad_accum_steps, 1)
    batch_shards = get("data", 1) * get("fsdp", 1) * get("expert", 1)
    tp = get("tensor", 1)
    b_local = cfg.train.batch_size / batch_shards / accum
    seq, d = cfg.data.seq_len, m.embed_dim
    tokens = b_local * seq
    act = 2  # bf16 activations
    state = _shard_bytes(abstract_state, state_specs, mesh_shape)
    params_local = state / 3  # params + two Adam moments of the same size (float32)
    saved = sum(saved_per_token(m, i, seq, tp) for i in range(m.num_layers)) * tokens * act
    working = (2 * b_local * (m.num_heads / tp) * seq * seq * 4  # scores + probabilities
               + 3 * tokens * max(m.num_experts_per_tok * m.expert_mlp_dim,
                                  m.mlp_dim) / tp * act
               + 2 * tokens * m.vocab_size / tp * 4)  # logits and their gradient
    memory = {"arguments": state, "outputs": 0.0, "aliased": 0.0,
              "temporaries": params_local + saved + working, "code": 0.0}
    memory["total"] = memory["arguments"] + memory["temporaries"]
    # Recomputed forward matmuls: all of them with full remat; none when every dot output is
    # kept; dots_no_batch recomputes only attention's batched dots (counted as full: a bound).
    remat = 4 / 3 if m.remat in ("full", "dots_no_batch") else 1.0
    executed = model_flops * remat / n
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    multipass = router_extra_flops(m, chip, tokens * accum, moe_layers)
    colls: dict[str, CollectiveStats] = {}
    axes = list(mesh_shape)

    def over_dcn(group_axes: tuple[str, ...]) -> bool:
        if any(dcn[a] > 1 for a in group_axes):
            return True
        if chip.platform != "gpu":
            return False
        # Devices fill NVLink domains in mesh order (the last axis nearest): a group spans
        # the ICI sizes of every axis from its outermost one on, consecutive GPUs.
        first = min(axes.index(a) for a in group_axes)
        return math.prod(mesh_shape[a] // dcn[a] for a in axes[first:]) > NVLINK_DOMAIN

    def add(kind: str, count: float, size: float, group_axes: str | tuple[str, ...]) -> None:
        group_axes = (group_axes,) if isinstance(group_axes, str) else group_axes
        group = math.prod(get(a, 1) for a in group_axes)
        if group <= 1:
            return
        colls.setdefault(kind, CollectiveStats()).add(
            count * accum, size, wire_bytes(kind, size, group), over_dcn(group_axes))

    gathered, reduced = weight_traffic(list(params), rules, mesh_shape)
    for group_axes, (elements, local) in sorted(gathered.items()):
        group = math.prod(get(a, 1) for a in group_axes)
        # a bf16 copy gathered for the forward and again for the backward pass; the
        # gradients reduce-scattered in the parameters' dtype
        add("all-gather", 2 * m.num_layers, elements * act * group / m.num_layers, group_axes)
        add("reduce-scatter", m.num_layers, local * group / m.num_layers, group_axes)
    for group_axes, local in sorted(reduced.items()):
        add("all-reduce", 1, local, group_axes)
    add("all-reduce", 6 * m.num_layers, tokens * d * act, "tensor")  # Megatron: 2 per pass
    add("all-to-all", 6 * moe_layers, tokens * m.num_experts_per_tok * d * act, "expert")
    over, exp = comm_times(colls, chip)
    peak = chip.peak_flops / chip.devices_per_chip
    return Report(target.name, target.topology_name if chip.platform == "tpu" else
                  f"{target.total_chips} x {chip.name}", target.total_chips, target.devices,
                  mesh_shape, "analytic", memory, chip.hbm_bytes / chip.devices_per_chip,
                  None, executed, model_flops, colls, (executed + multipass) / peak, over,
                  exp, peak,
                  ["analytic estimate: no compiler for this target in the installed JAX"
                   + (" (pip install 'jaxmoe[tpu]' for libtpu, then the plan is compiled)"
                      if chip.platform == "tpu" else "")]
                  + (["the router's float32 matmuls (Precision.HIGHEST) "
                      + ("take 3-6 bf16 passes" if chip.platform == "tpu" else
                         f"run at the {chip.f32_flops / 1e12:.4g} TFLOP/s float32 rate")
                      + f": {multipass / peak * 1e3:.4g} ms more compute time per step"]
                     if multipass else [])
                  + ([f"model.remat={m.remat}: the activations kept are counted per layer "
                      "and token from what that policy saves (approximate)"
                      + (", and the executed FLOPs as full remat's (an upper bound)"
                         if m.remat == "dots_no_batch" else "")]
                     if m.remat != "full" else []),
                  multipass_flops=multipass)


def router_extra_flops(m: Any, chip: Any, tokens: float, moe_layers: int) -> float:
    """Extra compute of the router's float32 matmuls at Precision.HIGHEST over `tokens`
    tokens on one device, in FLOPs at the chip's bf16 peak.

    Each MoE layer runs logits = x [tokens, embed] @ w [embed, experts] forward (twice under
    full remat: the other policies save its output), the input gradient g @ w.T and the
    weight gradient x.T @ g. On TPU, as sharding/hlo.py counts compiled matmuls, a matmul
    takes 3 bf16 passes with one float32 operand and 6 with two: w and g are float32; x is
    bf16 with its convert folded into the matmul, unless the compute dtype is float32, or
    (for the weight gradient) remat=none keeps the converted copy. Matched against the
    v5p-compiled tiny_moe for each remat policy and both compute dtypes. GPUs run all of
    them at the float32 (non-tensor-core) rate. The shared-expert gate (width 1) is left
    out: XLA turns it into a multiply and reduce."""
    flops = 2 * tokens * m.embed_dim * m.num_experts * moe_layers  # one such matmul
    forwards = 2 if m.remat == "full" else 1
    if chip.platform == "tpu":
        x_f32 = m.compute_dtype == "float32"
        fwd = 5 if x_f32 else 2  # extra passes: 6 - 1 or 3 - 1
        dw = 5 if x_f32 or m.remat == "none" else 2
        return flops * (forwards * fwd + 5 + dw)
    if not chip.f32_flops:
        return 0.0
    return flops * (forwards + 2) * (chip.peak_flops / chip.f32_flops - 1)


def saved_per_token(m: Any, layer: int, seq: int, tp: int = 1) -> float:
    """Activation elements one token keeps on one device for the backward pass in `layer`,
    by remat policy: `full` only the layer's input; `dots_no_batch` also every projection's
    output (q/k/v, o, router, expert or dense MLP matmuls); `dots` also attention's scores
    and their product with V; `none` also the norms, the SwiGLU product and the softmax
    probabilities (float32 scores count twice). Heads and MLP widths are split `tp` ways
    (tensor parallelism); MLA counts its expanded per-head q/k/v widths."""
    d = m.embed_dim
    heads = m.num_heads
    if getattr(m, "attention", "gqa") == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        qkv, pv = heads * (2 * qk + m.v_head_dim), heads * m.v_head_dim
    else:
        head_dim = getattr(m, "head_dim", 0) or d // heads
        qkv = (heads + 2 * getattr(m, "num_kv_heads", heads)) * head_dim
        pv = heads * head_dim
    if m.is_moe_layer(layer):
        width, copies, router = m.expert_mlp_dim, m.num_experts_per_tok, m.num_experts
    else:
        width, copies, router = m.mlp_dim, 1, 0
    kept = d
    if m.remat == "full":
        return kept
    kept += qkv / tp + d + router + copies * (2 * width / tp + d)
    if m.remat == "dots_no_batch":
        return kept
    kept += (2 * heads * seq + pv) / tp  # float32 scores, PV
    if m.remat == "dots":
        return kept
    return kept + 2 * d + (copies * width + 2 * heads * seq) / tp  # norms, SwiGLU, probs


# ----------------------------------------------------------------------------- printing

def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_report(r: Report) -> str:
    mesh = " x ".join(f"{a}={v}" for a, v in r.mesh.items() if v > 1) or "1 device"
    lines = [(f"target: {r.target} ({r.topology}; {r.chips} chips, {r.devices} devices); "
              f"mesh {mesh}; source: {r.source}")]
    mem = r.memory
    lines.append(f"memory per device: arguments {_gb(mem['arguments'])}, outputs "
                 f"{_gb(mem['outputs'])} ({_gb(mem['aliased'])} aliased to donated "
                 f"arguments), temporaries {_gb(mem['temporaries'])}, code {_gb(mem['code'])}"
                 f"; total {_gb(mem['total'])} of {_gb(r.hbm_per_device)} HBM "
                 f"({100 * r.hbm_fraction:.1f}%)")
    if r.xla_flops is not None:
        lines.append(f"compiled FLOPs per device (XLA cost analysis; a scanned layer body "
                     f"counts once): {r.xla_flops:.4g}")
    how = ("HLO, loop trip counts applied" if r.source == "compiled" else
           "model FLOPs with rematerialisation, analytic")
    lines.append(f"executed matmul FLOPs per device per step ({how}): "
                 f"{r.executed_flops:.4g}; model FLOPs per step: "
                 f"{r.model_flops:.4g} ({r.model_flops / r.devices:.4g} per device)")
    # A fill of 1 (buffers no larger than the balanced load: copies beyond them are dropped)
    # has no fuller case to price.
    exp_full = r.exposed_comm_s if r.exposed_full_s is None else r.exposed_full_s
    if r.buffer_fill < 1:
        full = r.executed_flops + r.kernel_flops * (1 - r.buffer_fill)
        full_compute = (full + r.multipass_flops) / r.peak_flops_per_device
        full_step = max(full_compute, r.overlapped_comm_s) + exp_full
        what = "expert kernels" + (" and ragged exchanges" if r.exposed_full_s else "")
        lines.append(f"  ({what} at balanced load, {100 * r.buffer_fill:.0f}% of their "
                     f"receive buffers; with every buffer full: {full:.4g} FLOPs"
                     + (f", exposed all-to-all {exp_full * 1e3:.4g} ms"
                        if r.exposed_full_s else "")
                     + f", MFU {100 * r.mfu(full_step):.1f}%)")
    lines.append("collectives per device per step:")
    if not r.collectives:
        lines.append("  none")
    for kind, s in sorted(r.collectives.items()):
        dcn = f", {s.dcn_wire_bytes / 1e9:.3f} GB over DCN" if s.dcn_wire_bytes else ""
        lines.append(f"  {kind:<18} {s.count:8.0f} ops  {s.bytes / 1e9:10.3f} GB  "
                     f"(sent {s.wire_bytes / 1e9:.3f} GB{dcn})")
    lines.append(f"step time estimate: {r.step_s * 1e3:.4g} ms = max(compute "
                 f"{r.compute_s * 1e3:.4g} ms, overlapped communication "
                 f"{r.overlapped_comm_s * 1e3:.4g} ms) + exposed all-to-all "
                 f"{r.exposed_comm_s * 1e3:.4g} ms; with no overlap at all "
                 f"{r.no_overlap_s * 1e3:.4g} ms (MFU {100 * r.mfu(r.no_overlap_s):.1f}%)")
    lines.extend(f"note: {n}" for n in r.notes)
    lines.append(f"estimated MFU: {100 * r.mfu():.1f}%")
    return "\n".join(lines)

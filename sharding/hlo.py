"""Reading a compiled (optimised, SPMD-partitioned) HLO module: matmul FLOPs and collectives.

XLA's `cost_analysis()` counts the body of a `while` loop once, so a model whose layers run
under `lax.scan` is undercounted by about the number of layers. This module walks the HLO
text instead: every computation gets a multiplicity (how often one step runs it: loop trip
counts multiply, fusions/calls inherit), and

  * matmul FLOPs are summed over `dot`, `convolution` (TPU writes matmuls as convolutions,
    batch dimensions as strided/dilated windows; only window taps that land on real input
    elements are counted, as XLA's own cost analysis does) and the grouped-matmul
    custom calls (`ragged-dot`) of Mosaic kernels; a float32 matmul at HIGH or HIGHEST
    precision (the router's) takes 3 or 6 bfloat16 passes on a TPU's matrix units, and
    those extra passes are totalled apart;
  * collectives are collected by kind with their result bytes, group size, the bytes each
    device sends over the wire (ring algorithms, `sharding/collective_cost.py`) and whether a
    group spans slices (DCN); on multi-slice TPU programs the cross-slice steps are
    megascale `send`s (DCN). A ragged all-to-all counts the smaller of its input and result
    (the rows it moves at balanced load); the larger (a full receive buffer) is totalled
    apart.

Trip counts come from the loop condition (`counter < N`, counter from 0, as lax.scan and
fori_loop lower); a loop whose count cannot be read counts once and is reported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from sharding.collective_cost import (  # noqa: F401  (re-exported)
    CollectiveStats,
    replica_groups,
    wire_bytes,
)

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                    r"=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")

Shape = tuple[str, tuple[int, ...]]


def shapes_in(text: str) -> list[Shape]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def nbytes(shapes: list[Shape]) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in shapes)


@dataclasses.dataclass
class Instr:
    name: str
    result: list[Shape]
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the raw operand text, e.g. "(6)" for a constant


@dataclasses.dataclass
class Computation:
    name: str
    shapes: dict[str, list[Shape]]  # value name -> shapes (parameters and instructions)
    instrs: list[Instr]


def _split_balanced(text: str) -> tuple[str, str]:
    """'(a, (b)) rest' -> ('(a, (b))', 'rest'); text must start with '('."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[:i + 1], text[i + 1:]
    return text, ""


def _parse_instr(name: str, rest: str) -> Instr | None:
    if rest.startswith("("):
        shape_text, rest = _split_balanced(rest)
    else:
        shape_text, _, rest = rest.partition(" ")
    m = re.match(r"\s*([a-z][\w\-]*)\(", rest)
    if not m:
        return None
    args, attrs = _split_balanced(rest[m.end() - 1:])
    operands = re.findall(r"%([\w.\-]+)", args)
    return Instr(name, shapes_in(shape_text), m.group(1), operands, attrs, args)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """HLO text -> ({computation name: Computation}, entry computation name)."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = Computation(h.group(1), {}, [])
            comps[current.name] = current
            for pname, ptext in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,()]+)", h.group(2)):
                current.shapes[pname] = shapes_in(ptext)
            if line.startswith("ENTRY"):
                entry = current.name
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            ins = _parse_instr(m.group(1), m.group(2))
            if ins is not None:
                current.instrs.append(ins)
                current.shapes[ins.name] = ins.result
    return comps, entry


def _trip_count(ins: Instr, comps: dict[str, Computation]) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
    if not cond or cond.group(1) not in comps:
        return None
    c = comps[cond.group(1)]
    consts = {i.name: int(i.args[1:-1]) for i in c.instrs
              if i.opcode == "constant" and re.fullmatch(r"\(-?\d+\)", i.args)}
    for i in c.instrs:
        if i.opcode == "compare" and "direction=LT" in i.attrs:
            for op in i.operands:
                if op in consts:
                    return consts[op]
    return None


def multiplicities(comps: dict[str, Computation], entry: str,
                   scan_once: bool = False
                   ) -> tuple[dict[str, float], list[str], list[tuple[str, str]]]:
    """How many times one run of `entry` runs each computation; loops of unknown count;
    (computation, instruction) of each conditional: every branch is counted as if it ran
    (an upper bound)."""
    callees: dict[str, list[tuple[str, float]]] = defaultdict(list)
    unknown, conditionals = [], []
    for c in comps.values():
        for ins in c.instrs:
            factor = 1.0
            if ins.opcode == "while" and not scan_once:
                n = _trip_count(ins, comps)
                if n is None:
                    unknown.append(ins.name)
                factor = float(n or 1)
            # An async op's wrapped computation runs once: its update and done may name it too
            skip = ins.opcode in ("async-update", "async-done")
            for kind, target in ([] if skip else _CALLS.findall(ins.attrs)):
                # to_apply names reduction bodies (scalar work, not ours to count), except
                # on a `call`, whose whole body runs once
                if kind != "to_apply" or ins.opcode == "call":
                    callees[c.name].append((target, factor))
            if ins.opcode == "conditional":
                conditionals.append((c.name, ins.name))
            for group in _BRANCHES.findall(ins.attrs):
                for target in re.findall(r"%([\w.\-]+)", group):
                    callees[c.name].append((target, 1.0))
    mult: dict[str, float] = defaultdict(float)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:  # topological order (callers before callees)
        if name in seen or name not in comps:
            return
        seen.add(name)
        for t, _ in callees[name]:
            visit(t)
        order.append(name)

    visit(entry)
    mult[entry] = 1.0
    for name in reversed(order):
        for t, f in callees[name]:
            mult[t] += mult[name] * f
    return dict(mult), unknown, conditionals


# ----------------------------------------------------------------------------- FLOPs

def _window_taps(out: int, size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int,
                 inp: int) -> int:
    """(output position, window tap) pairs that read a real input element along one dim."""
    o = np.arange(out)[:, None]
    k = np.arange(size)[None, :]
    p = o * stride + k * rhs_dil - pad_lo
    valid = (p >= 0) & (p <= (inp - 1) * lhs_dil) & (p % lhs_dil == 0)
    return int(valid.sum())


def _window_attr(attrs: str, key: str, n: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([0-9x_]+)", attrs)
    if not m:
        return [default] * n
    if key == "pad":
        return [int(p.split("_")[0]) for p in m.group(1).split("x")]
    return [int(v) for v in m.group(1).split("x")]


def _conv_flops(ins: Instr, comp: Computation) -> float:
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.attrs)
    lhs = comp.shapes.get(ins.operands[0]) if ins.operands else None
    if not labels or not lhs or not ins.result:
        return 0.0
    lhs_l, _, out_l = labels.groups()
    lhs_dims, out_dims = lhs[0][1], ins.result[0][1]
    spatial = sorted(ch for ch in out_l if ch.isdigit())
    n = len(spatial)
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    wtext = window.group(1) if window else ""
    size = _window_attr(wtext, "size", n, 1)
    stride = _window_attr(wtext, "stride", n, 1)
    pad = _window_attr(wtext, "pad", n, 0)
    lhs_dil = _window_attr(wtext, "lhs_dilate", n, 1)
    rhs_dil = _window_attr(wtext, "rhs_dilate", n, 1)
    taps = 1
    for i, ch in enumerate(spatial):
        taps *= _window_taps(out_dims[out_l.index(ch)], size[i], stride[i], pad[i],
                             lhs_dil[i], rhs_dil[i], lhs_dims[lhs_l.index(ch)])
    groups = re.search(r"feature_group_count=(\d+)", ins.attrs)
    in_f = lhs_dims[lhs_l.index("f")] / (int(groups.group(1)) if groups else 1)
    other = math.prod(out_dims[out_l.index(ch)] for ch in "bf")
    return 2.0 * other * taps * in_f


def _dot_flops(ins: Instr, comp: Computation) -> float:
    lhs = comp.shapes.get(ins.operands[0]) if ins.operands else None
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    if not lhs or not ins.result:
        return 0.0
    k = math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i) if m else 1
    return 2.0 * math.prod(ins.result[0][1]) * k


# bf16 passes of a matmul on TPU by precision and how many of its two operands are float32:
# HIGHEST splits a float32 operand into 3 bf16 parts and takes 6 of the 9 products (bf16_6x),
# HIGH into 2 and takes 3 of 4 (bf16_3x); a bf16 operand is one exact part (XLA folds the
# router's bf16 -> f32 convert into the matmul, leaving one float32 operand).
_PASSES = {"highest": (1, 3, 6), "high": (1, 2, 3)}


def _passes(ins: Instr, comp: Computation) -> int:
    """Matrix-unit passes of a dot/convolution: 1 unless a float32 operand is at HIGH/HIGHEST."""
    m = re.search(r"operand_precision=\{(\w+)", ins.attrs)
    if not m or m.group(1) not in _PASSES:
        return 1
    operands = [comp.shapes.get(name) for name in ins.operands[:2]]
    return _PASSES[m.group(1)][sum(1 for s in operands if s and s[0][0] == "f32")]


def _ragged_dot_flops(ins: Instr) -> float:
    """Mosaic grouped matmul: operands (..., x [m, k], w [g, k, n]) -> [m, n], or the weight
    gradient (..., [m, k], [m, n]) -> [g, k, n]."""
    ops = re.search(r"operand_layout_constraints=\{(.*?)\}\}?,\s*\w+=", ins.attrs)
    arrays = [s for s in shapes_in(ops.group(1) if ops else ins.attrs) if len(s[1]) >= 2]
    if not arrays or not ins.result:
        return 0.0
    out = ins.result[0][1]
    x = arrays[-2][1] if len(arrays) >= 2 else arrays[-1][1]
    if len(out) == 2:
        return 2.0 * math.prod(out) * x[-1]
    return 2.0 * math.prod(out[1:]) * x[0]


def instr_flops(ins: Instr, comp: Computation) -> float:
    if ins.opcode == "custom-call":  # Pallas kernels state their cost (e.g. megablox gmm)
        stated = re.search(r'"flops":"?(\d+)', ins.attrs)
        if stated:
            return float(stated.group(1))
    if ins.opcode == "dot":
        return _dot_flops(ins, comp)
    if ins.opcode == "convolution":
        return _conv_flops(ins, comp)
    if ins.opcode == "custom-call" and ins.name.startswith("ragged-dot") and \
            "metadata" not in ins.name:
        return _ragged_dot_flops(ins)
    return 0.0


# ----------------------------------------------------------------------------- collectives

def _collective(ins: Instr) -> tuple[str, float] | None:
    """(kind, bytes) of a collective instruction (async starts counted, dones skipped)."""
    op = ins.opcode
    if op.endswith("-done"):
        return None
    kind = op.removesuffix("-start")
    if kind not in COLLECTIVES:
        return None
    arrays = ins.result
    if op in ("all-gather-start", "reduce-scatter-start", "all-to-all-start"):
        arrays = arrays[len(arrays) // 2:]  # a tuple (operands..., results...)
    elif op in ("collective-permute-start", "ragged-all-to-all-start"):
        arrays = arrays[1:2]  # (operand, result, ...; ragged: its offsets too), context...
    return kind, nbytes(arrays)


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')


def _megascale(ins: Instr) -> tuple[str, float] | None:
    """(kind, bytes) of a cross-slice transfer: on multi-slice TPU programs libtpu lowers a
    collective's DCN step to host-transfer `send`/`recv` pairs tagged with
    `_xla_megascale_transfer_type` (e.g. "ALL_REDUCE") and `_xla_megascale_target`; each
    pair is one collective over the slices, counted at its `send`."""
    if ins.opcode != "send":
        return None
    m = _MEGASCALE.search(ins.attrs)
    if not m:
        return None
    kind = m.group(1).lower().replace("_", "-")
    return (kind if kind in COLLECTIVES else "all-reduce"), nbytes(ins.result[:1])


Link = Callable[[np.ndarray], tuple[float, bool]]  # device ids -> (bytes/s, crosses DCN)


def analyse(text: str, link: Link | None = None, scan_once: bool = False,
            num_slices: int = 2, dcn_bw: float = 0.0) -> dict:
    """{"flops": matmul FLOPs per device per step, "kernel_flops": the part in custom-call
    kernels (grouped matmuls), "multipass_flops": the extra passes of float32 matmuls at
    HIGH/HIGHEST precision, in FLOPs at the bf16 rate, "collectives": {kind:
    CollectiveStats}, "unknown_loops": [...], "unknown_groups": [collectives whose groups
    were unreadable: bytes counted, no wire bytes], "conditionals": [conditionals whose
    branches were all counted], and "ragged_full": CollectiveStats of the ragged
    all-to-alls with full receive buffers (only when there are any)} for one device's
    program. `link(group of device ids)` gives the
    bandwidth a group communicates at and whether it crosses slices (DCN); `scan_once`
    counts loop bodies once (to compare with XLA's cost analysis). Cross-slice (megascale)
    transfers are collectives over `num_slices` slices, all DCN, at `dcn_bw` bytes/s per
    device when given."""
    comps, entry = parse_module(text)
    mult, unknown, conditionals = multiplicities(comps, entry, scan_once)
    header = re.search(r"^HloModule .*$", text, re.MULTILINE)
    header = header.group(0) if header else ""
    devices = math.prod(int(m.group(1)) if m else 1 for m in (
        re.search(r"num_partitions=(\d+)", header), re.search(r"replica_count=(\d+)", header)))
    flops = kernel_flops = multipass = 0.0
    colls: dict[str, CollectiveStats] = defaultdict(CollectiveStats)
    ragged_full = CollectiveStats()  # ragged all-to-alls with full receive buffers
    unknown_groups: list[str] = []
    links: dict[bytes, tuple[float, bool]] = {}

    def timing(groups: np.ndarray) -> tuple[float, bool]:
        """(bytes/s, crosses DCN) of the slowest group (permutes: of the slowest pair)."""
        key = groups.tobytes() + str(groups.shape).encode()
        if key not in links:
            results = [link(g) for g in groups]
            links[key] = (min(bw for bw, _ in results), any(d for _, d in results))
        return links[key]

    for name, comp in comps.items():
        m = mult.get(name, 0.0)
        if not m:
            continue
        for ins in comp.instrs:
            f = m * instr_flops(ins, comp)
            flops += f
            if f and ins.opcode in ("dot", "convolution"):
                multipass += f * (_passes(ins, comp) - 1)
            if ins.opcode == "custom-call":
                kernel_flops += f
            ms = _megascale(ins)
            if ms is not None:
                kind, size = ms
                colls[kind].add(m, size, wire_bytes(kind, size, num_slices), True, dcn_bw)
                continue
            c = _collective(ins)
            if c is None:
                continue
            kind, size = c
            full = size
            if kind == "ragged-all-to-all":
                size, full = _ragged_bytes(ins, comp, size)
            groups = replica_groups(ins.attrs, devices)
            if groups is None:  # bytes counted; what each device sends is unknown
                unknown_groups.append(ins.name)
                colls[kind].add(m, size)
                if kind == "ragged-all-to-all":
                    ragged_full.add(m, full)
                continue
            n = groups.shape[1]
            if kind == "reduce-scatter":
                size *= n  # the operand is n results
            wire = wire_bytes(kind, size, n)
            bw, dcn = timing(groups) if link is not None and wire else (0.0, False)
            colls[kind].add(m, size, wire, dcn, bw)
            if kind == "ragged-all-to-all":
                ragged_full.add(m, full, wire_bytes(kind, full, n), dcn, bw)
    out = {"flops": flops, "kernel_flops": kernel_flops, "multipass_flops": multipass,
           "collectives": dict(colls),
           "unknown_loops": unknown, "unknown_groups": unknown_groups,
           "conditionals": [name for comp, name in conditionals if mult.get(comp)]}
    if ragged_full.count:
        out["ragged_full"] = ragged_full
    return out


def _ragged_bytes(ins: Instr, comp: Computation, result_bytes: float) -> tuple[float, float]:
    """(at balanced load, with full buffers): the bytes a ragged all-to-all moves per device.
    An expert dispatch sends every row of its input (the token copies) into a receive buffer
    of `expert_buffer_factor` x that; the way back (and each transpose) sends from such a
    buffer into exactly the rows routed. At balanced load each moves the smaller of input
    and result; a device whose buffer fills (a hot expert) moves the larger."""
    operand = comp.shapes.get(ins.operands[0]) if ins.operands else None
    if not operand:
        return result_bytes, result_bytes
    return min(result_bytes, nbytes(operand)), max(result_bytes, nbytes(operand))

"""What a collective costs: its device groups, the bytes one device sends, totals per kind.

Pure functions of XLA's printed attributes and sizes; `sharding/hlo.py` finds the
collectives in a compiled module and adds them up here, `sharding/estimate.py` prices
planned ones the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np


def replica_groups(attrs: str, num_devices: int | None = None) -> np.ndarray | None:
    """[groups, group size] device ids from any of XLA's printed formats; `{}` is one group
    of all `num_devices`; a collective-permute gives its [pairs, 2] (source, target) ids.
    None when the attributes hold no groups this reader knows."""
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if m:
        pairs = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
        return np.asarray(pairs) if pairs else None
    if re.search(r"replica_groups=\{\}", attrs):
        return np.arange(num_devices)[None] if num_devices else None
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]*)\]"
                  r"(?:T\(([0-9,]*)\))?\))?\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        ids = np.arange(math.prod(sizes))
        if m.group(2):
            ids = ids.reshape([int(v) for v in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        ids = ids.reshape(sizes)
        listed = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        rest = [i for i in range(len(sizes)) if i not in listed]
        n = math.prod(sizes[i] for i in listed)
        return ids.transpose(rest + listed).reshape(-1, n)
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        ids = np.arange(math.prod(int(v) for v in m.group(2).split(",")))
        ids = ids.reshape([int(v) for v in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        dims = [int(v) for v in m.group(1).split(",")]
        return ids.reshape(-1, dims[-1])
    m = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", attrs)
    if m:
        groups = [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([0-9,]*)\}",
                                                                          m.group(1))]
        if groups and all(len(g) == len(groups[0]) for g in groups):
            return np.asarray(groups)
    return None


@dataclasses.dataclass
class CollectiveStats:
    """Totals for one kind of collective over one step (per device)."""

    count: float = 0.0
    bytes: float = 0.0  # result bytes (operand bytes for reduce-scatter)
    wire_bytes: float = 0.0  # bytes sent by one device (ring / pairwise algorithms)
    dcn_wire_bytes: float = 0.0  # the part whose groups span slices
    seconds: float = 0.0  # wire bytes / the bandwidth of each op's group (when given)
    timed_wire_bytes: float = 0.0  # the wire bytes `seconds` covers
    timed_dcn_wire_bytes: float = 0.0  # ... and their DCN part

    def add(self, count: float, size: float, wire: float = 0.0, dcn: bool = False,
            bandwidth: float = 0.0) -> None:
        """`count` ops of `size` bytes, each device sending `wire` bytes per op, over DCN
        or not, timed at `bandwidth` bytes/s when given."""
        self.count += count
        self.bytes += count * size
        self.wire_bytes += count * wire
        if dcn:
            self.dcn_wire_bytes += count * wire
        if bandwidth and wire:
            self.seconds += count * wire / bandwidth
            self.timed_wire_bytes += count * wire
            if dcn:
                self.timed_dcn_wire_bytes += count * wire


def wire_bytes(kind: str, size: float, n: int) -> float:
    """Bytes one device sends in a `kind` collective of `size` bytes over `n` devices (ring
    algorithms; a permute sends its buffer once)."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * size * (n - 1) / n
    if kind == "collective-permute":
        return size
    return size * (n - 1) / n

"""Accelerator chips: peak bf16 FLOP/s, HBM, and interconnect bandwidth, with sources.

Numbers are per chip, as published by the vendor (sources below, checked 2026-11):
  TPU v4   https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s HBM); ICI
           6 links x 50 GB/s per direction (Jouppi et al., "TPU v4", arXiv:2304.01433).
  TPU v5e  https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GB/s;
           ICI 400 GB/s bidirectional, 4 ports).
  TPU v5p  https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB, 2765 GB/s;
           ICI 1200 GB/s bidirectional, 3D torus = 6 links; DCN 50 Gb/s per chip).
  TPU v6e  https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1638 GB/s;
           ICI 800 GB/s bidirectional, 4 ports).
  TPU7x    https://cloud.google.com/tpu/docs/tpu7x (2307 TFLOP/s bf16, 192 GiB, 7380 GB/s;
           ICI 1200 GB/s bidirectional; two TensorCores = two JAX devices per chip).
  H100 SXM https://www.nvidia.com/en-us/data-center/h100/ (989 TFLOP/s dense bf16, 80 GB,
           3.35 TB/s; NVLink 900 GB/s bidirectional).
  H200 SXM https://www.nvidia.com/en-us/data-center/h200/ (989 TFLOP/s dense bf16, 141 GB,
           4.8 TB/s; NVLink 900 GB/s).
  A100 SXM https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOP/s bf16, 80 GB,
           2.04 TB/s; NVLink 600 GB/s).
  B200     https://www.nvidia.com/en-us/data-center/dgx-b200/ (2.25 PFLOP/s dense bf16 per
           GPU, 180 GB, 8 TB/s; NVLink 1800 GB/s).
GPUs' float32 rate without tensor cores (what a float32 matmul at Precision.HIGHEST runs
at, TF32 being off): A100 19.5, H100 / H200 SXM 67 TFLOP/s (the datasheets above), B200 80
(HGX B200 at 1,000 W, NVIDIA's Blackwell technical brief). TPUs have no float32 matrix
rate: their matrix units run such a matmul as 3 or 6 bf16 passes (sharding/hlo.py).
DCN / inter-node bandwidth for GPUs is taken as 400 Gb/s per GPU (one InfiniBand NDR port
per GPU, the usual H100/H200 cluster design), for groups larger than one NVLink domain of
`NVLINK_DOMAIN` = 8 GPUs (an HGX node); TPU v4/v5e/v6e/7x DCN as 25-50 Gb/s per chip
is a planning assumption, not a published figure (only v5p's 50 Gb/s is).
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2**30
NVLINK_DOMAIN = 8  # GPUs joined by NVLink (one HGX node); larger groups go over the network


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. Bandwidths in bytes/s; `ici_bw` is the chip's total
    bidirectional inter-chip bandwidth over its `ici_links` links (what it can send is half
    of that: collectives are timed by the bytes each device sends)."""

    name: str
    platform: str  # "tpu" | "gpu"
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float
    ici_bw: float
    ici_links: int
    dcn_bw: float
    devices_per_chip: int = 1  # JAX devices per chip (TensorCores exposed separately)
    topology_prefix: str = ""  # libtpu topology name prefix ("v5p" -> "v5p:4x4x4")
    torus_dims: int = 0  # 3 (v4, v5p, 7x) or 2 (v5e, v6e); 0 for GPUs
    # libtpu's chip_config_name for compile-only devices: v4's default config exposes each
    # TensorCore as a device, while v4 hosts run megacore (one device per chip)
    chip_config: str = ""
    # GPUs: float32 FLOP/s without tensor cores (matmuls at Precision.HIGHEST); 0 for TPUs
    f32_flops: float = 0.0

    def ring_bw(self) -> float:
        """Bytes/s one chip sends in a collective along one mesh axis: a bidirectional ring on
        one torus dimension sends over 2 of the chip's links, one direction each (half of
        their bidirectional bandwidth); NVLink switches give GPUs one direction of all."""
        if self.platform == "gpu":
            return self.ici_bw / 2
        return self.ici_bw / self.ici_links


CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip("v4", "tpu", 275e12, 32 * GIB, 1200 * GB, 600 * GB, 6, 25e9 / 8, 1, "v4", 3,
         "megacore"),
    Chip("v5e", "tpu", 197e12, 16 * GB, 819 * GB, 400 * GB, 4, 25e9 / 8, 1, "v5e", 2),
    Chip("v5p", "tpu", 459e12, 95 * GIB, 2765 * GB, 1200 * GB, 6, 50e9 / 8, 1, "v5p", 3),
    Chip("v6e", "tpu", 918e12, 32 * GB, 1638 * GB, 800 * GB, 4, 50e9 / 8, 1, "v6e", 2),
    Chip("tpu7x", "tpu", 2307e12, 192 * GIB, 7380 * GB, 1200 * GB, 6, 50e9 / 8, 2, "tpu7x", 3),
    Chip("a100", "gpu", 312e12, 80 * GB, 2039 * GB, 600 * GB, 12, 400e9 / 8, f32_flops=19.5e12),
    Chip("h100", "gpu", 989e12, 80 * GB, 3350 * GB, 900 * GB, 18, 400e9 / 8, f32_flops=67e12),
    Chip("h200", "gpu", 989e12, 141 * GB, 4800 * GB, 900 * GB, 18, 400e9 / 8, f32_flops=67e12),
    Chip("b200", "gpu", 2250e12, 180 * GB, 8000 * GB, 1800 * GB, 18, 400e9 / 8, f32_flops=80e12),
]}

# Topology names count TensorCores for v4 and v5p ("v5p-128" = 64 chips) and chips for
# the others ("v6e-256" = 256 chips), as Cloud TPU accelerator types do. TPU7x is
# counted like v5p (two TensorCores per chip); give its shape ("tpu7x:4x4x4") to be sure.
CORES_IN_NAME = {"v4": 2, "v5p": 2, "tpu7x": 2}


def get_chip(name: str) -> Chip:
    key = name.lower()
    if key not in CHIPS:
        raise ValueError(f"chip {name!r}: expected one of {', '.join(CHIPS)}")
    return CHIPS[key]

"""The planner's tables and small sums checked by hand, without compiling anything: each
chip's datasheet numbers (sharding/chips.py), one device's shard of an unevenly split array
(sharding/estimate.py), and the pricing of timed and untimed DCN bytes
(sharding/collective_cost.py with estimate.comm_times)."""

from __future__ import annotations

import pytest

from sharding import estimate
from sharding.chips import CHIPS, get_chip
from sharding.collective_cost import CollectiveStats

# name: (HBM bytes, peak dense bf16 FLOP/s), typed in again from the vendors' figures and
# units as sharding/chips.py's docstring quotes its sources (checked 2026-11): Google's v4,
# v5p and TPU7x pages say GiB; its v5e and v6e pages, and NVIDIA's, say GB (10^9 bytes).
DATASHEET = {
    "v4": (32 * 2**30, 275e12),
    "v5e": (16e9, 197e12),
    "v5p": (95 * 2**30, 459e12),
    "v6e": (32e9, 918e12),
    "tpu7x": (192 * 2**30, 2307e12),
    "a100": (80e9, 312e12),
    "h100": (80e9, 989e12),
    "h200": (141e9, 989e12),
    "b200": (180e9, 2250e12),
}


def test_every_chip_has_its_datasheet_hbm_and_peak():
    """Reference: the vendors' figures as chips.py's docstring quotes them, typed in above
    in their units (141 GB for the H200 is 141e9 bytes, not 141 GiB)."""
    assert set(CHIPS) == set(DATASHEET)
    for name, (hbm, peak) in DATASHEET.items():
        chip = get_chip(name)
        assert (chip.hbm_bytes, chip.peak_flops) == (hbm, peak), name


@pytest.mark.parametrize("shape, dim_axes, mesh, expected", [
    ((5,), [("fsdp",)], {"fsdp": 2}, 3),  # ceil(5 / 2)
    ((5, 7), [("fsdp",), ("tensor",)], {"fsdp": 2, "tensor": 4}, 3 * 2),  # ceil(7 / 4) = 2
    ((6, 7), [(), ("data", "fsdp")], {"data": 2, "fsdp": 2}, 6 * 2),  # 7 over 2 x 2 devices
    ((8,), [("fsdp",)], {"fsdp": 2}, 4),  # even: no padding
])
def test_an_uneven_split_holds_the_rounded_up_shard(shape, dim_axes, mesh, expected):
    """Reference: ceil(dim / devices) per dimension, worked out by hand (XLA pads the last
    shard of an uneven split, so every device holds as much as the first)."""
    assert estimate._local_elements(shape, dim_axes, mesh) == expected


def test_untimed_dcn_bytes_go_at_the_dcn_rate_beside_timed_ici_bytes():
    """One all-reduce over ICI timed at its own bandwidth and one over DCN left untimed:
    the DCN bytes are priced at v5p's 50 Gb/s = 6.25 GB/s per chip, the ICI bytes at their
    own rate only. Reference: the sum by hand."""
    stats = CollectiveStats()
    stats.add(1, 1e9, wire=3e9, dcn=False, bandwidth=100e9)  # timed ICI: 0.03 s
    stats.add(1, 1e9, wire=2e9, dcn=True)  # untimed DCN
    assert (stats.wire_bytes, stats.dcn_wire_bytes) == (5e9, 2e9)
    assert (stats.timed_wire_bytes, stats.timed_dcn_wire_bytes) == (3e9, 0.0)
    over, exposed = estimate.comm_times({"all-reduce": stats}, get_chip("v5p"))
    assert over == pytest.approx(3e9 / 100e9 + 2e9 / 6.25e9) and exposed == 0.0

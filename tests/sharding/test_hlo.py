"""The HLO reader: matmul FLOPs with loop trip counts, and collective group parsing.

FLOPs are checked on a real TPU compile (compile-only v5p devices) of a scanned MLP whose
count is known exactly: 6 layers x (forward + 2 backward matmuls) x 2*m*k*n per device.
Counting loop bodies once must agree with XLA's own cost analysis (which does that), within
the elementwise FLOPs XLA adds (< 2% here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding import aot, hlo

LAYERS, M, K = 6, 1024, 512


@pytest.fixture(scope="module")
def scanned_mlp():
    devices = aot.topology_devices(aot.target_from_name("v5p:2x2x1"))
    assert devices is not None, "libtpu must be installed for AOT tests (pip: libtpu)"
    mesh = Mesh(np.asarray(devices).reshape(4), ("x",))

    def loss(ws, x):
        def body(h, w):
            return jnp.tanh(h @ w), None
        return jnp.sum(jax.lax.scan(body, x, ws)[0])

    x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    ws = jax.ShapeDtypeStruct((LAYERS, K, K), jnp.float32,
                              sharding=NamedSharding(mesh, P(None, None, "x")))
    return jax.jit(jax.grad(loss)).lower(ws, x).compile()


def test_flops_apply_trip_counts(scanned_mlp):
    stats = hlo.analyse(scanned_mlp.as_text())
    expected = LAYERS * 3 * 2 * (M // 4) * K * K  # per device: batch split 4 ways
    assert stats["flops"] == pytest.approx(expected, rel=1e-6)
    assert stats["multipass_flops"] == 0  # DEFAULT precision: one bf16 pass
    assert stats["unknown_loops"] == []
    once = hlo.analyse(scanned_mlp.as_text(), scan_once=True)["flops"]
    assert once == pytest.approx(aot.cost_flops(scanned_mlp), rel=0.02)
    assert once < stats["flops"] / 3  # the undercount the reader exists to fix


def test_float32_matmuls_at_highest_precision_count_six_passes():
    """The scanned MLP with its matmuls at Precision.HIGHEST, compiled for v5p: the same
    FLOPs, and 5 extra bf16 passes of each (TPU's bf16_6x) totalled apart; the estimate's
    compute time includes them. At DEFAULT precision there are none (the fixture's test
    above). Reference: the exact count by hand."""
    from sharding import estimate

    target = aot.target_from_name("v5p:2x2x1")
    mesh = Mesh(np.asarray(aot.topology_devices(target)).reshape(4), ("x",))

    def loss(ws, x):
        def body(h, w):
            return jnp.tanh(jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST)), None
        return jnp.sum(jax.lax.scan(body, x, ws)[0])

    x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    ws = jax.ShapeDtypeStruct((LAYERS, K, K), jnp.float32,
                              sharding=NamedSharding(mesh, P(None, None, "x")))
    stats = hlo.analyse(jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text())
    expected = LAYERS * 3 * 2 * (M // 4) * K * K
    assert stats["flops"] == pytest.approx(expected, rel=1e-6)
    assert stats["multipass_flops"] == pytest.approx(5 * expected, rel=1e-6)
    memory = dict.fromkeys(("arguments", "outputs", "aliased", "temporaries", "code",
                            "total"), 0.0)
    r = estimate.from_compiled(target, {"x": 4}, memory, stats, 0.0, 4 * expected)
    assert r.compute_s == pytest.approx(6 * expected / r.peak_flops_per_device)
    assert r.executed_flops == pytest.approx(expected)


PRECISIONS = """HloModule m

ENTRY %main (a: f32[8,16], b: bf16[8,16], w: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = bf16[8,16]{1,0} parameter(1)
  %w = f32[16,4]{1,0} parameter(2)
  %wb = bf16[16,4]{1,0} convert(%w)
  %ff = f32[8,4]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={highest,highest}
  %bf = f32[8,4]{1,0} convolution(%b, %w), dim_labels=bf_io->bf, operand_precision={highest,highest}
  %hb = f32[8,4]{1,0} dot(%b, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={high,high}
  %hh = f32[8,4]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={high,high}
  %bb = f32[8,4]{1,0} dot(%b, %wb), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={highest,highest}
  ROOT %d = f32[8,4]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_extra_passes_follow_the_float32_operands():
    """Each matmul here is 2 x 8 x 16 x 4 FLOPs. Extra bf16 passes: f32 x f32 at HIGHEST 5,
    bf16 x f32 at HIGHEST 2 (the router's forward on TPU: the bf16 -> f32 convert is folded
    into the matmul), bf16 x f32 at HIGH 1, f32 x f32 at HIGH 2, bf16 x bf16 and DEFAULT 0."""
    stats = hlo.analyse(PRECISIONS)
    flops = 2 * 8 * 16 * 4
    assert stats["flops"] == 6 * flops
    assert stats["multipass_flops"] == (5 + 2 + 1 + 2) * flops


def test_collectives_found_with_group_sizes(scanned_mlp):
    colls = hlo.analyse(scanned_mlp.as_text())["collectives"]
    # Weights split 4 ways on their output dim: gathered for each layer (forward and
    # backward) as bfloat16 (TPU's default precision feeds a float32 matmul bf16 operands:
    # K x K x 2 bytes), gradients summed over the 4 batch shards (all-reduced in float32,
    # K x K x 4 bytes per layer; this libtpu does not reduce-scatter them).
    ag, ar = colls["all-gather"], colls["all-reduce"]
    assert (ag.count, ag.bytes) == (2 * LAYERS, 2 * LAYERS * K * K * 2)
    assert ag.wire_bytes == pytest.approx(ag.bytes * 3 / 4)
    assert (ar.count, ar.bytes) == (LAYERS, LAYERS * K * K * 4)
    assert ar.wire_bytes == pytest.approx(ar.bytes * 2 * 3 / 4)
    assert set(colls) == {"all-gather", "all-reduce"}


@pytest.mark.parametrize("attrs, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,4]<=[8], dimensions={0}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0), x", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, x",
     [[0, 2], [1, 3]]),
])
def test_replica_group_formats(attrs, groups):
    np.testing.assert_array_equal(hlo.replica_groups(attrs), groups)


def test_empty_groups_and_permute_pairs():
    np.testing.assert_array_equal(hlo.replica_groups("replica_groups={}, to_apply=%a", 8),
                                  [list(range(8))])
    assert hlo.replica_groups("replica_groups={}, to_apply=%a") is None  # count unknown
    np.testing.assert_array_equal(
        hlo.replica_groups("channel_id=1, source_target_pairs={{0,4},{4,0},{1,5}}"),
        [[0, 4], [4, 0], [1, 5]])


# Async collectives print their result as (operands..., results...); reference: the sizes
# of the results written out by hand; all over 4 devices.
ASYNC = """HloModule m, num_partitions=4

ENTRY %main (a: f32[8], b: f32[32], c: f32[64], d: f32[16]) -> f32[2] {
  %a = f32[8]{0} parameter(0)
  %b = f32[32]{0} parameter(1)
  %c = f32[64]{0} parameter(2)
  %d = f32[16]{0} parameter(3)
  %rs = (f32[8]{0}, f32[2]{0}) reduce-scatter-start(%a), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %rsd = f32[2]{0} reduce-scatter-done(%rs)
  %ag = ((f32[8]{0}, f32[16]{0}), (f32[32]{0}, f32[64]{0})) all-gather-start(%a, %d), replica_groups=[1,4]<=[4], dimensions={0}
  %agd = (f32[32]{0}, f32[64]{0}) all-gather-done(%ag)
  %aa = (f32[16]{0}, f32[16]{0}) all-to-all-start(%d), replica_groups={}, dimensions={0}
  %aad = f32[16]{0} all-to-all-done(%aa)
  %cp = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(%c), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd = f32[64]{0} collective-permute-done(%cp)
  %ar = f32[8]{0} all-reduce(%a), replica_groups=?, to_apply=%add
  ROOT %r = f32[2]{0} copy(%rsd)
}
"""


def test_async_collectives_count_their_results():
    def link(group):  # devices 0, 1 in one slice, 2, 3 in another; across: 1 GB/s
        return (100e9, False) if len({int(i) // 2 for i in group}) == 1 else (1e9, True)

    stats = hlo.analyse(ASYNC, link=link)
    c = stats["collectives"]
    assert (c["reduce-scatter"].count, c["reduce-scatter"].bytes) == (1, 8 * 4)  # operand
    assert c["reduce-scatter"].wire_bytes == pytest.approx(8 * 4 * 3 / 4)
    assert (c["all-gather"].count, c["all-gather"].bytes) == (1, (32 + 64) * 4)
    assert c["all-to-all"].bytes == 16 * 4  # `{}`: all 4 devices of num_partitions
    assert c["all-to-all"].wire_bytes == pytest.approx(16 * 4 * 3 / 4)
    cp = c["collective-permute"]
    assert (cp.count, cp.bytes, cp.wire_bytes) == (1, 64 * 4, 64 * 4)
    # The permute's slowest pair crosses "slices": all of it timed at 1 GB/s, as DCN.
    assert cp.seconds == pytest.approx(64 * 4 / 1e9) and cp.dcn_wire_bytes == 64 * 4
    # A group format this reader does not know: bytes counted, no wire bytes, named.
    assert stats["unknown_groups"] == ["ar"]
    assert (c["all-reduce"].bytes, c["all-reduce"].wire_bytes) == (8 * 4, 0)


def test_trip_count_and_wire_bytes_from_text():
    text = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[8,16]{1,0} all-reduce(%d), replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %w0 = (s32[], f32[8,16]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w0), index=1
}
"""
    stats = hlo.analyse(text)
    assert stats["flops"] == 5 * 2 * 8 * 16 * 16
    ar = stats["collectives"]["all-reduce"]
    assert ar.count == 5 and ar.bytes == 5 * 8 * 16 * 4
    assert ar.wire_bytes == pytest.approx(ar.bytes * 2 * 3 / 4)


# An expert exchange over 4 devices as sharding/expert_parallel.py writes it: 8 token
# copies of width 4 (bf16) go out into a receive buffer of 16 rows (buffer factor 2), and
# come back from it into their 8 rows. Reference: sizes written out by hand. RAGGED_ASYNC
# is the same exchange in the async form (a start's tuple holds its operands, the result
# and a context; the GPU writes it so).
_RAGGED_PARAMETERS = """HloModule m, num_partitions=4

ENTRY %main (x: bf16[8,4], buf: bf16[16,4], back: bf16[8,4], o: s32[4]) -> bf16[8,4] {
  %x = bf16[8,4]{1,0} parameter(0)
  %buf = bf16[16,4]{1,0} parameter(1)
  %back = bf16[8,4]{1,0} parameter(2)
  %o = s32[4]{0} parameter(3)
"""
RAGGED = _RAGGED_PARAMETERS + """  %go = bf16[16,4]{1,0} ragged-all-to-all(%x, %buf, %o, %o, %o, /*index=5*/%o), channel_id=1, replica_groups={{0,1,2,3}}
  ROOT %ret = bf16[8,4]{1,0} ragged-all-to-all(%go, %back, %o, %o, %o, /*index=5*/%o), channel_id=2, replica_groups={{0,1,2,3}}
}
"""


RAGGED_ASYNC = _RAGGED_PARAMETERS + """  %gs = ((bf16[8,4]{1,0}, bf16[16,4]{1,0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, /*index=5*/s32[4]{0}), bf16[16,4]{1,0}, u32[]) ragged-all-to-all-start(%x, %buf, %o, %o, %o, /*index=5*/%o), channel_id=1, replica_groups={{0,1,2,3}}
  %go = bf16[16,4]{1,0} ragged-all-to-all-done(%gs)
  %rs = ((bf16[16,4]{1,0}, bf16[8,4]{1,0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, /*index=5*/s32[4]{0}), bf16[8,4]{1,0}, u32[]) ragged-all-to-all-start(%go, %back, %o, %o, %o, /*index=5*/%o), channel_id=2, replica_groups={{0,1,2,3}}
  ROOT %ret = bf16[8,4]{1,0} ragged-all-to-all-done(%rs)
}
"""


@pytest.mark.parametrize("text", [RAGGED, RAGGED_ASYNC], ids=["sync", "async"])
def test_ragged_exchanges_count_the_rows_routed_at_balanced_load(text):
    """Each way moves the 8 rows routed (2 x 8 x 4 x 2 bytes); counted by their results the
    dispatch would be its 16-row buffer (the old reading: 1.5x). Kept apart: a device whose
    buffer fills receives 16 rows and sends 16 back (the larger of input and result)."""
    stats = hlo.analyse(text, link=lambda group: (1e9, False))
    ragged = stats["collectives"]["ragged-all-to-all"]
    assert (ragged.count, ragged.bytes) == (2, 2 * 8 * 4 * 2)
    assert ragged.wire_bytes == pytest.approx(ragged.bytes * 3 / 4)
    assert ragged.seconds == pytest.approx(ragged.wire_bytes / 1e9)
    full = stats["ragged_full"]
    assert (full.count, full.bytes) == (2, 2 * 16 * 4 * 2)
    assert full.seconds == pytest.approx(full.bytes * 3 / 4 / 1e9)


def test_the_report_prices_full_receive_buffers_apart():
    """The estimate's exposed time is the balanced exchange; the printed full-buffer line
    adds the receive buffers' time. Reference: the arithmetic by hand from the chip's
    numbers (v5p: 459 TFLOP/s; links from comm_times' one-ring fallback, no link model)."""
    from sharding import estimate

    stats = hlo.analyse(RAGGED)  # no link model: comm_times prices the wire bytes
    # FLOPs as small as the exchange, so that both parts of the step show in the MFU
    stats["flops"], stats["kernel_flops"] = 4e4, 2e4
    target = aot.target_from_name("v5p-8")
    chip = target.chip
    r = estimate.from_compiled(target, {"expert": 4}, dict.fromkeys(
        ("arguments", "outputs", "aliased", "temporaries", "code", "total"), 0.0),
        stats, 4e4, 1.2e5, buffer_fill=0.5)
    ring = chip.ring_bw() / chip.devices_per_chip  # what one device sends per second
    assert r.exposed_comm_s == pytest.approx(2 * 8 * 4 * 2 * 3 / 4 / ring)
    assert r.exposed_full_s == pytest.approx(2 * 16 * 4 * 2 * 3 / 4 / ring)
    peak = chip.peak_flops / chip.devices_per_chip
    assert r.compute_s == pytest.approx((4e4 - 0.5 * 2e4) / peak)
    line = next(ln for ln in estimate.format_report(r).splitlines() if "every buffer full" in ln)
    full_step = max(4e4 / peak, r.overlapped_comm_s) + r.exposed_full_s
    assert f"exposed all-to-all {r.exposed_full_s * 1e3:.4g} ms" in line, line
    assert f"MFU {100 * r.mfu(full_step):.1f}%" in line, line
    assert 100 * r.mfu(full_step) < 100 * r.mfu(4e4 / peak + r.exposed_comm_s) - 1
    # Buffers no larger than the balanced load (copies beyond them dropped): no such line
    full_at_balance = dataclasses.replace(r, buffer_fill=1.0)
    assert "every buffer full" not in estimate.format_report(full_at_balance)


MEGASCALE = """HloModule m

ENTRY %main (a: f32[4,128]) -> f32[4,128] {
  %a = f32[4,128]{1,0} parameter(0)
  %ar = f32[4,128]{1,0} all-reduce(%a), replica_groups={{0,1,2,3}}, to_apply=%add
  %aa = token[] after-all()
  %send = (f32[4,128]{1,0}, u32[], token[]) send(%ar, %aa), channel_id=3, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name=\
"xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target=\
"{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[4,128]{1,0}, u32[], token[]) recv(%aa), channel_id=2, is_host_transfer=true, \
frontend_attributes={_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type=\
"ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=3, is_host_transfer=true
  %recv-done = (f32[4,128]{1,0}, token[]) recv-done(%recv), channel_id=2
  ROOT %r = f32[4,128]{1,0} get-tuple-element(%recv-done), index=0
}
"""


@pytest.mark.parametrize("slices", [2, 4])
def test_megascale_transfers_are_dcn_collectives(slices):
    """A cross-slice all-reduce (libtpu: a tagged send/recv pair) is one all-reduce over the
    slices, all of its wire bytes on DCN, at the given DCN bandwidth; the ICI all-reduce
    before it stays on ICI."""
    ici_bw, dcn_bw = 400e9, 6.25e9
    stats = hlo.analyse(MEGASCALE, link=lambda g: (ici_bw, False), num_slices=slices,
                        dcn_bw=dcn_bw)
    ar = stats["collectives"]["all-reduce"]
    size = 4 * 128 * 4
    dcn_wire = 2 * size * (slices - 1) / slices
    ici_wire = 2 * size * 3 / 4
    assert ar.count == 2 and ar.bytes == 2 * size
    assert ar.dcn_wire_bytes == pytest.approx(dcn_wire)
    assert ar.wire_bytes == pytest.approx(ici_wire + dcn_wire)
    assert ar.seconds == pytest.approx(ici_wire / ici_bw + dcn_wire / dcn_bw)


CALL_AND_CONDITIONAL = """HloModule m

%callee (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} constant({...})
  ROOT %d = f32[8,16]{1,0} dot(%p, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%yes (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} constant({...})
  ROOT %d = f32[8,16]{1,0} dot(%p, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%no (p: f32[8,16]) -> f32[8,16] {
  ROOT %p = f32[8,16]{1,0} parameter(0)
}

ENTRY %main (a: f32[8,16], b: pred[]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = pred[] parameter(1)
  %c = f32[8,16]{1,0} call(%a), to_apply=%callee
  ROOT %r = f32[8,16]{1,0} conditional(%b, %c, %c), true_computation=%yes, \
false_computation=%no
}
"""


def test_call_bodies_count_and_conditionals_are_named():
    """A `call` runs its body once (its to_apply is not a reduction); a conditional's
    branches are all counted (an upper bound) and the conditional is listed for the note."""
    stats = hlo.analyse(CALL_AND_CONDITIONAL)
    assert stats["flops"] == 2 * (2 * 8 * 16 * 16)  # the call's dot + the true branch's
    assert stats["conditionals"] == ["r"]


# An all-reduce wrapped in an async computation, as XLA prints one: the start, update and
# done ops each name the wrapped computation (calls=). Reference: one all-reduce of 8
# float32 written out by hand.
ASYNC_WRAPPED = """HloModule m, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%wrapped_all_reduce (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %st = ((f32[8]{0}), f32[8]{0}, s32[]) async-start(%a), calls=%wrapped_all_reduce
  %up = ((f32[8]{0}), f32[8]{0}, s32[]) async-update(%st), calls=%wrapped_all_reduce
  ROOT %dn = f32[8]{0} async-done(%up), calls=%wrapped_all_reduce
}
"""


def test_an_async_wrapped_collective_counts_once():
    """Its computation was counted once per op that names it (3 here)."""
    ar = hlo.analyse(ASYNC_WRAPPED)["collectives"]["all-reduce"]
    assert (ar.count, ar.bytes) == (1, 8 * 4)

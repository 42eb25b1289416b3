"""Expert-parallel dispatch (`sharding.expert_parallel`) against single-device references.

Dropless: equal to `dropless_moe`. Outputs on every layout: ep8, dp2_ep4 and dp4_tp2 with the
"padded" exchange (dp4_tp2 has no expert axis, so no exchange), fsdp2_ep2_tp2 with
"ragged_emulated". Gradients on ep8 and fsdp2_ep2_tp2, each with both exchanges that run on
CPU ("padded", "ragged_emulated"). The real "ragged" exchange (`lax.ragged_all_to_all`) is not
implemented by XLA:CPU and is not run here (test_aot.py only compiles it for TPU). Capacity:
equal to `capacity_moe` applied to each device's token group (GShard groups), drops included.
Small receive buffers: equal to a NumPy float64 model of which copies fit. The TPU grouped
matmul (megablox) equals the model's `expert_ffn`, gradients included (fsdp2_ep2_tp2, padded).
Tolerance: 1e-5 absolute on outputs of size ~1 and on gradients (float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from jaxmoe.model.moe.capacity import capacity_moe
from jaxmoe.model.moe.dropless import dropless_moe, expert_ffn
from sharding.expert_parallel import make_expert_dispatch, megablox_ffn

TOL = 1e-5
T, D, F, E, K = 64, 16, 32, 8, 2
LAYOUTS = {"ep8": {"expert": 8}, "dp2_ep4": {"data": 2, "expert": 4},
           "fsdp2_ep2_tp2": {"fsdp": 2, "expert": 2, "tensor": 2}, "dp4_tp2": {"data": 4,
                                                                               "tensor": 2}}


@pytest.fixture(scope="module")
def inputs():
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    probs = jax.nn.softmax(2.0 * jax.random.normal(ks[1], (T, E)))
    w, idx = jax.lax.top_k(probs, K)
    ws = tuple(0.3 * jax.random.normal(k, s) for k, s in
               zip(ks[2:5], [(E, D, F), (E, D, F), (E, F, D)]))
    return x, w, idx.astype(jnp.int32), ws


def mesh_of(layout):
    return sharding.make_mesh({"data": 1, **layout}, jax.devices())


def run(layout, inputs, *, dispatch="dropless", impl="padded", buffer_factor=0.0, cf=1.0,
        mask=None):
    mesh = mesh_of(layout)
    fn = make_expert_dispatch(mesh, sharding.DEFAULT_RULES, impl, buffer_factor)
    x, w, idx, ws = inputs
    mask = jnp.ones((T,), bool) if mask is None else mask

    def f(x, w, *ws):
        return fn(x, w, idx, *ws, dispatch=dispatch, capacity_factor=cf, token_mask=mask,
                  ffn=expert_ffn)

    with jax.set_mesh(mesh):
        return jax.jit(f)(x, w, *ws)


@pytest.mark.parametrize("layout, impl", [
    ("ep8", "padded"), ("dp2_ep4", "padded"), ("dp4_tp2", "padded"),
    ("fsdp2_ep2_tp2", "ragged_emulated")])
def test_dropless_matches_single_device(layout, impl, inputs):
    x, w, idx, ws = inputs
    y, dropped = run(LAYOUTS[layout], inputs, impl=impl)
    np.testing.assert_allclose(y, dropless_moe(x, w, idx, *ws), atol=TOL)
    assert float(dropped) == 0


@pytest.mark.parametrize("layout, impl, matmul", [
    ("ep8", "padded", "model"), ("ep8", "ragged_emulated", "model"),
    ("fsdp2_ep2_tp2", "padded", "megablox_interpret"),
    ("fsdp2_ep2_tp2", "ragged_emulated", "model")])
def test_dropless_gradients_match(layout, impl, matmul, inputs):
    """Both CPU exchanges, and the TPU grouped matmul (Pallas megablox, run by its
    interpreter here)."""
    x, w, idx, ws = inputs
    mesh = mesh_of(LAYOUTS[layout])
    fn = make_expert_dispatch(mesh, sharding.DEFAULT_RULES, impl, matmul=matmul)
    cot = jax.random.normal(jax.random.key(9), (T, D))

    def loss_ep(x, w, *ws):
        y, _ = fn(x, w, idx, *ws, dispatch="dropless", capacity_factor=1.0,
                  token_mask=jnp.ones((T,), bool), ffn=expert_ffn)
        return jnp.sum(y * cot)

    def loss_ref(x, w, *ws):
        return jnp.sum(dropless_moe(x, w, idx, *ws) * cot)

    with jax.set_mesh(mesh):
        g = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4)))(x, w, *ws)
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=TOL)


@pytest.mark.parametrize("layout, padded", [("ep8", False), ("fsdp2_ep2_tp2", False),
                                            ("ep8", True)])
def test_capacity_matches_per_group_reference(layout, padded, inputs):
    """Capacity factor 1.0 drops copies here; each device's tokens are one GShard group.
    padded: the first 3 of every 8 tokens are padding, which must take no slot."""
    x, w, idx, ws = inputs
    mask = (jnp.arange(T) % 8 >= 3) if padded else jnp.ones((T,), bool)
    y, dropped = run(LAYOUTS[layout], inputs, dispatch="capacity", cf=1.0, mask=mask)
    mesh = mesh_of(LAYOUTS[layout])
    groups = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    g = T // groups
    refs = [capacity_moe(x[i * g:(i + 1) * g], w[i * g:(i + 1) * g], idx[i * g:(i + 1) * g],
                         *ws, 1.0, mask[i * g:(i + 1) * g]) for i in range(groups)]
    np.testing.assert_allclose(y, jnp.concatenate([r[0] for r in refs]), atol=TOL)
    assert float(dropped) == sum(int(r[1]) for r in refs) > 0


def _ffn64(x, e, ws):
    wg, wu, wd = (np.asarray(a, np.float64)[e] for a in ws)
    h = x @ wg
    return ((h / (1 + np.exp(-h))) * (x @ wu)) @ wd


def buffer_reference(inputs, impl: str, factor: float, n: int):
    """float64 model of which copies fit the receive buffers (one exchange group of n)."""
    x, w, idx, ws = (np.asarray(a, np.float64) if i < 2 else a for i, a in enumerate(inputs))
    idx = np.asarray(idx)
    t = T // n
    rows, e_local = t * K, E // n
    kept = np.zeros((T, K), bool)
    used = np.zeros(n, int)  # ragged: rows filled at each destination, sources in order
    for s in range(n):
        copies = [(idx[s * t + i, j], s * t + i, j) for i in range(t) for j in range(K)]
        copies.sort(key=lambda c: (c[0], (c[1] - s * t) * K + c[2]))  # stable by expert
        for r in range(n):
            mine = [c for c in copies if c[0] // e_local == r]
            room = (math.ceil(factor * rows / n) if impl == "padded"
                    else max(0, math.ceil(factor * rows) - used[r]))
            for _, tok, j in mine[:room]:
                kept[tok, j] = True
            used[r] += len(mine)
    y = np.zeros((T, D))
    for tok in range(T):
        for j in range(K):
            if kept[tok, j]:
                y[tok] += w[tok, j] * _ffn64(x[tok], idx[tok, j], ws)
    return y, int((~kept).sum())


@pytest.mark.parametrize("impl", ["padded", "ragged_emulated"])
@pytest.mark.parametrize("factor", [0.5, 0.7])  # 0.7: buffers of 1.4 and 11.2 rows round up
def test_small_buffers_drop_exactly_the_overflow(impl, factor, inputs):
    y, dropped = run(LAYOUTS["ep8"], inputs, impl=impl, buffer_factor=factor)
    y_ref, dropped_ref = buffer_reference(inputs, impl.split("_")[0], factor, 8)
    assert float(dropped) == dropped_ref > 0
    np.testing.assert_allclose(y, y_ref, atol=TOL)


def test_expert_axis_must_shard_batch():
    mesh = mesh_of({"data": 2, "expert": 4})
    rules = sharding.make_rules({"batch": ["data"]})
    with pytest.raises(sharding.MeshError, match="must also shard 'batch'"):
        make_expert_dispatch(mesh, rules)
    assert make_expert_dispatch(sharding.make_mesh({"data": 1}, jax.devices()[:1]),
                                sharding.DEFAULT_RULES) is None


def test_a_dense_model_needs_no_expert_parallel_rules():
    """A dense model has no MoE block for the dispatch, so `batch` may take the tensor axis
    that also splits the MLP width; it was refused (by name: "expert axes ('expert',) must
    also shard 'batch'", for an axis of size 1; then "'mlp' axes ('tensor',) must not shard
    'batch'"). Reference: the layout as written (the trainer builds on it; one step of it
    trains too, checked by hand: loss 8.76 on 8 CPU devices)."""
    from jaxmoe.train.loop import build_trainer
    from tests.sharding._helpers import tiny_config

    trainer = build_trainer(tiny_config("model.num_experts=0", "mesh.data=2", "mesh.tensor=4",
                                        "mesh.rules={batch: [data, tensor]}"))
    assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert trainer.batch_sharding.spec[0] == ("data", "tensor")


def test_ragged_exchange_on_cpu_is_refused_before_compiling():
    """XLA:CPU has no ragged-all-to-all: `mesh.expert_all_to_all=ragged` passed every check
    and failed in the first train step's compile, with a traceback."""
    mesh = mesh_of({"data": 2, "expert": 4})
    with pytest.raises(sharding.MeshError) as e:
        make_expert_dispatch(mesh, sharding.DEFAULT_RULES, "ragged")
    assert str(e.value) == ("mesh.expert_all_to_all='ragged' on cpu devices: expected padded, "
                            "ragged_emulated or auto (XLA:CPU has no ragged-all-to-all)")
    assert make_expert_dispatch(mesh, sharding.DEFAULT_RULES, "auto") is not None


@pytest.mark.parametrize("rows, sizes", [
    (40, [10, 0, 17, 8]),  # 35 of 40 rows in groups (one tile), one group empty
    # more than one 512-row tile and not a whole number of them: padded to 1,024 rows
    # (the TPU compile failed: "600 must be divisible by x-dimension tile size (512)")
    (600, [300, 0, 250, 40]),
])
def test_megablox_ffn_equals_expert_ffn(rows, sizes):
    """Forward only: its gradients are checked inside EP above (padded rows included)."""
    ks = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(ks[0], (rows, D))
    gs = jnp.array(sizes, jnp.int32)
    ws = [0.3 * jax.random.normal(k, s) for k, s in
          zip(ks[1:4], [(4, D, F), (4, D, F), (4, F, D)])]
    y = megablox_ffn(x, gs, *ws, interpret=True)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, expert_ffn(x, gs, *ws), atol=TOL)
    assert float(jnp.abs(y[sum(sizes):]).max()) == 0.0

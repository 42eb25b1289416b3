"""MoE block vs the naive float64 loop reference (tests/reference/moe_reference.py).

Tolerances: float32 compute vs float64 reference: 2e-5 relative to the output scale;
bfloat16 compute: 1e-2 of the output scale (router logits: float32, 1e-6); the gradient
checks run the block itself in float64 (central differences, step 1e-6): rtol 1e-5, atol
1e-6; the two dispatch paths' float32 gradients agree to rtol 1e-4, atol 1e-5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe  # noqa: F401  (sets Flax config)
from jaxmoe.config import ModelConfig
from jaxmoe.model.moe import MoEBlock, expert_capacity
from jaxmoe.model.precision import Precision
from tests.reference import moe_reference as ref

F32 = Precision(jnp.float32, jnp.float32, jnp.float32)
F64 = Precision(jnp.float64, jnp.float64, jnp.float64)
TOL = 2e-5
TOL_BF16 = 1e-2

BASE = ModelConfig(embed_dim=16, num_experts=6, num_experts_per_tok=2, expert_mlp_dim=24,
                   init_std=0.5, compute_dtype="float32")


def block_params(block: MoEBlock) -> dict:
    p = {"router": block.router.kernel[...], "bias": block.router.bias[...],
         "w_gate": block.w_gate[...], "w_up": block.w_up[...], "w_down": block.w_down[...]}
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def shared_params(block: MoEBlock):
    if block.shared is None:
        return None, None
    s = tuple(np.asarray(w[...], np.float64) for w in
              (block.shared.gate, block.shared.up, block.shared.down))
    g = None if block.shared_gate is None else np.asarray(block.shared_gate[...], np.float64)
    return s, g


def run_block(cfg, x, precision=F32, bias=None):
    block = MoEBlock(cfg, precision, nnx.Rngs(1))
    if bias is not None:
        block.router.bias[...] = jnp.asarray(bias, jnp.float32)
    y, stats = block(jnp.asarray(x, precision.compute_dtype)[None], jnp.ones((1, x.shape[0]), bool))
    return block, np.asarray(y[0], np.float64), stats


CASES = {
    "softmax_renorm": dict(router_scoring="softmax", norm_topk_prob=True),
    "softmax_no_renorm": dict(router_scoring="softmax", norm_topk_prob=False),
    "sigmoid_scaled": dict(router_scoring="sigmoid", norm_topk_prob=True,
                           routed_scaling_factor=2.5),
    "sigmoid_no_renorm": dict(router_scoring="sigmoid", norm_topk_prob=False),
    "shared_ungated": dict(num_shared_experts=1, shared_expert_mlp_dim=20),
    "shared_gated": dict(num_shared_experts=1, shared_expert_mlp_dim=20, shared_expert_gate=True),
    "top1": dict(num_experts_per_tok=1),
}


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_matches_loop_reference(case, dispatch):
    # Capacity large enough that nothing drops: both paths must equal the dropless reference.
    cfg = dataclasses.replace(BASE, dispatch=dispatch, capacity_factor=10.0, **CASES[case])
    x = np.random.default_rng(0).normal(size=(20, cfg.embed_dim))
    block, y, stats = run_block(cfg, x)
    shared, gate = shared_params(block)
    want, dropped = ref.moe_forward(
        x, block_params(block), top_k=cfg.num_experts_per_tok, scoring=cfg.router_scoring,
        norm_topk_prob=cfg.norm_topk_prob, scaling=cfg.routed_scaling_factor,
        shared=shared, shared_gate=gate)
    assert dropped == 0 and float(stats.dropped) == 0
    np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_selection_bias_changes_choice_not_weights():
    """Aux-free bias (DeepSeek-V3) steers selection; weights are the unbiased scores."""
    cfg = dataclasses.replace(BASE, router_scoring="sigmoid")
    x = np.random.default_rng(1).normal(size=(16, cfg.embed_dim))
    bias = np.array([0.0, 0.0, 0.0, 0.0, 0.9, 0.9])  # strongly favour experts 4 and 5
    block, y, stats = run_block(cfg, x, bias=bias)
    p = block_params(block)
    want, _ = ref.moe_forward(x, p, top_k=2, scoring="sigmoid")
    np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL * np.abs(want).max())
    load = np.asarray(stats.load)
    assert load[4] + load[5] > 0.8 * load.sum(), load  # the bias moved the load


BF16 = Precision(jnp.float32, jnp.bfloat16, jnp.float32)


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)


def test_router_is_float32_under_bfloat16_compute():
    """The precision policy (precision.py): with bfloat16 compute the router's logits and
    scores stay float32. Reference: float64 logits of the same bf16 tokens and float32
    kernel, and their float64 softmax; atol 1e-6 of the largest (bf16 logits: ~4e-3 off)."""
    cfg = dataclasses.replace(BASE, compute_dtype="bfloat16")
    block = MoEBlock(cfg, BF16, nnx.Rngs(1))
    x = _bf16(np.random.default_rng(11).normal(size=(40, cfg.embed_dim)))
    r = block.router(jnp.asarray(x, jnp.bfloat16))
    assert r.logits.dtype == r.probs.dtype == r.weights.dtype == jnp.float32
    logits = x @ np.asarray(block.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.logits, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
    np.testing.assert_allclose(r.probs, probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_block_bfloat16_close_to_float64_reference(dispatch):
    """bfloat16 compute (the default policy) vs the float64 loop reference on the same
    bf16-rounded tokens and expert weights (the float32 router kernel as stored): within
    TOL_BF16 of the largest output (bf16 outputs and activations round at ~0.4%; measured
    0.44-0.46%)."""
    cfg = dataclasses.replace(BASE, compute_dtype="bfloat16", dispatch=dispatch,
                              capacity_factor=10.0, num_shared_experts=1,
                              shared_expert_mlp_dim=20, shared_expert_gate=True)
    x = _bf16(np.random.default_rng(12).normal(size=(20, cfg.embed_dim)))
    block, y, stats = run_block(cfg, x, precision=BF16)
    p = block_params(block)
    p.update({k: _bf16(p[k]) for k in ("w_gate", "w_up", "w_down")})
    shared, gate = shared_params(block)
    want, _ = ref.moe_forward(x, p, top_k=2, shared=tuple(map(_bf16, shared)), shared_gate=gate)
    assert float(stats.dropped) == 0
    np.testing.assert_allclose(y, want, rtol=0, atol=TOL_BF16 * np.abs(want).max())


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_capacity_drops_expected_copies(factor):
    """Capacity dispatch vs the float64 loop reference with the same capacity (GShard: token
    order decides who keeps a slot): same outputs (TOL of the output scale) and the same
    number of dropped copies, exactly."""
    cfg = dataclasses.replace(BASE, dispatch="capacity", capacity_factor=factor)
    x = np.random.default_rng(2).normal(size=(24, cfg.embed_dim))
    block, y, stats = run_block(cfg, x)
    c = expert_capacity(24, 2, cfg.num_experts, factor)
    assert c == ref.capacity_for(24, 2, cfg.num_experts, factor)
    want, dropped = ref.moe_forward(x, block_params(block), top_k=2, capacity=c)
    assert int(stats.dropped) == dropped
    if factor < 1.0:
        assert dropped > 0  # the test must exercise dropping
    np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_capacity_padding_takes_no_slot():
    """Leading padding tokens that all look alike (one pad embedding) would fill an expert's
    slots before the real tokens (GShard priority is in token order) if they took slots."""
    cfg = dataclasses.replace(BASE, dispatch="capacity", capacity_factor=0.5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(24, cfg.embed_dim))
    x[:8] = x[0]  # 8 leading pad tokens with one embedding: the same two experts, 8 times
    valid = np.arange(24) >= 8
    block = MoEBlock(cfg, F32, nnx.Rngs(1))
    y, stats = block(jnp.asarray(x, jnp.float32)[None], jnp.asarray(valid)[None])
    c = expert_capacity(24, 2, cfg.num_experts, 0.5)
    want, dropped = ref.moe_forward(x, block_params(block), top_k=2, capacity=c, valid=valid)
    assert int(stats.dropped) == dropped
    y = np.asarray(y[0], np.float64)
    np.testing.assert_allclose(y[valid], want[valid], rtol=TOL, atol=TOL * np.abs(want).max())


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_losses_and_loads_match_reference(scoring):
    cfg = dataclasses.replace(BASE, router_scoring=scoring)
    x = np.random.default_rng(3).normal(size=(30, cfg.embed_dim))
    block, _, stats = run_block(cfg, x)
    aux, z, load = ref.aux_losses(x, block_params(block), top_k=2, scoring=scoring)
    np.testing.assert_allclose(float(stats.aux_loss), aux, rtol=1e-5)
    np.testing.assert_allclose(float(stats.z_loss), z, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.load), load)


def test_aux_loss_is_transformers_mixtral_loss_over_k():
    """Reference: transformers' `load_balancing_loss_func` (Mixtral), which counts f_e over
    tokens rather than top-k assignments: k times jaxmoe's value (configs/mixtral_8x7b.yaml
    doubles the coefficient accordingly). Padding excluded in both."""
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = BASE
    x = np.random.default_rng(7).normal(size=(20, cfg.embed_dim))
    mask = np.arange(20) < 15
    block = MoEBlock(cfg, F32, nnx.Rngs(1))
    _, stats = block(jnp.asarray(x, jnp.float32)[None], jnp.asarray(mask)[None])
    logits = torch.tensor(x @ block_params(block)["router"])
    hf = load_balancing_loss_func((logits,), cfg.num_experts, top_k=2,
                                  attention_mask=torch.tensor(mask)[None])
    np.testing.assert_allclose(float(stats.aux_loss) * 2, float(hf), rtol=1e-5)


def test_padding_tokens_are_excluded_from_statistics():
    cfg = BASE
    x = np.random.default_rng(4).normal(size=(12, cfg.embed_dim))
    block = MoEBlock(cfg, F32, nnx.Rngs(1))
    mask = np.arange(12) < 7
    _, stats = block(jnp.asarray(x, jnp.float32)[None], jnp.asarray(mask)[None])
    aux, z, load = ref.aux_losses(x[:7], block_params(block), top_k=2, scoring="softmax")
    np.testing.assert_array_equal(np.asarray(stats.load), load)
    np.testing.assert_allclose(float(stats.aux_loss), aux, rtol=1e-5)
    np.testing.assert_allclose(float(stats.z_loss), z, rtol=1e-5)


def _loss_fn(cfg, graphdef, x, r):
    def loss(state, x):
        block = nnx.merge(graphdef, state)
        y, stats = block(x[None], jnp.ones((1, x.shape[0]), bool))
        return jnp.sum(y[0] * r) + stats.aux_loss + stats.z_loss
    return loss


@pytest.mark.parametrize("dispatch,factor", [("dropless", 10.0), ("capacity", 10.0),
                                             ("capacity", 0.5)])
def test_gradients_match_finite_differences(dispatch, factor):
    """float64 block: jax.grad vs central differences on every coordinate of the router
    kernel and of x, 8 random coordinates of each other parameter, and 8 random directions
    through all of them at once (with factor 0.5 some copies are dropped: their experts get
    no gradient from them). (Sampling 40 coordinates in all let a stop_gradient on the
    routing weights pass the factor-0.5 case.)"""
    cfg = dataclasses.replace(BASE, dispatch=dispatch, capacity_factor=factor,
                              num_shared_experts=1, shared_expert_mlp_dim=8,
                              shared_expert_gate=True)
    with jax.enable_x64(True):
        block = MoEBlock(cfg, F64, nnx.Rngs(1))
        graphdef, state = nnx.split(block)
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.normal(size=(10, cfg.embed_dim)))
        r = jnp.asarray(rng.normal(size=(10, cfg.embed_dim)))
        _, stats = block(x[None], jnp.ones((1, 10), bool))
        assert (float(stats.dropped) > 0) == (factor < 1)
        loss = jax.jit(_loss_fn(cfg, graphdef, x, r))
        g_state, g_x = jax.grad(loss, argnums=(0, 1))(state, x)
        flat, unflatten = jax.flatten_util.ravel_pytree((state, x))
        g_flat, _ = jax.flatten_util.ravel_pytree((g_state, g_x))
        eps = 1e-6

        def central(v):  # directional derivative of the loss along v, by differences
            return float(loss(*unflatten(flat + eps * v)) - loss(*unflatten(flat - eps * v))
                         ) / (2 * eps)

        # ravel_pytree concatenates the leaves in tree order: each leaf's coordinate range
        leaves = jax.tree_util.tree_leaves_with_path((state, x))
        starts = np.cumsum([0] + [leaf.size for _, leaf in leaves])
        coords = []
        for (path, leaf), start in zip(leaves, starts):
            name = jax.tree_util.keystr(path)
            whole = "router" in name and "kernel" in name or path[0].idx == 1  # router, x
            n = leaf.size if whole else min(8, leaf.size)
            coords += list(start + rng.choice(leaf.size, size=n, replace=False))
        assert len(coords) > 16 * 6 + 10 * 16  # the router kernel and x, whole
        for i in coords:
            fd = central(jnp.zeros_like(flat).at[i].set(1.0))
            np.testing.assert_allclose(float(g_flat[i]), fd, rtol=1e-5, atol=1e-6)
        for _ in range(8):
            v = rng.normal(size=flat.size)
            v = jnp.asarray(v / np.linalg.norm(v))
            np.testing.assert_allclose(float(g_flat @ v), central(v), rtol=1e-5, atol=1e-6)


def test_dropless_and_capacity_gradients_agree():
    """Two independent dispatch implementations give the same gradients (no drops)."""
    grads = []
    x = np.random.default_rng(6).normal(size=(14, BASE.embed_dim)).astype(np.float32)
    r = np.random.default_rng(7).normal(size=(14, BASE.embed_dim)).astype(np.float32)
    for dispatch in ("dropless", "capacity"):
        cfg = dataclasses.replace(BASE, dispatch=dispatch, capacity_factor=10.0)
        graphdef, state = nnx.split(MoEBlock(cfg, F32, nnx.Rngs(1)))
        g = jax.grad(_loss_fn(cfg, graphdef, x, r), argnums=(0, 1))(state, jnp.asarray(x))
        grads.append(jax.flatten_util.ravel_pytree(g)[0])
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [[7, 0, 13, 4], [0, 0, 24, 0], [1, 1, 1, 1], [5, 9, 0, 2]])
def test_grouped_matmul_implementations_agree(sizes):
    """`blocks` vs `ragged_dot` vs a per-row float64 loop; rows past sum(sizes) give zeros."""
    from jaxmoe.model.moe.dropless import expert_ffn

    rows, d, f = 24, 8, 12
    rng = np.random.default_rng(8)
    x = rng.normal(size=(rows, d))
    w = [rng.normal(size=s) for s in ((4, d, f), (4, d, f), (4, f, d))]
    gs = np.array(sizes, np.int32)
    group = np.repeat(np.arange(4), gs)
    want = np.zeros((rows, d))
    for r, e in enumerate(group):
        want[r] = ref.expert(x[r], w[0][e], w[1][e], w[2][e])
    args = [jnp.asarray(a, jnp.float32) for a in (x, *w)]
    outs = {}
    for impl in ("blocks", "ragged_dot"):
        outs[impl] = np.asarray(expert_ffn(args[0], jnp.asarray(gs), *args[1:], impl=impl))
        np.testing.assert_allclose(outs[impl], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    def loss(impl):
        return lambda *a: jnp.sum(expert_ffn(a[0], jnp.asarray(gs), *a[1:], impl=impl) ** 2)
    g_blocks = jax.grad(loss("blocks"), argnums=(0, 1, 2, 3))(*args)
    g_ragged = jax.grad(loss("ragged_dot"), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g_blocks, g_ragged):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_block_layout_bound_and_padding():
    """Block size: the largest power of two <= rows / (8 groups), clamped to [8, 256], worked
    by hand: 2048 / 32 = 64; 10^6 / 3072 = 325 -> 256 (cap); 40 / 48 < 1 -> 8 (floor). The
    layout against the group sizes: enough blocks for sum ceil(size / 8) = 1 + 0 + 3 + 1 = 5
    whatever the sizes (static bound 7), rows in distinct slots of their own group's blocks,
    rows past sum(sizes) dropped."""
    from jaxmoe.model.moe.dropless import block_layout, block_size, block_tiers

    assert block_size(2048, 4) == 64 and block_size(10**6, 384) == 256 and block_size(40, 6) == 8
    gs = jnp.asarray([5, 0, 17, 3], jnp.int32)
    tiers = block_tiers(30, 4, exact=False)
    assert tiers == ((8, 7),)  # (30 rows + 4 groups x 7 rows of padding at most) // 8
    dest, (block_group,) = block_layout(gs, 30, tiers)
    dest = np.asarray(dest)
    used = dest[:25] // 8
    assert len(set(used)) == 5  # each group's rows fill ceil(size / 8) blocks, no more
    assert len(set(dest[:25])) == 25 and (dest[25:] == 7 * 8).all()  # padding rows dropped
    # every row lands in a block of its own expert
    group_of_row = np.repeat(np.arange(4), np.asarray(gs))
    np.testing.assert_array_equal(np.asarray(block_group)[dest[:25] // 8], group_of_row)


def test_block_tiers_worked_by_hand():
    """2048 rows, 4 groups: big blocks of 2048 / 8 = 256 rows, ceil((2048 - 4 x 255) / 256) = 5
    of them (every grouping fills 5: sum floor(size / 256) >= 4.02), then (2048 - 1280 + 4 x
    63) // 64 = 15 blocks of 64: 2,240 slots, the same as 35 blocks of 64. A requested size,
    rows that may be padding (exact=False) or too few rows for big blocks: one size."""
    from jaxmoe.model.moe.dropless import block_tiers

    assert block_tiers(2048, 4) == ((256, 5), (64, 15))
    assert block_tiers(8192, 4) == ((512, 13), (256, 9))  # big blocks capped at 512 rows
    assert block_tiers(2048, 4, requested=64) == ((64, 35),)
    assert block_tiers(2048, 4, exact=False) == ((64, 35),)
    assert block_tiers(40, 6) == ((8, 10),)  # big would be 2 rows < 2 x 8
    assert block_tiers(2048, 1) == ((512, 4),)  # one group fills every big block, no rest


def _layout_cases(rng, rows, groups, big):
    """Group sizes summing to `rows`: one group takes all, balanced, all groups but the first
    one row short of a big block (the first takes the rest), and random (Dirichlet) splits."""
    balanced = np.full(groups, rows // groups)
    balanced[: rows % groups] += 1
    cases = [np.eye(groups, dtype=np.int64)[0] * rows, balanced]
    short = np.full(groups, big - 1)
    short[0] += rows - short.sum()
    cases.append(short)
    for alpha in (0.3, 1.0, 10.0):
        for _ in range(5):
            p = rng.dirichlet(np.full(groups, alpha))
            sizes = np.floor(p * rows).astype(np.int64)
            sizes[rng.integers(groups)] += rows - sizes.sum()
            cases.append(sizes)
    return cases


@pytest.mark.parametrize("rows,groups", [(2048, 4), (256, 4), (1000, 6), (16384, 64), (100, 1)])
def test_two_tier_layout_places_every_row_in_its_groups_block(rows, groups):
    """Reference: the definition. For adversarial and random group sizes summing to `rows`:
    every row gets its own slot inside the static buffer, in a block of its own group (a
    block holds one group's rows only), and the big blocks are always full."""
    from jaxmoe.model.moe.dropless import block_layout, block_tiers

    tiers = block_tiers(rows, groups)
    assert len(tiers) == 2, tiers
    (big, n_big), (small, n_small) = tiers
    starts = [0, n_big * big]
    for sizes in _layout_cases(np.random.default_rng(rows), rows, groups, big):
        assert sizes.sum() == rows and (sizes >= 0).all()
        dest, block_groups = block_layout(jnp.asarray(sizes, jnp.int32), rows, tiers)
        dest = np.asarray(dest)
        assert len(set(dest)) == rows and dest.min() >= 0
        assert dest.max() < starts[1] + n_small * small
        group_of_row = np.repeat(np.arange(groups), sizes)
        for tier, ((block, _), start) in enumerate(zip(tiers, starts)):
            mine = (dest >= start) & (dest < start + tiers[tier][1] * block)
            blk = (dest[mine] - start) // block
            np.testing.assert_array_equal(np.asarray(block_groups[tier])[blk], group_of_row[mine])
        # the big tier is always full: n_big * big rows go through big matmuls
        assert (dest < starts[1]).sum() == n_big * big


def test_two_tier_layout_every_split_of_96_rows_in_3_groups():
    """Reference: the definition, for all 4,753 splits of 96 rows into 3 groups (tiers
    ((16, 4), (8, 6)); with one small block fewer 1,638 of them would not fit): each row
    gets its own slot, in a block of its own group, and the big blocks are full."""
    from jaxmoe.model.moe.dropless import block_layout, block_tiers

    rows, groups = 96, 3
    tiers = block_tiers(rows, groups)
    assert tiers == ((16, 4), (8, 6))
    (big, n_big), (small, n_small) = tiers
    splits = np.array([(a, b, rows - a - b) for a in range(rows + 1) for b in range(rows + 1 - a)])
    layout = jax.jit(jax.vmap(lambda gs: block_layout(gs, rows, tiers)))
    dest, (g_big, g_small) = jax.tree.map(np.asarray, layout(jnp.asarray(splits, jnp.int32)))
    slots = n_big * big + n_small * small
    assert dest.min() >= 0 and dest.max() < slots
    assert all(len(np.unique(d)) == rows for d in dest)
    group_of_block = np.concatenate([np.repeat(g_big, big, axis=1),
                                     np.repeat(g_small, small, axis=1)], axis=1)
    for sizes, d, gob in zip(splits, dest, group_of_block):
        np.testing.assert_array_equal(gob[d], np.repeat(np.arange(groups), sizes))
    assert ((dest < n_big * big).sum(axis=1) == n_big * big).all()


def test_two_tier_dropless_matches_loop_reference():
    """256 token copies over 4 experts use both block sizes (((32, 5), (8, 15))); outputs
    against the float64 per-token loop (float32: 2e-5 of the output scale), gradients against
    one block size of 8 rows (rtol 1e-4), with balanced and skewed routing."""
    from jaxmoe.model.moe.dropless import block_tiers, dropless_moe

    t, d, f, e, k = 128, 8, 12, 4, 2
    assert block_tiers(t * k, e) == ((32, 5), (8, 15))
    rng = np.random.default_rng(10)
    x64 = rng.normal(size=(t, d))
    ws64 = [rng.normal(size=s) for s in ((e, d, f), (e, d, f), (e, f, d))]
    x = jnp.asarray(x64, jnp.float32)
    ws = [jnp.asarray(w, jnp.float32) for w in ws64]
    for skew in (0.0, 3.0):
        logits = rng.normal(size=(t, e)) + skew * np.arange(e)[::-1]
        idx = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
        wts = rng.uniform(size=(t, k))
        want = np.zeros((t, d))
        for i in range(t):
            for j in range(k):
                want[i] += wts[i, j] * ref.expert(x64[i], *(w[idx[i, j]] for w in ws64))
        idx_j, wts_j = jnp.asarray(idx), jnp.asarray(wts, jnp.float32)
        got = dropless_moe(x, wts_j, idx_j, *ws, "blocks")
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())

        def loss(x, w_gate, w_up, w_down, wts, idx, block):
            return jnp.sum(dropless_moe(x, wts, idx, w_gate, w_up, w_down, "blocks", block) ** 2)
        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        g_tiers = grad(x, *ws, wts_j, idx_j, 0)
        g_one = grad(x, *ws, wts_j, idx_j, 8)
        for a, b in zip(g_tiers, g_one):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("block", [8, 16, 32])
def test_dropless_block_size_does_not_change_the_result(block):
    """Reference: the default block size (itself checked against the float64 loop above);
    every explicit block size gives the same outputs and gradients (float32: rtol 1e-4)."""
    from jaxmoe.model.moe.dropless import dropless_moe

    rng = np.random.default_rng(9)
    t, d, f, e, k = 20, 8, 12, 4, 2
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    idx = jnp.asarray(np.argsort(-rng.normal(size=(t, e)), axis=1)[:, :k], jnp.int32)
    wts = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]

    def loss(b):
        return lambda x, *w: jnp.sum(dropless_moe(x, wts, idx, *w, "blocks", b) ** 2)
    want = jax.value_and_grad(loss(0), argnums=(0, 1, 2, 3))(x, *ws)
    got = jax.value_and_grad(loss(block), argnums=(0, 1, 2, 3))(x, *ws)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_one_expert_uses_big_blocks_only():
    """One expert, 64 copies: two big blocks of 32 rows and no small ones; the output equals
    the plain (dense) SwiGLU of every token times its weight, float32 vs float64 (2e-5 of the
    output scale)."""
    from jaxmoe.model.moe.dropless import block_tiers, dropless_moe

    t, d, f = 64, 8, 12
    assert block_tiers(t, 1) == ((32, 2),)
    rng = np.random.default_rng(11)
    x64 = rng.normal(size=(t, d))
    ws64 = [rng.normal(size=s) for s in ((1, d, f), (1, d, f), (1, f, d))]
    wts = rng.uniform(size=(t, 1))
    want = np.stack([wts[i, 0] * ref.expert(x64[i], *(w[0] for w in ws64)) for i in range(t)])
    got = dropless_moe(jnp.asarray(x64, jnp.float32), jnp.asarray(wts, jnp.float32),
                       jnp.zeros((t, 1), jnp.int32), *(jnp.asarray(w, jnp.float32) for w in ws64),
                       "blocks")
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())

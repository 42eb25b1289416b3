"""The dropless path's row-block layout and grouped matmuls (jaxmoe/model/moe/dropless.py).

References: a per-row float64 loop over experts (tests/reference/moe_reference.py), the
definition of a valid layout (every row its own slot, in a block of its own group), and
block shapes worked out by hand. Tolerances: float32 vs the float64 loop: 2e-5 of the output
scale (grouped matmuls alone: rtol 1e-5); gradients of two float32 implementations: rtol 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.model.moe.dropless import (
    block_layout,
    block_size,
    block_tiers,
    dropless_moe,
    expert_ffn,
)
from tests.reference import moe_reference as ref

TOL = 2e-5


@pytest.mark.parametrize("sizes", [[7, 0, 13, 4], [0, 0, 24, 0], [1, 1, 1, 1], [5, 9, 0, 2]])
def test_grouped_matmul_implementations_agree(sizes):
    """`blocks` vs `ragged_dot` vs a per-row float64 loop; rows past sum(sizes) give zeros."""
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

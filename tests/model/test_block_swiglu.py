"""Block SwiGLU and gather_rows (explicit VJPs) against autodiff of plain `jnp.take` +
`jnp.einsum` references, float64, rtol 1e-10; and the bf16 path against float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.model.moe.block_swiglu import block_swiglu
from jaxmoe.model.moe.gather_rows import gather_rows


def _reference(x, block_group, w_gate, w_up, w_down):
    def take(w):
        return jnp.take(w, block_group, axis=0)
    h = (jax.nn.silu(jnp.einsum("nbi,nio->nbo", x, take(w_gate)))
         * jnp.einsum("nbi,nio->nbo", x, take(w_up)))
    return jnp.einsum("nbf,nfo->nbo", h, take(w_down))


@pytest.mark.parametrize("block_group", [[0, 0, 2, 3, 3], [1, 1, 1, 1, 1], [0, 1, 2, 3, 3]])
def test_block_swiglu_matches_reference_float64(block_group):
    rng = np.random.default_rng(0)
    bg = jnp.asarray(block_group)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(5, 8, 6)))
        ws = [jnp.asarray(rng.normal(size=s)) for s in ((4, 6, 7), (4, 6, 7), (4, 7, 6))]
        r = jnp.asarray(rng.normal(size=(5, 8, 6)))
        np.testing.assert_allclose(block_swiglu(x, bg, *ws), _reference(x, bg, *ws), rtol=1e-10)

        def loss(f):
            return lambda *a: jnp.sum(jnp.tanh(f(a[0], bg, *a[1:])) * r)
        got = jax.grad(loss(block_swiglu), argnums=(0, 1, 2, 3))(x, *ws)
        want = jax.grad(loss(_reference), argnums=(0, 1, 2, 3))(x, *ws)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
        unused = [e for e in range(4) if e not in block_group]
        for g in got[1:]:
            assert not np.any(np.asarray(g)[unused])  # experts with no block get no gradient


def test_block_swiglu_bfloat16_close_to_float64():
    """bf16 inputs, f32 accumulation: within 2% of the float64 result (relative to max)."""
    rng = np.random.default_rng(1)
    bg = jnp.asarray([0, 1, 1, 3])
    x = rng.normal(size=(4, 16, 32))
    ws = [rng.normal(size=s) * 0.2 for s in ((4, 32, 48), (4, 32, 48), (4, 48, 32))]
    with jax.enable_x64(True):
        want = np.asarray(_reference(jnp.asarray(x), bg, *map(jnp.asarray, ws)))
    got = block_swiglu(*(jnp.asarray(a, jnp.bfloat16) for a in (x,)), bg,
                       *(jnp.asarray(w, jnp.bfloat16) for w in ws))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.02 * np.abs(want).max())


def test_gather_rows_gradient_is_the_sum_over_copies():
    """y = x[src] with each row read twice (and fill rows); grad vs autodiff of jnp.take."""
    rng = np.random.default_rng(2)
    n, k, m = 6, 2, 15
    src = np.full(m, n)
    slots = rng.permutation(m)[: n * k]
    src[slots] = np.repeat(np.arange(n), k)
    dst = slots.reshape(n, k)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(n, 3)))
        r = jnp.asarray(rng.normal(size=(m, 3)))
        got_y = gather_rows(x, jnp.asarray(src), jnp.asarray(dst))
        want_y = jnp.take(x, jnp.asarray(src), axis=0, mode="fill", fill_value=0)
        np.testing.assert_array_equal(got_y, want_y)
        got = jax.grad(lambda x: jnp.sum(gather_rows(x, jnp.asarray(src), jnp.asarray(dst)) * r))(x)
        want = jax.grad(lambda x: jnp.sum(jnp.take(x, jnp.asarray(src), axis=0, mode="fill",
                                                   fill_value=0) * r))(x)
        np.testing.assert_allclose(got, want, rtol=1e-12)

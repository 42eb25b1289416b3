"""`jaxmoe.model.matmul.einsum`: values and gradients against `jnp.einsum` in float64, the
CPU contraction split, bad specs, and bf16 operands in every backward matmul."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.model.matmul import einsum

SPECS = [
    ("bli,io->blo", (2, 5, 6), (6, 7)),
    ("ti,io->to", (40, 6), (6, 3)),  # weight gradient contracts t (leading): split on CPU
    ("nbi,nio->nbo", (3, 34, 4), (3, 4, 5)),  # batched; weight gradient splits b
    ("btkgd,bskd->bkgts", (2, 4, 2, 3, 5), (2, 4, 2, 5)),
    ("blnh,nhe->ble", (2, 3, 4, 5), (4, 5, 6)),
]


@pytest.mark.parametrize("spec,xs,ys", SPECS)
def test_matches_jnp_einsum_float64(spec, xs, ys):
    """Reference: jnp.einsum and its autodiff gradients, float64, rtol 1e-12."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, y = jnp.asarray(rng.normal(size=xs)), jnp.asarray(rng.normal(size=ys))
        np.testing.assert_allclose(einsum(spec, x, y), jnp.einsum(spec, x, y), rtol=1e-12)
        r = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, y).shape))

        def loss(f):
            return lambda x, y: jnp.sum(jnp.sin(f(spec, x, y)) * r)
        got = jax.grad(loss(einsum), argnums=(0, 1))(x, y)
        want = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, y)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_bfloat16_inputs_accumulate_in_float32():
    """4096 products of 1/64 sum to exactly 64 in float32; a bfloat16 accumulator stalls at 4
    (there 1/64 is half an ulp and rounds away)."""
    x = jnp.ones((1, 4096), jnp.bfloat16) * 1.0
    y = jnp.ones((4096, 1), jnp.bfloat16) / 64
    assert float(einsum("ij,jk->ik", x, y, out_dtype=jnp.float32)[0, 0]) == 64.0
    assert einsum("ij,jk->ik", x, y).dtype == jnp.bfloat16


def test_mixed_dtype_gradients_take_each_inputs_dtype():
    """A float32 x against a bfloat16 w: each gradient has its own input's dtype, as
    jax.grad gives for jnp.einsum (dx from w's dtype came back bf16, rounding an f32 input's
    gradient). Reference: jax.grad of jnp.einsum on the same inputs; dx at float32 rtol 1e-5,
    dw (bf16 rounding of the same float32 sums) within one bf16 ulp, rtol 2**-7."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 7)), jnp.bfloat16)
    r = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f("bli,io->blo", x, w)) * r)
    got = jax.grad(loss(einsum), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, w)
    assert [g.dtype for g in want] == [jnp.float32, jnp.bfloat16]
    assert [g.dtype for g in got] == [jnp.float32, jnp.bfloat16]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.float32(got[1]), np.float32(want[1]), rtol=2**-7, atol=1e-6)


def test_backward_matmuls_take_bf16_operands():
    """Every dot_general of the gradient program has bf16 operands and an f32 result."""
    x = jnp.ones((4, 64, 32), jnp.bfloat16)
    w = jnp.ones((32, 16), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(einsum("bli,io->blo", x, w, jnp.float32) ** 2),
                         argnums=(0, 1)))
    text = f.lower(x, w).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert len(dots) == 3, text
    for d in dots:
        sig = d.split(":")[-1]
        assert sig.count("bf16") == 2 and sig.strip().endswith("f32>"), d


@pytest.mark.parametrize("spec", ["ab,bc", "a...b,bc->ac", "ab,bc->ad", "ab,cd->ad", "aab,bc->ac"])
def test_bad_spec_is_one_line(spec):
    with pytest.raises(ValueError, match="einsum spec") as err:
        einsum(spec, jnp.ones((2, 2)), jnp.ones((2, 2)))
    assert "\n" not in str(err.value)


def test_contraction_split_only_in_programs_lowered_for_cpu():
    """The weight gradient x^T dy contracts [0, 1] x [0, 1] (split) when lowered for CPU and
    [0] x [0] (plain) when lowered for TPU from this CPU host."""
    x = jnp.ones((1024, 256), jnp.bfloat16)
    w = jnp.ones((256, 512), jnp.bfloat16)
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(einsum("ti,io->to", x, w, jnp.float32) ** 2),
                         argnums=1))
    dims = {}
    for platform in ("cpu", "tpu"):
        text = g.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        dims[platform] = set(re.findall(r"contracting_dims = \[[0-9, ]*\] x \[[0-9, ]*\]", text))
    assert "contracting_dims = [0, 1] x [0, 1]" in dims["cpu"], dims
    assert "contracting_dims = [0] x [0]" in dims["tpu"], dims
    assert "contracting_dims = [0, 1] x [0, 1]" not in dims["tpu"], dims

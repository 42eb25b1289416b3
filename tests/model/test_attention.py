"""Attention vs a naive float64 loop (tests/reference/attention_reference.py); packed
segments and causality checked bit-for-bit (changing one segment leaves the others'
outputs bit-identical). float32 tolerance vs the reference: 1e-5 relative to scale."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model.attention import Attention, rotary
from jaxmoe.model.precision import Precision
from tests.reference.attention_reference import attention as ref_attention

F32 = Precision(jnp.float32, jnp.float32, jnp.float32)
# rope_theta is not the default, so a rotary that ignored it would show
CFG = ModelConfig(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.3,
                  rope_theta=500.0, compute_dtype="float32")
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0]])
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0, 0]])


def _attn(cfg=CFG):
    return Attention(cfg, F32, nnx.Rngs(0))


def _run(attn, x, seg=SEGMENTS, pos=POSITIONS, cfg=CFG):
    rope = rotary(cfg, jnp.asarray(pos))
    return np.asarray(attn(jnp.asarray(x, jnp.float32), jnp.asarray(seg), rope))


# A second row with other segments and positions that do not start at 0 (a document
# continued from an earlier row): every row must use its own positions and segments.
SEGMENTS_2 = np.concatenate([SEGMENTS, [[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]]])
POSITIONS_2 = np.concatenate([POSITIONS, [[7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6]]])


@pytest.mark.parametrize("gqa,head_dim", [(1, 8), (2, 8), (4, 8), (2, 12)])
def test_matches_loop_reference(gqa, head_dim):
    """float32 module vs the float64 loop over queries, rtol 1e-5 of the output scale; head
    width 12 is not embed / heads (= 8): rotary tables and softmax scale follow head_dim."""
    cfg = dataclasses.replace(CFG, num_kv_heads=gqa, head_dim=head_dim)
    attn = _attn(cfg)
    assert attn.q[...].shape == (cfg.embed_dim, cfg.num_heads, head_dim)
    x = np.random.default_rng(0).normal(size=(2, 12, cfg.embed_dim))
    got = _run(attn, x, SEGMENTS_2, POSITIONS_2, cfg)
    w = [np.asarray(p[...], np.float64) for p in (attn.q, attn.k, attn.v, attn.o)]
    for row in range(2):
        want = ref_attention(x[row], *w, SEGMENTS_2[row], POSITIONS_2[row], cfg.rope_theta)
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_segments_are_isolated_bitwise():
    attn = _attn()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 12, CFG.embed_dim))
    y = _run(attn, x)
    x2 = x.copy()
    x2[0, 3:7] = rng.normal(size=(4, CFG.embed_dim))  # change segment 2 only
    y2 = _run(attn, x2)
    others = np.r_[0:3, 7:12]
    np.testing.assert_array_equal(y[0, others], y2[0, others])
    assert not np.allclose(y[0, 3:7], y2[0, 3:7])


def test_causal_bitwise():
    attn = _attn()
    rng = np.random.default_rng(2)
    seg, pos = np.ones((1, 12), np.int32), np.arange(12)[None]
    x = rng.normal(size=(1, 12, CFG.embed_dim))
    y = _run(attn, x, seg, pos)
    x2 = x.copy()
    x2[0, 8:] = rng.normal(size=(4, CFG.embed_dim))  # change the future
    y2 = _run(attn, x2, seg, pos)
    np.testing.assert_array_equal(y[0, :8], y2[0, :8])
    assert not np.allclose(y[0, 8:], y2[0, 8:])


@pytest.mark.parametrize("bias,norm,head_dim", [(True, False, 8), (False, True, 8),
                                                (True, True, 8), (True, True, 12)])
def test_qkv_bias_and_qk_norm_match_loop_reference(bias, norm, head_dim):
    """Qwen2 q/k/v biases and Qwen3 per-head q/k RMSNorm vs the float64 loop reference, with
    random biases and non-unit random norm scales (unit scales would commute with rope) set
    into the module. Tolerance as above: float32 vs float64, 1e-5 relative to scale."""
    cfg = dataclasses.replace(CFG, qkv_bias=bias, qk_norm=norm, head_dim=head_dim)
    attn = _attn(cfg)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 12, cfg.embed_dim))
    n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    extra = {}
    if bias:
        for name, shape in (("q_bias", (n, d)), ("k_bias", (kv, d)), ("v_bias", (kv, d))):
            extra[name] = rng.normal(scale=0.5, size=shape)
            getattr(attn, name)[...] = jnp.asarray(extra[name], jnp.float32)
    if norm:
        for name in ("q", "k"):
            extra[f"{name}_scale"] = rng.uniform(0.3, 2.0, size=d) * rng.choice([-1, 1], d)
            getattr(attn, f"{name}_norm").scale[...] = jnp.asarray(extra[f"{name}_scale"],
                                                                   jnp.float32)
    got = _run(attn, x, cfg=cfg)[0]
    w = [np.asarray(p[...], np.float64) for p in (attn.q, attn.k, attn.v, attn.o)]
    want = ref_attention(x[0], *w, SEGMENTS[0], POSITIONS[0], cfg.rope_theta,
                         eps=cfg.norm_eps, **extra)
    plain = ref_attention(x[0], *w, SEGMENTS[0], POSITIONS[0], cfg.rope_theta)
    assert np.abs(want - plain).max() > 0.1 * np.abs(want).max()  # the options matter here
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("gqa,empty_row", [(1, False), (2, False), (4, False), (2, True)])
def test_gradients_match_autodiff_of_plain_softmax(gqa, empty_row):
    """Gradients of the grouped [b, kv, group * t] layout and its written-out backward pass vs
    autodiff of a plain repeat-kv softmax, float64 with a packed causal mask (and, with
    empty_row, a query that may attend to nothing), rtol 1e-10."""
    import jax

    from jaxmoe.model.attention import attention_mask, dot_product_attention

    def plain(q, k, v, mask):  # heads-major [b, n, t, d]; kv head i serves heads i*g..i*g+g-1
        b, n, t, d = q.shape
        rep = n // k.shape[1]
        k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
        logits = jnp.einsum("bntd,bnsd->bnts", q, k) * d ** -0.5
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        return jnp.einsum("bnts,bnsd->bntd", jax.nn.softmax(logits, axis=-1), v)

    rng = np.random.default_rng(3)
    mask = attention_mask(jnp.asarray(SEGMENTS))
    if empty_row:
        mask = mask.at[:, :, 5].set(False)
    with jax.enable_x64(True):
        q = jnp.asarray(rng.normal(size=(1, 4, 12, 8)))
        k, v = (jnp.asarray(rng.normal(size=(1, gqa, 12, 8))) for _ in range(2))
        r = jnp.asarray(rng.normal(size=q.shape))
        np.testing.assert_allclose(dot_product_attention(q, k, v, mask), plain(q, k, v, mask),
                                   rtol=1e-10, atol=1e-12)

        def loss(f):
            return lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v, mask)) * r)
        got = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rotary_tables_that_do_not_fit_are_refused():
    from jaxmoe.model.layers import apply_rope

    rope = rotary(CFG, jnp.asarray(POSITIONS))
    expected = r"rotary tables \(1, 12, 4\) do not fit x \(1, 12, 4, 6\)"
    with pytest.raises(ValueError, match=expected):
        apply_rope(jnp.zeros((1, 12, 4, 6)), rope)

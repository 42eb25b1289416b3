"""RMSNorm (jaxmoe/model/layers.py) against float64.

bfloat16 input and output, width 4096, values spread over ~7 binades: with float32
statistics every output is the float64 result rounded to bfloat16 (relative error at most
2^-8, one rounding; 1e-4 of that allowed for the float32 arithmetic before it). Statistics
in bfloat16 miss that by ~2.7x on these inputs."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model.decoder import MoETransformer
from jaxmoe.model.layers import RMSNorm
from jaxmoe.model.precision import Precision


def test_rmsnorm_statistics_are_float32_under_bfloat16_compute():
    rng = np.random.default_rng(0)
    d, eps = 4096, 1e-6
    x = (rng.normal(size=(8, d)) * np.exp(rng.uniform(-4, 4, size=(8, d))))
    x = x.astype(ml_dtypes.bfloat16)
    norm = RMSNorm(d, eps, Precision(jnp.float32, jnp.bfloat16, jnp.float32))
    scale = rng.uniform(0.5, 1.5, d)
    norm.scale[...] = jnp.asarray(scale, jnp.float32)
    got = norm(jnp.asarray(x))
    assert got.dtype == jnp.bfloat16
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + eps) * \
        np.asarray(norm.scale[...], np.float64)
    rel = np.abs(np.asarray(got, np.float64) - want) / np.abs(want)
    assert rel.max() <= 2.0 ** -8 * (1 + 1e-4), rel.max()


def test_rmsnorm_eps_is_the_configured_one():
    """A large eps (0.5) against rows of mean square ~1 changes every output by ~20%: the
    float64 formula with that eps, rtol 1e-6. Every norm of a model (attention, MLP, q/k
    norms, final) gets `model.norm_eps` (they were pinned only by transformers' parity)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 64))
    norm = RMSNorm(64, 0.5, Precision(jnp.float32, jnp.float32, jnp.float32))
    want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 0.5)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), want, rtol=1e-6)
    cfg = dataclasses.replace(ModelConfig(num_layers=2, embed_dim=32, num_heads=2,
                                          num_kv_heads=1, head_dim=16, mlp_dim=64,
                                          num_experts=4, expert_mlp_dim=32, vocab_size=300,
                                          qk_norm=True), norm_eps=0.125)
    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    eps = [m.eps for _, m in nnx.iter_graph(model) if isinstance(m, RMSNorm)]
    assert len(eps) >= 5 and set(eps) == {0.125}, eps

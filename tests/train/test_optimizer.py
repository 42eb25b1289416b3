"""The optimizer (jaxmoe/train/optimizer.py) against hand-written float64 references: the
warm-up + cosine schedule vs its closed form, decoupled AdamW weight decay that skips norms
and biases (zero gradients: kernels shrink by exactly lr * wd * p), and global-norm clipping
(two steps of plain numpy Adam on the gradients clipped by hand)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.config import ModelConfig, OptimizerConfig
from jaxmoe.model import MoETransformer
from jaxmoe.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmoe.train.state import split_model

MODEL = ModelConfig(vocab_size=16, embed_dim=8, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, mlp_dim=8, num_experts=2, num_experts_per_tok=1,
                    expert_mlp_dim=4, first_k_dense=1, num_shared_experts=1,
                    shared_expert_gate=True, qkv_bias=True, qk_norm=True, init_std=0.5)
OPT = OptimizerConfig(learning_rate=0.05, warmup_steps=3, min_lr_ratio=0.2, b1=0.8, b2=0.9,
                      eps=1e-8, weight_decay=0.3, grad_clip_norm=0.5)
TOTAL = 9
NO_DECAY = ("scale", "q_bias", "k_bias", "v_bias")


def closed_form_lr(cfg: OptimizerConfig, total: int, step: int) -> float:
    """Linear warm-up 0 -> peak over warmup_steps, then cosine peak -> peak * min_lr_ratio
    at step `total`, constant after."""
    peak, end, w = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_steps
    if step < w:
        return peak * step / w
    frac = min(step - w, total - w) / (total - w)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.fixture(scope="module")
def params():
    """The tiny model's trainable-parameter tree (structure from eval_shape: no init run),
    every leaf random normal, so biases are non-zero and decaying them would show."""
    _, abstract, _ = split_model(nnx.eval_shape(lambda: MoETransformer(MODEL, nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), abstract)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _decays(key: str) -> bool:
    return not any(f"['{n}']" in key for n in NO_DECAY)


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 6, 9, 12])
def test_schedule_matches_closed_form(step):
    """Start (0), warm-up, its end (3), middle of the cosine (6), the end (9) and after;
    float32 schedule vs float64 formula, rtol 1e-6."""
    got = float(learning_rate_schedule(OPT, TOTAL)(step))
    want = closed_form_lr(OPT, TOTAL, step)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    if step in (0, 3, 6, 9):  # the anchor values, spelled out
        want_by_hand = {0: 0.0, 3: 0.05, 6: 0.03, 9: 0.01}[step]
        np.testing.assert_allclose(got, want_by_hand, rtol=1e-6, atol=1e-12)


def test_zero_gradients_decay_kernels_only(params):
    """With zero gradients Adam's direction is exactly 0, so each update is the decoupled
    weight decay alone: p <- p * (1 - lr_t * wd) for kernels, embeddings, router and gate
    matrices; norm scales and q/k/v biases stay bit-identical. Ten steps cover the warm-up
    and the cosine (lr_t from the closed form). float32 vs float64 product, rtol 1e-6."""
    tx = make_optimizer(OPT, TOTAL)
    update = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    p, opt_state = params, tx.init(params)
    start = _flat(params)
    want = dict(start)
    for step in range(TOTAL + 1):
        updates, opt_state = update(zeros, opt_state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        lr = closed_form_lr(OPT, TOTAL, step)
        want = {k: v * (1 - lr * OPT.weight_decay) if _decays(k) else v
                for k, v in want.items()}
    got = _flat(p)
    assert sum(not _decays(k) for k in got) >= 8  # norms and biases are present
    assert any("shared_gate" in k for k in got) and any("router" in k for k in got)
    for k, v in got.items():
        if _decays(k):
            shrink = np.abs(start[k] - want[k]).max()
            assert shrink > 1e-3 * np.abs(start[k]).max(), k  # far above the tolerance
            np.testing.assert_allclose(v, want[k], rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(v, start[k], err_msg=k)


def _numpy_adam_updates(cfg: OptimizerConfig, total: int, grads: list[dict[str, np.ndarray]],
                        clip: float):
    """Plain float64 AdamW (no decay mask needed: weight_decay must be 0) on gradients clipped
    by hand to global norm `clip`; returns the list of per-step updates."""
    assert cfg.weight_decay == 0
    mu = {k: np.zeros_like(g) for k, g in grads[0].items()}
    nu = {k: np.zeros_like(g) for k, g in grads[0].items()}
    out = []
    for t, g in enumerate(grads, start=1):
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        lr = closed_form_lr(cfg, total, t - 1)
        step = {}
        for k in g:
            mu[k] = cfg.b1 * mu[k] + (1 - cfg.b1) * g[k]
            nu[k] = cfg.b2 * nu[k] + (1 - cfg.b2) * g[k] ** 2
            m_hat, v_hat = mu[k] / (1 - cfg.b1 ** t), nu[k] / (1 - cfg.b2 ** t)
            step[k] = -lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
        out.append(step)
    return out


def test_global_norm_clipping_matches_numpy_adam(params):
    """Two steps with gradients of global norm 80 and 800 (>> clip 0.5): the chain's updates
    equal numpy Adam on the gradients scaled by hand to norm 0.5. (Adam's first step is nearly
    scale-free; the second is not: unclipped, the 10x larger gradient would dominate.)
    float32 vs float64, rtol 1e-4 / atol 1e-6 * lr (Adam's ratio of float32 moments)."""
    cfg = dataclasses.replace(OPT, weight_decay=0.0, warmup_steps=0)
    tx = make_optimizer(cfg, TOTAL)
    rng = np.random.default_rng(1)
    treedef = jax.tree.structure(params)
    grads = []
    for norm in (80.0, 800.0):
        g = [rng.normal(size=x.shape) for x in jax.tree.leaves(params)]
        g_norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
        grads.append(jax.tree.unflatten(treedef, [x * norm / g_norm for x in g]))
    want = _numpy_adam_updates(cfg, TOTAL, [_flat(g) for g in grads], cfg.grad_clip_norm)
    unclipped = _numpy_adam_updates(cfg, TOTAL, [_flat(g) for g in grads], math.inf)
    opt_state, p = tx.init(params), params
    for g, w, u in zip(grads, want, unclipped):
        g32 = jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), g, params)
        updates, opt_state = jax.jit(tx.update)(g32, opt_state, p)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
        for k, v in _flat(updates).items():
            np.testing.assert_allclose(v, w[k], rtol=1e-4, atol=1e-6 * cfg.learning_rate,
                                       err_msg=k)
    # the second step is where clipping shows: far outside the tolerance above
    diff = max(np.abs(want[1][k] - unclipped[1][k]).max() for k in want[1])
    assert diff > 0.1 * cfg.learning_rate

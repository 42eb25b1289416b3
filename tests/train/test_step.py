"""The pure train step: gradient accumulation == one large batch, padding is ignored, the
aux-loss-free bias update follows the measured loads, and weight decay skips norms/biases.

Reference for accumulation: the same step with grad_accum_steps=1 (float32 compute);
tolerance rtol 2e-5 / atol 1e-7 (summation order differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe  # noqa: F401
from jaxmoe.config import load_config
from jaxmoe.train.optimizer import decay_mask, make_optimizer
from jaxmoe.train.state import init_state, model_graphdef
from jaxmoe.train.step import make_grad_fn, make_train_step

OVERRIDES = ["model.vocab_size=64", "model.embed_dim=32", "model.num_layers=2",
             "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
             "model.expert_mlp_dim=32", "model.mlp_dim=64", "model.compute_dtype=float32",
             "model.init_std=0.2", "train.batch_size=8", "data.seq_len=16"]


def make_batch(b=8, t=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    seg[::3, -5:] = 0  # some padding
    pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t))
    pos = np.where(seg == 0, 0, pos)
    tokens = rng.integers(3, vocab, (b, t)).astype(np.int32)
    targets = rng.integers(3, vocab, (b, t)).astype(np.int32)
    tokens[seg == 0] = targets[seg == 0] = 0
    return {"inputs": tokens, "targets": targets, "segment_ids": seg,
            "positions": pos.astype(np.int32)}


def _setup(*extra):
    cfg = load_config(None, OVERRIDES + list(extra))
    tx = make_optimizer(cfg.train.optimizer, cfg.train.steps)
    return cfg, tx, init_state(cfg.model, tx, 0), model_graphdef(cfg.model)


@pytest.fixture(scope="module")
def grads_by_accum():
    out = {}
    batch = make_batch()
    for accum in (1, 4):
        cfg, _, state, graphdef = _setup("model.aux_loss_coef=0", "model.z_loss_coef=0",
                                         f"train.grad_accum_steps={accum}")
        grads, stats = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, batch)
        out[accum] = (jax.flatten_util.ravel_pytree(grads)[0], stats)
    return out


def test_accumulated_gradients_equal_full_batch(grads_by_accum):
    g1, s1 = grads_by_accum[1]
    g4, s4 = grads_by_accum[4]
    assert float(jnp.abs(g1).max()) > 0
    np.testing.assert_allclose(g4, g1, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(s4["ce_sum"]), float(s1["ce_sum"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s4["loads"]), jax.tree.leaves(s1["loads"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_accumulated_step_equals_full_batch_step():
    batch = make_batch(seed=1)
    params = []
    for accum in (1, 2):
        cfg, tx, state, graphdef = _setup("model.aux_loss_coef=0", "model.z_loss_coef=0",
                                          f"train.grad_accum_steps={accum}",
                                          "train.optimizer.warmup_steps=0")
        step = jax.jit(make_train_step(graphdef, cfg, tx))
        for _ in range(2):
            state, metrics = step(state, batch)
        params.append(jax.flatten_util.ravel_pytree(state.params)[0])
    # Adam divides by sqrt(v): where a gradient entry is ~0, float summation-order noise
    # is amplified up to a fraction of one update (lr 3e-3). atol 5e-5 = 1.7% of an update.
    np.testing.assert_allclose(params[1], params[0], rtol=1e-5, atol=5e-5)


def test_padding_does_not_change_loss_or_grads():
    cfg, _, state, graphdef = _setup()
    fn = jax.jit(make_grad_fn(graphdef, cfg))
    batch = make_batch(seed=2)
    g_a, s_a = fn(state.params, state.rest, batch)
    noisy = dict(batch)
    pad = batch["segment_ids"] == 0
    noisy["targets"] = np.where(pad, 7, batch["targets"]).astype(np.int32)
    g_b, s_b = fn(state.params, state.rest, noisy)
    assert float(s_a["tokens"]) == float((~pad).sum())
    assert float(s_a["ce_sum"]) == float(s_b["ce_sum"])
    np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(g_a)[0],
                                  jax.flatten_util.ravel_pytree(g_b)[0])


def test_router_bias_update_follows_loads():
    rate = 0.01
    cfg, tx, state, graphdef = _setup(f"model.bias_update_rate={rate}",
                                      "model.router_scoring=sigmoid",
                                      "train.optimizer.warmup_steps=0")
    batch = make_batch(seed=3)
    _, stats = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, batch)
    new_state, _ = jax.jit(make_train_step(graphdef, cfg, tx))(state, batch)
    load = np.asarray(stats["loads"]["moe"][0])  # [layers, experts]
    want = rate * np.sign(load.mean(-1, keepdims=True) - load)
    got = np.asarray(new_state.rest["moe"]["units"]["block0"]["ffn"]["router"]["bias"][...])
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # params and biases change, but the bias is not touched by the gradient
    assert not np.allclose(np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0]),
                           np.asarray(jax.flatten_util.ravel_pytree(state.params)[0]))


def test_weight_decay_mask_skips_norms_and_biases():
    cfg, _, state, _ = _setup("model.qkv_bias=true")
    mask = decay_mask(state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert any(v for k, v in flat.items() if "w_gate" in k)
    assert any(v for k, v in flat.items() if "embedding" in k)
    for k, v in flat.items():
        if "scale" in k or "_bias" in k:
            assert not v, k
        if k.endswith("['kernel']") or "w_up" in k or "lm_head" in k:
            assert v, k

"""The pure train step: gradient accumulation == one large batch, padding (inputs and
targets) changes neither routing nor loss nor gradients, the aux/z losses reach the gradient
with their coefficients, the aux-loss-free bias update follows the measured loads, the
logged metrics (grad norm, load imbalance, learning rate, dropped copies) match their
definitions, and weight decay skips norms/biases (values: tests/train/test_optimizer.py).

Reference for accumulation: the same step with grad_accum_steps=1 (float32 compute);
tolerance rtol 2e-5 / atol 1e-7 (summation order differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import load_config
from jaxmoe.model import layer_groups
from jaxmoe.train.optimizer import decay_mask, make_optimizer
from jaxmoe.train.state import init_state, model_graphdef
from jaxmoe.train.step import forward, make_grad_fn, make_train_step

OVERRIDES = ["model.vocab_size=64", "model.embed_dim=32", "model.num_layers=2",
             "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
             "model.expert_mlp_dim=32", "model.mlp_dim=64", "model.compute_dtype=float32",
             "model.init_std=0.2", "train.batch_size=8", "data.seq_len=16",
             "train.sample_tokens=0"]


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
    replaced = {e.split("=", 1)[0] for e in extra}
    base = [o for o in OVERRIDES if o.split("=", 1)[0] not in replaced]
    cfg = load_config(None, base + list(extra))
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


def test_bfloat16_parameters_accumulate_in_float32():
    """Eight identical one-row micro-batches: each gives g / 8 of the one-row gradient g
    (bfloat16 parameters: bfloat16 gradients; dividing by 8 is exact), so a float32 sum is
    g exactly, up to the float32 rounding of two different programs. A bfloat16 running
    sum rounds at 3g/8, 5g/8, ... Reference: the same parameters, one row, no
    accumulation."""
    row = {k: v[:1] for k, v in make_batch().items()}
    batch = {k: np.repeat(v, 8, axis=0) for k, v in row.items()}
    grads = {}
    for accum, data in ((8, batch), (1, row)):
        cfg, _, state, graphdef = _setup("model.aux_loss_coef=0", "model.z_loss_coef=0",
                                         "model.param_dtype=bfloat16",
                                         f"train.grad_accum_steps={accum}")
        g, _ = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, data)
        grads[accum] = jax.flatten_util.ravel_pytree(g)[0]
    assert grads[8].dtype == grads[1].dtype == jnp.bfloat16
    got, want = np.asarray(grads[8], np.float64), np.asarray(grads[1], np.float64)
    # The two programs sum in different orders in float32: a bfloat16 rounding may fall the
    # other way for a few entries (8 of 35,232 here; a bfloat16 running sum: 41%).
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
    assert np.all(np.abs(got - want) <= ulp)
    assert np.mean(got != want) < 0.01


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


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_does_not_change_loss_or_grads(dispatch):
    """Pad positions (segment 0) get random input tokens and targets: expert loads, dropped
    assignments, aux/z losses, the loss and the gradients are unchanged. Bitwise, except the
    routed expert weights under dropless dispatch: pads are routed there too (with zero
    cotangent), which moves the grouped-matmul block boundaries and so the float32 summation
    order of their weight gradients: atol 1e-6 x the largest entry (measured 2e-7).
    Capacity dispatch with factor 1.0 drops assignments, so pads competing for slots would
    show."""
    cfg, _, state, graphdef = _setup(f"model.dispatch={dispatch}", "model.capacity_factor=1.0")
    fn = jax.jit(make_grad_fn(graphdef, cfg))
    batch = make_batch(seed=2)
    g_a, s_a = fn(state.params, state.rest, batch)
    noisy = dict(batch)
    pad = batch["segment_ids"] == 0
    rng = np.random.default_rng(5)
    noisy["inputs"] = np.where(pad, rng.integers(1, 64, pad.shape), batch["inputs"])
    noisy["targets"] = np.where(pad, rng.integers(1, 64, pad.shape), batch["targets"])
    noisy = {k: np.asarray(v, np.int32) for k, v in noisy.items()}
    assert pad.sum() >= 10 and (noisy["inputs"][pad] != 0).all()
    g_b, s_b = fn(state.params, state.rest, noisy)
    assert float(s_a["tokens"]) == float((~pad).sum())
    assert float(s_a["aux_loss"]) > 0 and float(s_a["z_loss"]) > 0
    assert (float(s_a["dropped"]) > 0) == (dispatch == "capacity")
    for key in ("ce_sum", "tokens", "aux_loss", "z_loss", "dropped"):
        assert float(s_a[key]) == float(s_b[key]), key
    loads_a, loads_b = jax.tree.leaves(s_a["loads"]), jax.tree.leaves(s_b["loads"])
    assert loads_a and sum(float(np.sum(x)) for x in loads_a) > 0
    for a, b in zip(loads_a, loads_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaves_b = jax.tree.leaves(g_b)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), leaves_b, strict=True):
        key, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if dispatch == "dropless" and any(w in key for w in ("w_gate", "w_up", "w_down")):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max(), err_msg=key)
        else:
            np.testing.assert_array_equal(b, a, err_msg=key)


@pytest.mark.parametrize("accum", [1, 2])
def test_aux_and_z_losses_reach_the_gradient(accum):
    """grads of the step == grad(CE sum) / tokens + aux_coef * mean over micro-batches of
    grad(aux) + z_coef * mean of grad(z), each piece differentiated on its own (a naive
    log-softmax CE; aux and z averaged by hand over the MoE layers' own statistics, in a
    model with one dense layer and two MoE layers, so a sum or a mean over all layers would
    show). float32, different summation order: rtol 1e-4, atol 1e-5 x the largest gradient
    entry. The logged aux_loss / z_loss are the same means of the values (rtol 1e-5)."""
    aux_coef, z_coef = 0.5, 0.2
    cfg, _, state, graphdef = _setup(f"model.aux_loss_coef={aux_coef}",
                                     f"model.z_loss_coef={z_coef}",
                                     f"train.grad_accum_steps={accum}",
                                     "model.num_layers=3", "model.first_k_dense=1")
    batch = make_batch(b=4, seed=4)
    got, stats = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, batch)
    tokens = float((batch["segment_ids"] > 0).sum())

    @jax.jit
    def pieces(params, micro):
        def f(params):
            out = forward(graphdef, params, state.rest, micro)
            logp = jax.nn.log_softmax(out.logits, axis=-1)
            nll = -jnp.take_along_axis(logp, micro["targets"][..., None], axis=-1)[..., 0]
            ce = jnp.sum(jnp.where(micro["segment_ids"] > 0, nll, 0.0))
            layers = [s for group in out.moe.values() for s in group]
            aux = jnp.concatenate([s.aux_loss.reshape(-1) for s in layers])
            z = jnp.concatenate([s.z_loss.reshape(-1) for s in layers])
            assert aux.shape == (2,)  # the two MoE layers, not the dense one
            return jnp.stack([ce, jnp.mean(aux), jnp.mean(z)])
        return jax.jacrev(f)(params), f(params)

    ce_g = aux_g = z_g = 0
    aux_v, z_v = [], []
    for i in range(accum):
        micro = {k: v[i::accum] for k, v in batch.items()}  # micro-batches take strided rows
        jac, values = pieces(state.params, micro)
        jac = jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: jnp.moveaxis(x, 0, -1), jac))[0]
        jac = np.asarray(jac, np.float64).reshape(-1, 3)
        ce_g, aux_g, z_g = ce_g + jac[:, 0], aux_g + jac[:, 1], z_g + jac[:, 2]
        aux_v.append(float(values[1]))
        z_v.append(float(values[2]))
    want = ce_g / tokens + (aux_coef * aux_g + z_coef * z_g) / accum
    got = np.asarray(jax.flatten_util.ravel_pytree(got)[0], np.float64)
    atol = 1e-5 * np.abs(want).max()
    moe_part = np.abs(aux_coef * aux_g + z_coef * z_g).max() / accum
    assert moe_part > 100 * atol  # the aux/z terms are far above the tolerance
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(float(stats["aux_loss"]), np.mean(aux_v), rtol=1e-5)
    np.testing.assert_allclose(float(stats["z_loss"]), np.mean(z_v), rtol=1e-5)


def test_router_bias_update_follows_loads():
    """bias <- bias + rate * sign(mean load - load), per layer (DeepSeek-V3), starting from a
    nonzero bias (so setting the bias to the update would show). The scanned unit holds a
    dense and an MoE block (moe_every=2): only MoE blocks have a router to update.
    Reference: the loads of the same batch from the gradient function, the update in
    float64; rtol 1e-6."""
    rate = 0.01
    cfg, tx, state, graphdef = _setup(f"model.bias_update_rate={rate}",
                                      "model.router_scoring=sigmoid",
                                      "train.optimizer.warmup_steps=0", "model.num_layers=4",
                                      "model.moe_every=2")
    assert [(g.name, g.pattern, g.repeats) for g in layer_groups(cfg.model)] == [
        ("moe", (False, True), 2)]
    bias = state.rest["moe"]["units"]["block1"]["ffn"]["router"]["bias"]
    bias0 = np.random.default_rng(4).uniform(-0.05, 0.05, bias.shape).astype(np.float32)
    bias[...] = jnp.asarray(bias0)
    batch = make_batch(seed=3)
    _, stats = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, batch)
    new_state, _ = jax.jit(make_train_step(graphdef, cfg, tx))(state, batch)
    load = np.asarray(stats["loads"]["moe"][0], np.float64)  # [layers, experts]
    step = rate * np.sign(load.mean(-1, keepdims=True) - load)
    got = np.asarray(new_state.rest["moe"]["units"]["block1"]["ffn"]["router"]["bias"][...])
    assert np.abs(step).sum() > 0
    np.testing.assert_allclose(got, bias0.astype(np.float64) + step, rtol=1e-6)
    # params and biases change, but the bias is not touched by the gradient
    assert not np.allclose(np.asarray(jax.flatten_util.ravel_pytree(new_state.params)[0]),
                           np.asarray(jax.flatten_util.ravel_pytree(state.params)[0]))


def test_weight_decay_mask_skips_norms_and_biases():
    """Reference: the rule written out by name on the model's own parameter paths: RMSNorm
    scales and q/k/v biases get no decay, every other parameter (kernels, expert weights,
    embedding, router) does."""
    cfg, _, state, _ = _setup("model.qkv_bias=true")
    mask = decay_mask(state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    no_decay = ("scale", "q_bias", "k_bias", "v_bias")
    for name in no_decay + ("kernel", "w_gate", "w_up", "w_down", "embedding", "router"):
        assert any(f"['{name}']" in k for k in flat), name  # each kind is present
    for k, v in flat.items():
        assert v == (not any(f"['{n}']" in k for n in no_decay)), k


def test_step_metrics_match_their_definitions():
    """grad_norm == sqrt(sum g^2) of the batch gradients (float64 reference, rtol 1e-5);
    load_max_over_mean == the largest max/mean load over the MoE layers (rtol 1e-6);
    learning_rate == the closed-form warm-up + cosine value at the step being taken
    (tests/train/test_optimizer.py, rtol 1e-6); loss == ce_sum / tokens."""
    from jaxmoe.train.optimizer import learning_rate_schedule
    from tests.train.test_optimizer import closed_form_lr

    cfg, tx, state, graphdef = _setup("train.optimizer.warmup_steps=2", "train.steps=6")
    schedule = learning_rate_schedule(cfg.train.optimizer, cfg.train.steps)
    step = jax.jit(make_train_step(graphdef, cfg, tx, schedule))
    grad_fn = jax.jit(make_grad_fn(graphdef, cfg))
    for s in range(3):
        batch = make_batch(seed=10 + s)
        grads, stats = grad_fn(state.params, state.rest, batch)
        state, metrics = step(state, batch)
        g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0], np.float64)
        np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(np.sum(g * g)),
                                   rtol=1e-5)
        loads = [np.asarray(x, np.float64) for x in jax.tree.leaves(stats["loads"])]
        ratio = max((x.max(-1) / x.mean(-1)).max() for x in loads)
        assert ratio > 1.0
        np.testing.assert_allclose(float(metrics["load_max_over_mean"]), ratio, rtol=1e-6)
        np.testing.assert_allclose(float(metrics["learning_rate"]),
                                   closed_form_lr(cfg.train.optimizer, cfg.train.steps, s),
                                   rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(float(metrics["loss"]),
                                   float(stats["ce_sum"]) / float(stats["tokens"]), rtol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_dropped_counts_every_moe_layer(accum):
    """Capacity dispatch, factor 0.5: dropped == sum over micro-batches, MoE layers and
    experts of max(0, load - capacity) (GShard: an expert keeps its first `capacity` valid
    copies; the capacity is a micro-batch's), in a model with one dense and two MoE layers.
    Each micro-batch's loads come from a one-micro-batch run on it alone. Exact (counts)."""
    from jaxmoe.model.moe import expert_capacity

    common = ("model.dispatch=capacity", "model.capacity_factor=0.5", "model.num_layers=3",
              "model.first_k_dense=1")
    cfg, _, state, graphdef = _setup(*common, f"train.grad_accum_steps={accum}")
    batch = make_batch(seed=6)
    _, stats = jax.jit(make_grad_fn(graphdef, cfg))(state.params, state.rest, batch)
    m = cfg.model
    one = jax.jit(make_grad_fn(graphdef, _setup(*common)[0]))
    want = 0
    for i in range(accum):
        micro = {k: v[i::accum] for k, v in batch.items()}  # micro-batches take strided rows
        c = expert_capacity(micro["inputs"].size, m.num_experts_per_tok, m.num_experts, 0.5)
        loads = np.concatenate([np.asarray(x).reshape(-1, m.num_experts) for x in
                                jax.tree.leaves(one(state.params, state.rest, micro)[1]["loads"])])
        assert loads.shape[0] == 2
        want += np.maximum(loads - c, 0).sum()
    assert want > 0
    assert float(stats["dropped"]) == want


def test_train_step_donates_the_state():
    """Buffer donation: the trainer's jitted step updates the state in place. Reference: the
    state's own byte count; XLA's memory analysis aliases exactly that many argument bytes
    to outputs, and the arrays passed in are deleted by the call."""
    from jaxmoe.train.loop import build_trainer

    cfg = load_config(None, OVERRIDES + ["mesh.data=1"])
    trainer = build_trainer(cfg, jax.devices()[:1])
    with trainer.context():
        state = trainer.init()
        batch = trainer.put_batch(make_batch(seed=7))
        step = trainer.train_step.lower(state, batch).compile()
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        assert step.memory_analysis().alias_size_in_bytes == state_bytes
        new_state, _ = step(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))

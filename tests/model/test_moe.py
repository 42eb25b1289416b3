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
    "sigmoid_scaled_no_renorm": dict(router_scoring="sigmoid", norm_topk_prob=False,
                                     routed_scaling_factor=2.5),
    "shared_ungated": dict(num_shared_experts=1, shared_expert_mlp_dim=20),
    "shared_gated": dict(num_shared_experts=1, shared_expert_mlp_dim=20, shared_expert_gate=True),
    "top1": dict(num_experts_per_tok=1),
    # DeepSeek-V3 group-limited choice: 3 groups of 2 experts, both choices from the best group
    "sigmoid_grouped": dict(router_scoring="sigmoid", norm_topk_prob=True,
                            routed_scaling_factor=2.5, n_group=3, topk_group=1),
}


# The dropless path's two grouped matmuls: row blocks (the CPU default) and lax.ragged_dot
# (the default on TPU/GPU), each with its own gather, un-sort and combine around it.
PATHS = [("dropless", "blocks"), ("dropless", "ragged_dot"), ("capacity", "auto")]


@pytest.mark.parametrize("dispatch, matmul", PATHS, ids=["blocks", "ragged_dot", "capacity"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_matches_loop_reference(case, dispatch, matmul):
    # Capacity large enough that nothing drops: both paths must equal the dropless reference.
    cfg = dataclasses.replace(BASE, dispatch=dispatch, capacity_factor=10.0,
                              grouped_matmul=matmul, **CASES[case])
    x = np.random.default_rng(0).normal(size=(20, cfg.embed_dim))
    block, y, stats = run_block(cfg, x)
    shared, gate = shared_params(block)
    want, dropped = ref.moe_forward(
        x, block_params(block), top_k=cfg.num_experts_per_tok, scoring=cfg.router_scoring,
        norm_topk_prob=cfg.norm_topk_prob, scaling=cfg.routed_scaling_factor,
        shared=shared, shared_gate=gate, n_group=cfg.n_group, topk_group=cfg.topk_group)
    assert dropped == 0 and float(stats.dropped) == 0
    if cfg.n_group > 1:  # the group limit changes some token's choice, so it is tested
        plain, _ = ref.moe_forward(x, block_params(block), top_k=cfg.num_experts_per_tok,
                                   scoring=cfg.router_scoring, norm_topk_prob=True,
                                   scaling=cfg.routed_scaling_factor)
        assert np.abs(plain - want).max() > 100 * TOL * np.abs(want).max()
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


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.6, 1.0])
def test_capacity_drops_expected_copies(factor):
    """Capacity dispatch vs the float64 loop reference with the same capacity (GShard: token
    order decides who keeps a slot): same outputs (TOL of the output scale) and the same
    number of dropped copies, exactly. Factor 0.6 gives 4.8 copies per expert: rounded up
    to 5 slots (the others are whole numbers, where floor and ceil agree)."""
    cfg = dataclasses.replace(BASE, dispatch="capacity", capacity_factor=factor)
    x = np.random.default_rng(2).normal(size=(24, cfg.embed_dim))
    block, y, stats = run_block(cfg, x)
    c = expert_capacity(24, 2, cfg.num_experts, factor)
    assert c == ref.capacity_for(24, 2, cfg.num_experts, factor)
    assert factor != 0.6 or c == 5
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


def test_sequence_scope_averages_the_aux_loss_of_each_sequence():
    """aux_loss_scope=sequence (DeepSeek-V3's sequence-wise balance loss): the loop reference
    per batch row over its non-pad tokens, averaged over the rows that hold a token (a
    padding-only row counts for nothing); rtol 1e-5. Loads and z-loss stay over all tokens.
    Two rows that prefer different experts balance as one batch but not per sequence."""
    cfg = dataclasses.replace(BASE, aux_loss_scope="sequence")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 10, cfg.embed_dim))
    x[1] += 3 * rng.normal(size=cfg.embed_dim)  # row 1 leans towards a few experts
    mask = np.ones((3, 10), bool)
    mask[0, 6:] = False
    mask[2] = False
    block = MoEBlock(cfg, F32, nnx.Rngs(1))
    _, stats = block(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    p = block_params(block)
    per_row = [ref.aux_losses(x[i][mask[i]], p, top_k=2, scoring="softmax")[0] for i in (0, 1)]
    np.testing.assert_allclose(float(stats.aux_loss), np.mean(per_row), rtol=1e-5)
    pooled, z, load = ref.aux_losses(x[mask], p, top_k=2, scoring="softmax")
    assert abs(np.mean(per_row) - pooled) > 1e-2 * pooled  # the scope makes a difference
    np.testing.assert_array_equal(np.asarray(stats.load), load)
    np.testing.assert_allclose(float(stats.z_loss), z, rtol=1e-5)
    batch = MoEBlock(BASE, F32, nnx.Rngs(1))(jnp.asarray(x, jnp.float32), jnp.asarray(mask))[1]
    np.testing.assert_allclose(float(batch.aux_loss), pooled, rtol=1e-5)


def test_router_matmuls_ask_for_full_float32_precision():
    """The router logits and the shared-expert gate are float32 matmuls at HIGHEST precision:
    at DEFAULT, TPUs (and TF32 GPUs) would round their float32 operands. CPU computes float32
    either way, so the check reads the lowered program: exactly those two dot_generals (and
    no expert or attention matmul) carry precision HIGHEST."""
    cfg = dataclasses.replace(BASE, compute_dtype="bfloat16", num_shared_experts=1,
                              shared_expert_mlp_dim=20, shared_expert_gate=True)
    graphdef, state = nnx.split(MoEBlock(cfg, BF16, nnx.Rngs(1)))
    text = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0]).lower(
        state, jnp.ones((2, 8, cfg.embed_dim), jnp.bfloat16), jnp.ones((2, 8), bool)).as_text()
    highest = [line.rsplit("->", 1)[-1].strip() for line in text.splitlines()
               if "dot_general" in line and "precision = [HIGHEST, HIGHEST]" in line]
    e = cfg.num_experts
    assert sorted(highest) == sorted([f"tensor<16x{e}xf32>", "tensor<16x1xf32>"]), highest


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


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_all_padding_gives_zero_statistics_and_finite_gradients(dispatch, scope):
    """A micro-batch of padding only (a short last batch under accumulation): the losses'
    token counts are 0, and dividing by them gave a NaN z-loss, and NaN everywhere after
    the update. Reference: no token, so no loss, no load and zero gradients, exactly."""
    cfg = dataclasses.replace(BASE, dispatch=dispatch, aux_loss_scope=scope,
                              num_shared_experts=1, shared_expert_mlp_dim=8)
    graphdef, state = nnx.split(MoEBlock(cfg, F32, nnx.Rngs(1)))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6, cfg.embed_dim)), jnp.float32)
    none = jnp.zeros((2, 6), bool)

    def loss(state):
        _, stats = nnx.merge(graphdef, state)(x, none)
        return stats.aux_loss + stats.z_loss, stats

    grads, stats = jax.grad(loss, has_aux=True)(state)
    assert float(stats.aux_loss) == 0.0 and float(stats.z_loss) == 0.0
    assert float(stats.dropped) == 0.0 and not np.asarray(stats.load).any()
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def _loss_fn(cfg, graphdef, x, r):
    def loss(state, x):
        block = nnx.merge(graphdef, state)
        y, stats = block(x[None], jnp.ones((1, x.shape[0]), bool))
        return jnp.sum(y[0] * r) + stats.aux_loss + stats.z_loss
    return loss


@pytest.mark.parametrize("dispatch,factor,matmul", [
    ("dropless", 10.0, "blocks"), ("dropless", 10.0, "ragged_dot"), ("capacity", 10.0, "auto"),
    ("capacity", 0.5, "auto")])
def test_gradients_match_finite_differences(dispatch, factor, matmul):
    """float64 block: jax.grad vs central differences on every coordinate of the router
    kernel and of x, 8 random coordinates of each other parameter, and 8 random directions
    through all of them at once (with factor 0.5 some copies are dropped: their experts get
    no gradient from them). (Sampling 40 coordinates in all let a stop_gradient on the
    routing weights pass the factor-0.5 case.)"""
    cfg = dataclasses.replace(BASE, dispatch=dispatch, capacity_factor=factor,
                              num_shared_experts=1, shared_expert_mlp_dim=8,
                              shared_expert_gate=True, grouped_matmul=matmul)
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

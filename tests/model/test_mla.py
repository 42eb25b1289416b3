"""Multi-head latent attention and group-limited routing vs naive float64 references
(tests/reference/mla_reference.py) and vs transformers' own YaRN / DeepSeek formulas.
float32 tolerance vs float64: 1e-5 relative to the output scale."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.config import Config, ConfigError, ModelConfig, validate
from jaxmoe.model import MoETransformer
from jaxmoe.model.attention import attention_mask
from jaxmoe.model.mla import (
    MLAttention,
    absorbed_attention,
    mla_attention,
    rope_inv_freq,
    rotary,
    softmax_scale,
)
from jaxmoe.model.moe.router import Router
from jaxmoe.model.params import total_params
from jaxmoe.model.precision import Precision
from tests.reference import mla_reference as ref

F32 = Precision(jnp.float32, jnp.float32, jnp.float32)
CFG = ModelConfig(embed_dim=32, num_heads=4, attention="mla", q_lora_rank=12, kv_lora_rank=10,
                  qk_nope_head_dim=6, qk_rope_head_dim=8, v_head_dim=5, init_std=0.3,
                  compute_dtype="float32", rope_theta=100.0)
YARN = dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_max_len=4,
            yarn_mscale=0.7, yarn_mscale_all_dim=1.0)
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0]])
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0, 0]])


def _weights(attn: MLAttention) -> dict[str, np.ndarray]:
    names = ["kv_a", "k_rope", "k_b", "v_b", "o"] + (["q_a", "q_b"] if attn.q_lora else ["q"])
    w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in names}
    w["kv_a_norm"] = np.asarray(attn.kv_a_norm.scale[...], np.float64)
    if attn.q_lora:
        w["q_a_norm"] = np.asarray(attn.q_a_norm.scale[...], np.float64)
    return w


@pytest.mark.parametrize("q_lora,yarn", [(12, False), (0, True), (12, True)])
def test_matches_loop_reference(q_lora, yarn):
    cfg = dataclasses.replace(CFG, q_lora_rank=q_lora, **(YARN if yarn else {}))
    attn = MLAttention(cfg, F32, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for norm in [attn.kv_a_norm] + ([attn.q_a_norm] if q_lora else []):
        norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.scale.shape), jnp.float32)
    x = rng.normal(size=(1, 12, cfg.embed_dim))
    got = np.asarray(attn(jnp.asarray(x, jnp.float32), jnp.asarray(SEGMENTS),
                          rotary(cfg, jnp.asarray(POSITIONS))))
    inv, rope_scale = rope_inv_freq(cfg)
    want = ref.mla(x[0], _weights(attn), SEGMENTS[0], POSITIONS[0], np.float64(inv), rope_scale,
                   softmax_scale(cfg), cfg.norm_eps)
    np.testing.assert_allclose(got[0], want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_absorbed_latent_attention_equals_expanded():
    attn = MLAttention(CFG, F32, nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, CFG.embed_dim)), jnp.float32)
    seg, pos = jnp.asarray(np.repeat(SEGMENTS, 2, 0)), jnp.asarray(np.repeat(POSITIONS, 2, 0))
    q_nope, q_rope = attn.queries(x, rotary(CFG, pos))
    c_kv, k_rope = attn.latent(x, rotary(CFG, pos))  # the whole inference cache: [b, s, kv_lora + rope]
    assert c_kv.shape[-1] + k_rope.shape[-1] == CFG.kv_lora_rank + CFG.qk_rope_head_dim
    mask = attention_mask(seg)
    k_nope = jnp.einsum("bsr,rnd->bsnd", c_kv, attn.k_b[...])
    v = jnp.einsum("bsr,rnv->bsnv", c_kv, attn.v_b[...])
    expanded = mla_attention(q_nope, q_rope, k_nope, k_rope, v, mask, attn.scale)
    absorbed = absorbed_attention(q_nope, q_rope, c_kv, k_rope, attn.k_b[...], attn.v_b[...],
                                  mask, attn.scale)
    np.testing.assert_allclose(absorbed, expanded, atol=1e-5 * float(jnp.abs(expanded).max()))


# The last case puts the ramp's upper end past the rotary width (theta 10, 1024 positions:
# beta_slow's correction dimension is 17.7 of 16), where it is clamped to 15: with 16 the
# inverse frequencies of pairs 6 and 7 would change.
@pytest.mark.parametrize("factor,mscale,all_dim,theta,orig", [
    (40.0, 1.0, 1.0, 10000.0, 256), (4.0, 0.0, 0.0, 10000.0, 256),
    (8.0, 0.707, 1.0, 10000.0, 256), (1.0, 1.0, 1.0, 10000.0, 256),
    (8.0, 1.0, 1.0, 10.0, 1024)])
def test_yarn_matches_transformers(factor, mscale, all_dim, theta, orig):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
            "original_max_position_embeddings": orig, "beta_fast": 32, "beta_slow": 1,
            "mscale": mscale or None, "mscale_all_dim": all_dim or None}
    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=16,
                          qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=8, q_lora_rank=None,
                          max_position_embeddings=int(orig * factor), rope_parameters=rope)
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = ModelConfig(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=16,
                      v_head_dim=8, rope_theta=theta, rope_scaling="yarn",
                      rope_scaling_factor=factor, rope_original_max_len=orig,
                      yarn_mscale=mscale, yarn_mscale_all_dim=all_dim)
    ours, scale = rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
    assert scale == pytest.approx(attention_factor, rel=1e-9)
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-9)
    if factor > 1:  # the test would not notice YaRN being ignored otherwise
        plain, _ = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="none"))
        assert not np.allclose(ours, plain)


@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 3), (8, 3, 4), (1, 1, 2)])
def test_deepseek_routing_matches_reference(n_group, topk_group, k):
    rng = np.random.default_rng(n_group)
    router = Router(16, 16, k, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    std=0.5, precision=F32, rngs=nnx.Rngs(0), n_group=n_group,
                    topk_group=topk_group)
    bias = rng.normal(scale=0.2, size=16)
    router.bias[...] = jnp.asarray(bias, jnp.float32)
    x = rng.normal(size=(64, 16))
    r = router(jnp.asarray(x, jnp.float32))
    scores = 1 / (1 + np.exp(-(x @ np.asarray(router.kernel[...], np.float64))))
    want_ids = ref.grouped_topk(scores, bias, n_group, topk_group, k)
    got_ids = np.sort(np.asarray(r.indices), axis=1)
    np.testing.assert_array_equal(got_ids, want_ids)
    w = np.take_along_axis(scores, np.asarray(r.indices), 1)  # weights: scores without bias
    want_w = w / w.sum(1, keepdims=True) * 2.5
    np.testing.assert_allclose(np.asarray(r.weights), want_w, rtol=1e-5)
    if n_group > 1:  # group limiting must change some choice vs plain top-k
        plain = np.sort(np.argsort(-(scores + bias), axis=1)[:, :k], axis=1)
        assert (plain != want_ids).any()


@pytest.mark.parametrize("q_lora", [0, 48])
def test_parameter_counts_match_eval_shape(q_lora):
    cfg = dataclasses.replace(CFG, q_lora_rank=q_lora, num_layers=3, first_k_dense=1,
                              num_experts=4, num_shared_experts=1)
    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == total_params(cfg)


@pytest.mark.parametrize("changes,message", [
    (dict(kv_lora_rank=0), "model.kv_lora_rank=0: expected a positive integer when model.attention=mla"),
    (dict(qk_rope_head_dim=7), "model.qk_rope_head_dim=7: expected an even number"),
    (dict(qk_norm=True), "model.qk_norm=True: expected false when model.attention=mla"),
    (dict(attention="gqa", rope_scaling="yarn"), "model.rope_scaling='yarn': expected none unless"),
    (dict(rope_scaling="yarn", rope_scaling_factor=0.5), "model.rope_scaling_factor=0.5: expected >= 1"),
    (dict(rope_scaling="yarn", yarn_beta_fast=1.0, yarn_beta_slow=32.0),
     "model.yarn_beta_fast/yarn_beta_slow=(1.0, 32.0): expected beta_fast > beta_slow"),
    (dict(rope_scaling="yarn", yarn_mscale=-1.0), "model.yarn_mscale=-1.0: expected >= 0"),
    (dict(rope_scaling="yarn", yarn_mscale_all_dim=-0.5),
     "model.yarn_mscale_all_dim=-0.5: expected >= 0"),
    (dict(num_experts=6, n_group=4), "model.n_group=4: expected a positive divisor of model.num_experts=6"),
    (dict(num_experts=8, n_group=4, topk_group=5), "model.topk_group=5: expected between 1 and"),
    (dict(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3),
     "model.num_experts_per_tok=3: expected at most topk_group * experts per group = 2"),
    (dict(attention="mqa"), "model.attention='mqa': expected one of gqa, mla"),
])
def test_config_errors_are_one_line(changes, message):
    with pytest.raises(ConfigError) as e:
        validate(Config(model=dataclasses.replace(CFG, **changes)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)

"""A config.json that leaves optional keys out converts as transformers reads it.

transformers' own `save_pretrained` writes every key, but configs written by hand or by
other tools often leave some out; transformers then takes its config class's default."""

import json

import pytest

from tests.convert.helpers import save_random_hf

# Optional config.json keys jaxmoe reads; each has a default in transformers' config class.
OPTIONAL_KEYS = ("rope_theta", "rms_norm_eps", "rope_parameters", "rope_scaling",
                 "num_key_value_heads", "head_dim", "tie_word_embeddings", "norm_topk_prob",
                 "initializer_range", "max_position_embeddings", "decoder_sparse_step",
                 "mlp_only_layers", "qkv_bias", "n_group", "topk_group",
                 "first_k_dense_replace", "routed_scaling_factor", "n_shared_experts")
# DeepSeek-V3's MLA and expert sizes (`deepseek_v3.HF_DEFAULTS`; the other formats need them)
DEEPSEEK_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                 "v_head_dim", "moe_intermediate_size", "intermediate_size", "rope_interleave")


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_keys_left_out_take_the_transformers_defaults(tmp_path, fmt):
    """Reference: transformers' own config class for the model type, built from the same
    config.json with every optional key jaxmoe reads left out (`OPTIONAL_KEYS`, and
    `DEEPSEEK_KEYS` for DeepSeek-V3). A wrong
    default changes the converted model's logits (norm_topk_prob, tie_word_embeddings) or
    refuses a checkpoint transformers loads (num_key_value_heads: MixtralConfig's is 8)."""
    import transformers

    from jaxmoe.convert.hf import hf_model_config

    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig,
           "deepseek_v3": transformers.DeepseekV3Config}[fmt]
    src = save_random_hf(fmt, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    for key in OPTIONAL_KEYS + (DEEPSEEK_KEYS if fmt == "deepseek_v3" else ()):
        config.pop(key, None)
    # Room for the defaults (8, 16 or 4 kv heads; DeepSeek-V3's 3 dense layers and 8 expert
    # groups), with more heads than any kv default, so that taking the number of heads for
    # a missing num_key_value_heads shows; only the config is read here, no weights.
    config.update(num_attention_heads=32, num_hidden_layers=4)
    config.pop("layer_types", None)  # one per layer
    if fmt == "deepseek_v3":
        config["n_routed_experts"] = 16
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    _, cfg = hf_model_config(d)
    m, ref = cfg.model, cls(**config)
    assert m.rope_theta == ref.rope_parameters["rope_theta"]
    assert m.norm_eps == ref.rms_norm_eps
    assert m.tie_embeddings == ref.tie_word_embeddings
    assert m.init_std == ref.initializer_range
    assert m.context_length == ref.max_position_embeddings
    if fmt == "mixtral":
        assert m.norm_topk_prob  # Mixtral always renormalises its top-k weights
    else:
        assert m.norm_topk_prob == ref.norm_topk_prob
    if fmt == "deepseek_v3":
        assert (m.n_group, m.topk_group, m.first_k_dense, m.routed_scaling_factor,
                m.num_shared_experts) == (ref.n_group, ref.topk_group,
                                          ref.first_k_dense_replace,
                                          ref.routed_scaling_factor, ref.n_shared_experts)
        assert (m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim,
                m.v_head_dim, m.expert_mlp_dim, m.mlp_dim) == (
            ref.q_lora_rank, ref.kv_lora_rank, ref.qk_rope_head_dim, ref.qk_nope_head_dim,
            ref.v_head_dim, ref.moe_intermediate_size, ref.intermediate_size)
        assert ref.rope_interleave  # the only layout jaxmoe converts (else refused)
        return  # MLA: no kv heads or head_dim of GQA
    assert m.num_kv_heads == ref.num_key_value_heads
    assert m.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // m.num_heads)
    if fmt.startswith("qwen"):  # every layer sparse: decoder_sparse_step 1, no mlp_only_layers
        assert (ref.decoder_sparse_step, ref.mlp_only_layers) == (1, [])
        assert (m.first_k_dense, m.moe_every) == (0, 1)
    if fmt == "qwen2_moe":
        assert m.qkv_bias == ref.qkv_bias


def test_yarn_without_max_position_embeddings_takes_the_default_length(tmp_path):
    """YaRN whose original length is left out takes max_position_embeddings, itself left out
    here: DeepseekV3Config's default, 4096 (it was read as None and refused). Reference:
    transformers' config class, which fills in original_max_position_embeddings."""
    import transformers

    from jaxmoe.convert.hf import hf_model_config

    config = json.loads((save_random_hf("deepseek_v3", tmp_path / "src") / "config.json")
                        .read_text())
    for key in ("max_position_embeddings", "rope_scaling"):
        config.pop(key, None)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 300.0}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    m = hf_model_config(tmp_path / "cfg")[1].model
    ref = transformers.DeepseekV3Config(**config).rope_parameters
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_len) == (
        "yarn", ref["factor"], ref["original_max_position_embeddings"])
    assert m.context_length == 4096

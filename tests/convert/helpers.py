"""Tiny models for the conversion tests: jaxmoe-born (written as a params-only export) and
transformers-born (random HF models saved with `save_pretrained`), with weights scaled so
routing is far from uniform and a wrong expert, bias or permutation shows in the logits."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxmoe.config import Config, ModelConfig
from jaxmoe.convert.orbax_io import ParamsWriter, array_name
from jaxmoe.model import MoETransformer

TOL = 1e-4  # float32 logits, max absolute difference (logits are O(10))
VOCAB = 64
TINY = dict(vocab_size=VOCAB, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, mlp_dim=96, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=32,
            compute_dtype="float32", init_std=0.3, rope_theta=500.0)

# jaxmoe-born models: each exercises its format's optional parts. DeepSeek-V3's scalars differ
# from transformers' defaults (routed_scaling_factor 2.5, n_shared_experts 1, YaRN mscale ==
# mscale_all_dim), so a field dropped from (or swapped in) a converted config changes logits.
JAXMOE_MODELS = {
    "mixtral": {},
    "qwen2_moe": dict(qkv_bias=True, num_shared_experts=1, shared_expert_mlp_dim=48,
                      shared_expert_gate=True, norm_topk_prob=False, first_k_dense=1),
    # head width 24 is not hidden / heads (= 16): config.json must carry head_dim
    "qwen3_moe": dict(qk_norm=True, norm_topk_prob=True, tie_embeddings=True, head_dim=24),
    "deepseek_v3": dict(attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=12, router_scoring="sigmoid",
                        num_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                        first_k_dense=1, num_shared_experts=2, routed_scaling_factor=1.7,
                        rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=16,
                        yarn_mscale=0.5, yarn_mscale_all_dim=1.0),
}


def jaxmoe_config(fmt: str, **changes) -> Config:
    return Config(model=ModelConfig(**{**TINY, **JAXMOE_MODELS[fmt], **changes}))


def random_params(cfg: Config, seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """Orbax-named arrays of a random model: std 0.3 weights, norm scales 1 +- 0.3, random
    q/k/v biases, and (bias=True) a random router selection bias."""
    model = MoETransformer(cfg.model, nnx.Rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    flat = {array_name(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path({"params": params, "rest": rest})[0]}
    rng = np.random.default_rng(seed)
    for name, value in flat.items():
        if name.endswith("scale.value"):
            flat[name] = (1 + 0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
        elif name.endswith("_bias.value") or (bias and name.endswith("router.bias.value")):
            flat[name] = (0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
    return flat


def write_export(cfg: Config, arrays: dict[str, np.ndarray], out: Path) -> Path:
    writer = ParamsWriter(out, cfg)
    for name, value in arrays.items():
        if ".units." in name:
            for i in range(value.shape[0]):
                writer.write(name, value[i], i)
        else:
            writer.write(name, value)
    return writer.finish()


def tokens(seed: int = 1, batch: int = 2, length: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(toks)).logits.float().numpy()


def load_hf(path: Path):
    """(model, loading info) with eager attention and experts (the reference paths)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                attn_implementation="eager",
                                                experts_implementation="eager")


def hf_config(fmt: str):
    """Transformers-born configs, written independently of jaxmoe's exporter."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    rope = {"rope_type": "default", "rope_theta": 300.0}
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  rope_parameters=rope, rms_norm_eps=1e-5)
    if fmt == "mixtral":
        return MixtralConfig(**common, intermediate_size=32, num_key_value_heads=2, head_dim=16,
                             num_local_experts=4, num_experts_per_tok=2)
    if fmt == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=96,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                              mlp_only_layers=[0])
    if fmt == "qwen3_moe":
        # Special ids that are not jaxmoe's byte ids, two of them EOS: carried through.
        return Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=24, intermediate_size=96,
                              moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=True, decoder_sparse_step=2, bos_token_id=60,
                              eos_token_id=[61, 62], pad_token_id=63)
    # Not transformers' defaults (see JAXMOE_MODELS): YaRN with mscale != mscale_all_dim and
    # its own betas, at an original length where they change the rotary table (at 16 any
    # betas give the same one); top-k weights not renormalised.
    yarn = {"rope_type": "yarn", "rope_theta": 300.0, "factor": 40.0,
            "original_max_position_embeddings": 4096, "mscale": 0.5, "mscale_all_dim": 1.0,
            "beta_fast": 4.0, "beta_slow": 0.5}
    return DeepseekV3Config(**{**common, "rope_parameters": yarn}, norm_topk_prob=False,
                            max_position_embeddings=163840,
                            num_key_value_heads=4, intermediate_size=96,
                            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                            n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=2,
                            routed_scaling_factor=1.7, q_lora_rank=None, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)


def save_random_hf(fmt: str, out: Path, seed: int = 0, dtype=None) -> Path:
    """A random transformers model (std 0.3 weights, norms 1 +- 0.3, random biases) in `dtype`
    (default float32) saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # from_config(dtype=...) keeps transformers' float32 modules (DeepSeek's router) float32.
    model = AutoModelForCausalLM.from_config(hf_config(fmt), attn_implementation="eager",
                                             dtype=dtype or torch.float32)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """{name: (dtype, shape, raw bytes)} for every tensor of an HF model directory."""
    import torch

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = st.get_tensor(name).contiguous()
                raw = t.view(-1).view(torch.uint8).numpy().tobytes()
                out[name] = (str(t.dtype), tuple(t.shape), raw)
    return out

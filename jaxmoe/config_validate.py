"""Validation of a built Config: every impossible combination refused before anything compiles.

`validate` checks the values alone (called by every loader in `jaxmoe/config.py`);
`check_trainable` and `check_data` add what training needs (dtype, tokenizer and data files
on this machine). Each failure is one ConfigError line naming the key, the value and what
was expected.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from input_pipeline.config import SEED_MAX
from jaxmoe.config_schema import Config, ConfigError, MeshConfig, ModelConfig, fail

_CHOICES = {
    "model.router_scoring": ("softmax", "sigmoid"),
    "model.aux_loss_scope": ("batch", "sequence"),
    "model.dispatch": ("dropless", "capacity"),
    "model.grouped_matmul": ("auto", "ragged_dot", "blocks"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("gqa", "mla"),
    "model.rope_scaling": ("none", "yarn"),
}
GMM_BLOCK_MAX = 1 << 16  # rows per expert block; far larger ones overflow int32 offsets
SAMPLE_TOKENS_MAX = 4096  # a demo of the trained model, not a generator (jaxmoe/inference)


def validate(cfg: Config) -> Config:
    """Checks every impossible combination; returns `cfg` unchanged or raises ConfigError."""
    m, t = cfg.model, cfg.train
    for key, choices in _CHOICES.items():
        value = getattr(m, key.split(".")[1])
        if value not in choices:
            fail(key, value, f"one of {', '.join(choices)}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.embed_dim": m.embed_dim,
        "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim, "model.moe_every": m.moe_every,
        "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.grad_accum_steps": t.grad_accum_steps, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
    }
    for key, value in positive.items():
        if value < 1:
            fail(key, value, "a positive integer")
    if m.attention != "mla":  # MLA has its own head widths, and no kv heads
        if m.num_heads % m.num_kv_heads:
            fail("model.num_kv_heads", m.num_kv_heads,
                 f"a divisor of model.num_heads={m.num_heads}")
        if m.head_dim % 2:
            fail("model.head_dim", m.head_dim, "an even number (rotary embeddings rotate pairs)")
    if m.num_experts < 0:
        fail("model.num_experts", m.num_experts, ">= 0 (0 = dense model)")
    if m.num_experts:
        if not 1 <= m.num_experts_per_tok <= m.num_experts:
            fail("model.num_experts_per_tok", m.num_experts_per_tok,
                 f"between 1 and model.num_experts={m.num_experts}")
        if m.expert_mlp_dim < 1:
            fail("model.expert_mlp_dim", m.expert_mlp_dim, "a positive integer")
        if m.capacity_factor <= 0:
            fail("model.capacity_factor", m.capacity_factor, "> 0")
        if not 0 <= m.gmm_block_size <= GMM_BLOCK_MAX or m.gmm_block_size % 8:
            fail("model.gmm_block_size", m.gmm_block_size,
                 f"0 (auto) or a positive multiple of 8 up to {GMM_BLOCK_MAX}")
        if not 0 <= m.first_k_dense <= m.num_layers:
            fail("model.first_k_dense", m.first_k_dense,
                 f"between 0 and model.num_layers={m.num_layers}")
        if (m.num_layers - m.first_k_dense) % m.moe_every:
            fail("model.moe_every", m.moe_every,
                 f"a divisor of num_layers - first_k_dense = {m.num_layers - m.first_k_dense}"
                 " (layers are scanned in repeating groups)")
    _validate_shared_experts(m)
    for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "init_std"):
        if getattr(m, key) < 0:
            fail(f"model.{key}", getattr(m, key), ">= 0")
    for key in ("rope_theta", "norm_eps", "routed_scaling_factor"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", getattr(m, key), "> 0")
    if m.context_length < 0:
        fail("model.context_length", m.context_length, "an integer >= 0 (0: data.seq_len)")
    _validate_mla_and_groups(m)
    if t.batch_size % t.grad_accum_steps:
        fail("train.grad_accum_steps", t.grad_accum_steps,
             f"a divisor of train.batch_size={t.batch_size}")
    for key in ("checkpoint_every", "keep_every"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", getattr(t, key), ">= 0 (0 disables)")
    if not 0 <= t.seed <= SEED_MAX:
        fail("train.seed", t.seed, f"an integer in [0, {SEED_MAX}]")
    if not 0 <= t.sample_tokens <= SAMPLE_TOKENS_MAX:
        fail("train.sample_tokens", t.sample_tokens, f"between 0 (no sample) and "
             f"{SAMPLE_TOKENS_MAX} (the end-of-run sample has no KV cache: every token is a "
             "forward pass over the whole sample)")
    if t.keep_checkpoints < 1:
        fail("train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    if t.keep_every and t.checkpoint_every and t.keep_every % t.checkpoint_every:
        fail("train.keep_every", t.keep_every, f"a multiple of train.checkpoint_every="
             f"{t.checkpoint_every} (only saved steps can be kept)")
    o = t.optimizer
    if o.learning_rate <= 0:
        fail("train.optimizer.learning_rate", o.learning_rate, "> 0")
    if not 0 <= o.min_lr_ratio <= 1:
        fail("train.optimizer.min_lr_ratio", o.min_lr_ratio, "a fraction in [0, 1]")
    if o.warmup_steps < 0:
        fail("train.optimizer.warmup_steps", o.warmup_steps, ">= 0")
    for key in ("b1", "b2"):
        if not 0 <= getattr(o, key) < 1:
            fail(f"train.optimizer.{key}", getattr(o, key), "a fraction in [0, 1)")
    if o.eps <= 0:
        fail("train.optimizer.eps", o.eps, "> 0")
    if o.weight_decay < 0:
        fail("train.optimizer.weight_decay", o.weight_decay, ">= 0")
    if o.grad_clip_norm < 0:
        fail("train.optimizer.grad_clip_norm", o.grad_clip_norm, ">= 0 (0 disables clipping)")
    degrees = {f.name: getattr(cfg.mesh, f.name) for f in dataclasses.fields(MeshConfig)
               if f.name not in ("rules", "expert_all_to_all", "expert_buffer_factor")}
    # Only per-slice degrees may be -1 (the devices left over); DCN ones are given whole.
    for key, value in degrees.items():
        if key.startswith("dcn_") and value < 1:
            fail(f"mesh.{key}", value, "a positive integer (DCN degrees cannot be -1)")
    mesh_axes = {k: v for k, v in degrees.items() if not k.startswith("dcn_")}
    rest = [k for k, v in mesh_axes.items() if v == -1]
    if len(rest) > 1:  # mesh.data is -1 by default: setting another to -1 alone hits this
        default = "; mesh.data is -1 by default: give it a size (e.g. mesh.data=1)" \
            if "data" in rest else ""
        raise ConfigError(f"{' and '.join(f'mesh.{k}=-1' for k in rest)}: expected at most "
                          f"one mesh axis set to -1 (the devices left over){default}")
    for key, value in mesh_axes.items():
        if value == 0 or value < -1:
            fail(f"mesh.{key}", value, "a positive integer or -1")
    a2a_choices = ("auto", "padded", "ragged", "ragged_emulated")
    if cfg.mesh.expert_all_to_all not in a2a_choices:
        fail("mesh.expert_all_to_all", cfg.mesh.expert_all_to_all,
             f"one of {', '.join(a2a_choices)}")
    if cfg.mesh.expert_buffer_factor < 0:
        fail("mesh.expert_buffer_factor", cfg.mesh.expert_buffer_factor, ">= 0 (0 = never drop)")
    if cfg.mesh.rules:
        _validate_rules(cfg.mesh.rules)
    return cfg


def _validate_shared_experts(m: ModelConfig) -> None:
    """Shared experts exist only next to routed ones; their options need them."""
    if m.num_shared_experts < 0:
        fail("model.num_shared_experts", m.num_shared_experts, ">= 0")
    if m.shared_expert_mlp_dim < 0:
        fail("model.shared_expert_mlp_dim", m.shared_expert_mlp_dim,
             ">= 0 (0: expert_mlp_dim * num_shared_experts)")
    if m.num_experts == 0 and m.num_shared_experts:
        fail("model.num_shared_experts", m.num_shared_experts, "0 when model.num_experts=0 "
             "(a dense model has no shared experts; widen model.mlp_dim instead)")
    if m.num_shared_experts == 0:
        if m.shared_expert_gate:
            fail("model.shared_expert_gate", True,
                 "false when model.num_shared_experts=0 (it gates the shared experts)")
        if m.shared_expert_mlp_dim:
            fail("model.shared_expert_mlp_dim", m.shared_expert_mlp_dim,
                 "0 when model.num_shared_experts=0")


def _validate_rules(rules: dict[str, Any]) -> None:
    """`mesh.rules`: known logical names mapped to mesh axes (checked by sharding.rules)."""
    from sharding.rules import DEFAULT_RULES, make_rules  # jax is loaded already (jaxmoe)

    names = list(dict.fromkeys(name for name, _ in DEFAULT_RULES))
    for name in rules:
        if name not in names:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis; expected one of "
                              f"{', '.join(names)}")
    try:
        make_rules(rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_trainable(cfg: Config) -> Config:
    """What a training step needs beyond `validate`: float16 compute is allowed for inference
    (`load_checkpoint`) but not for training, which has no loss scaling."""
    if cfg.model.compute_dtype == "float16":
        fail("model.compute_dtype", "float16", "float32 or bfloat16 for training (float16 "
             "gradients need loss scaling, which jaxmoe does not do: small ones underflow)")
    return cfg


def check_data(cfg: Config) -> Config:
    """What `validate` cannot check from the values alone: that the tokenizer and data files
    the config names exist on this machine and that the tokenizer's ids fit the model.

    For commands that read data (`train`); a stored config stays loadable without its data,
    and a model-only config (conversion, tests) may have a vocabulary smaller than 259 bytes.
    Reads the tokenizer file, never the data. Returns `cfg` or raises ConfigError.
    """
    from input_pipeline.sources import check_held_out
    from input_pipeline.tokenizer import make_tokenizer

    check_trainable(cfg)
    d = cfg.data
    if d.tokenizer != "byte" and not os.path.isfile(d.tokenizer):
        fail("data.tokenizer", d.tokenizer, "'byte' or an existing tokenizer file")
    try:
        vocab = make_tokenizer(d).vocab_size  # ValueError: a special token it lacks
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if vocab > cfg.model.vocab_size:
        fail("model.vocab_size", cfg.model.vocab_size,
             f">= {vocab}, the vocab_size of data.tokenizer={d.tokenizer!r}")
    for prefix, src in d.named_sources():
        if src.source == "synthetic":
            continue
        for name in ("paths", "eval_paths"):
            for pattern in getattr(src, name):
                if not glob.glob(os.path.expanduser(pattern), recursive=True):
                    fail(f"{prefix}.{name}", pattern, "a file or a glob pattern matching files")
    try:
        check_held_out(d)  # DataError: a file read twice, or held out and trained on
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _validate_mla_and_groups(m: ModelConfig) -> None:
    """Multi-head latent attention, YaRN and group-limited routing (see ModelConfig)."""
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, key) < 1:
                fail(f"model.{key}", getattr(m, key),
                     "a positive integer when model.attention=mla")
        if m.q_lora_rank < 0:
            fail("model.q_lora_rank", m.q_lora_rank, ">= 0 (0: no query compression)")
        if m.qk_rope_head_dim % 2:
            fail("model.qk_rope_head_dim", m.qk_rope_head_dim,
                 "an even number (rotary embeddings rotate pairs)")
        for key in ("qkv_bias", "qk_norm"):
            if getattr(m, key):
                fail(f"model.{key}", True, "false when model.attention=mla")
    if m.rope_scaling == "yarn":
        if m.attention != "mla":
            fail("model.rope_scaling", m.rope_scaling,
                 "none unless model.attention=mla (YaRN is implemented for MLA)")
        if m.rope_scaling_factor < 1:
            fail("model.rope_scaling_factor", m.rope_scaling_factor, ">= 1")
        if m.rope_original_max_len < 1:
            fail("model.rope_original_max_len", m.rope_original_max_len, "a positive integer")
        if m.yarn_beta_fast <= 0 or m.yarn_beta_slow <= 0:
            fail("model.yarn_beta_fast/yarn_beta_slow", (m.yarn_beta_fast, m.yarn_beta_slow),
                 "positive numbers")
        if m.yarn_beta_fast <= m.yarn_beta_slow:  # the ramp between them would be inverted
            fail("model.yarn_beta_fast/yarn_beta_slow", (m.yarn_beta_fast, m.yarn_beta_slow),
                 "beta_fast > beta_slow (DeepSeek-V3: 32 and 1)")
        for key in ("yarn_mscale", "yarn_mscale_all_dim"):
            if getattr(m, key) < 0:  # a zero or negative attention scale
                fail(f"model.{key}", getattr(m, key), ">= 0")
    if m.n_group < 1 or (m.num_experts and m.num_experts % m.n_group):
        fail("model.n_group", m.n_group,
             f"a positive divisor of model.num_experts={m.num_experts}")
    if not 1 <= m.topk_group <= m.n_group:
        fail("model.topk_group", m.topk_group, f"between 1 and model.n_group={m.n_group}")
    if m.n_group > 1 and m.num_experts:
        per_group = m.num_experts // m.n_group
        if per_group < 2:
            fail("model.n_group", m.n_group, "at most num_experts / 2 (a group is scored by "
                 "its top-2 experts)")
        if m.num_experts_per_tok > m.topk_group * per_group:
            fail("model.num_experts_per_tok", m.num_experts_per_tok,
                 f"at most topk_group * experts per group = {m.topk_group * per_group}")

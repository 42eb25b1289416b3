"""What can be configured, with every default: frozen dataclasses (no logic beyond field types).

`jaxmoe/config.py` loads them from YAML and `key=value` overrides and validates them; the
data settings live with the input pipeline (`input_pipeline/config.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

from input_pipeline.config import DataConfig


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""


def fail(key: str, value: Any, expected: str) -> NoReturn:
    """Raises the one-line ConfigError every config check gives: key, value, expectation."""
    raise ConfigError(f"{key}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only (MoE) transformer. Shapes below use `embed_dim` = model width."""

    vocab_size: int = 512
    embed_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 512  # dense SwiGLU hidden width (dense layers)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 style
    qk_norm: bool = False  # Qwen3 style per-head RMSNorm on q and k
    # Attention kind: "gqa" (grouped-query: num_kv_heads, head_dim) or "mla" (DeepSeek
    # multi-head latent attention: the five dims below; num_kv_heads/head_dim are unused).
    attention: str = "gqa"
    q_lora_rank: int = 0  # MLA query compression rank (0: queries projected directly)
    kv_lora_rank: int = 0  # MLA key/value latent width (what an inference cache stores)
    qk_nope_head_dim: int = 0  # MLA per-head query/key width without rotary embedding
    qk_rope_head_dim: int = 0  # MLA rotary width (the rotary key is shared by all heads)
    v_head_dim: int = 0  # MLA per-head value width
    # Rotary scaling: "none" or "yarn" (YaRN, as DeepSeek-V3 uses it; MLA only).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 4096  # pre-training context of the scaled rotary table
    # Tokens of context the model is meant for (Hugging Face `max_position_embeddings`,
    # kept through an import and export); 0: data.seq_len.
    context_length: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0  # > 0 also scales the softmax (DeepSeek: 1.0)
    # Mixture of experts. num_experts == 0 makes every layer dense.
    num_experts: int = 4
    num_experts_per_tok: int = 2
    expert_mlp_dim: int = 256
    num_shared_experts: int = 0
    shared_expert_mlp_dim: int = 0  # 0: expert_mlp_dim * num_shared_experts
    shared_expert_gate: bool = False  # Qwen-MoE sigmoid gate on the shared expert
    router_scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Group-limited routing (DeepSeek-V3): experts form n_group equal groups; a token picks
    # its experts only from the topk_group groups with the best sum of top-2 scores.
    n_group: int = 1
    topk_group: int = 1
    first_k_dense: int = 0  # DeepSeek: the first k layers are dense
    moe_every: int = 1  # layer i (after first_k_dense) is MoE if (i - k + 1) % moe_every == 0
    dispatch: str = "dropless"  # "dropless" | "capacity"
    # Dropless grouped matmul: "auto" (ragged_dot on TPU, blocks elsewhere), "ragged_dot",
    # "blocks" (see jaxmoe/model/moe/dropless.py for why XLA:CPU needs blocks).
    grouped_matmul: str = "auto"
    # Rows per block of the "blocks" grouped matmul; 0 = auto: big blocks that every routing
    # fills, then small ones of rows / (8 experts), so padding stays <= 12.5% of expert FLOPs
    # (dropless.block_tiers; the expert-parallel path uses the small size only). One size
    # (> 0): larger run faster on XLA:CPU but pad more.
    gmm_block_size: int = 0
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    # Where the load-balancing loss takes its statistics: over the whole micro-batch
    # ("batch", Switch/GShard) or per sequence (batch row) and then averaged ("sequence", the
    # complementary sequence-wise balance loss of DeepSeek-V3).
    aux_loss_scope: str = "batch"
    z_loss_coef: float = 0.001  # router z-loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing (0 disables)
    # Numerics and compilation.
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "full"  # "none" | "full" | "dots" | "dots_no_batch"
    scan_layers: bool = True
    init_std: float = 0.02

    @property
    def resolved_shared_mlp_dim(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_mlp_dim or self.expert_mlp_dim * self.num_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer `i` (0-based) uses the MoE block (HF `decoder_sparse_step`)."""
        if self.num_experts == 0 or i < self.first_k_dense:
            return False
        return (i - self.first_k_dense + 1) % self.moe_every == 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global batch, in sequences
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3  # the newest K checkpoints are kept ...
    keep_every: int = 0  # ... plus every step that is a multiple of this (0: none)
    # async saves on CPU devices write from a reused copy of the state, so the next steps keep
    # donating their buffers (jaxmoe/checkpoint/snapshot.py): one more train state in host
    # memory, taken when a run with checkpoint_every starts
    checkpoint_snapshot: bool = True
    # on resume, read the data from its beginning instead of from where the checkpointed run
    # stood: what lets a run resume on another data stream (data.source, paths, ...)
    restart_data: bool = False
    # a fresh run starts from these parameters (and router biases) instead of random ones: a
    # run directory or step folder, a `jaxmoe checkpoint export-params` output or a
    # `jaxmoe convert from-hf` output; names and shapes must match the model, dtypes are
    # cast. The optimizer starts afresh at step 0. Ignored when the run resumes.
    init_from: str = ""
    sample_prompt: str = "12+7="
    sample_tokens: int = 48
    tensorboard: bool = True
    optimizer: OptimizerConfig = OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh degrees; -1 on one axis means "the rest of the devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = 1  # degrees across slices / hosts (multiplied into `data`)
    dcn_fsdp: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)  # logical-axis overrides
    # Expert-parallel token exchange: "auto" (ragged on TPU/GPU, padded elsewhere) | "padded"
    # (all_to_all of fixed-size buffers) | "ragged" (ragged_all_to_all) | "ragged_emulated".
    expert_all_to_all: str = "auto"
    # Receive buffer per device, in multiples of its own token copies; 0 = worst case
    # (never drops). Smaller saves memory at scale; overflowing copies are dropped and counted.
    expert_buffer_factor: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()

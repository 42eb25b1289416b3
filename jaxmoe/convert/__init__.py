"""Checkpoint conversion: jaxmoe <-> Hugging Face safetensors (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3), streaming one layer at a time, and a logits API for loaded checkpoints.

Public API (imported lazily, so `jaxmoe --help` does not load JAX):
    to_hf(checkpoint, out, fmt, dtype="float32", max_shard_bytes=5e9) -> Report
    from_hf(hf_dir, out, overrides=(), param_dtype=None) -> Report
    hf_model_config(hf_dir, overrides=(), param_dtype=None) -> (Format, Config)
    load_checkpoint(path, overrides=()) -> LoadedModel   (.logits(tokens, segment_ids=None))
    FORMATS, ConversionError
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "to_hf": "hf", "from_hf": "hf", "hf_model_config": "hf", "FORMATS": "hf", "Report": "hf",
    "load_checkpoint": "api", "LoadedModel": "api", "ConversionError": "layout",
}
FORMAT_NAMES = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe")  # == sorted(hf.FORMATS)

__all__ = ["FORMATS", "FORMAT_NAMES", "ConversionError", "LoadedModel", "Report", "from_hf",
           "hf_model_config", "load_checkpoint", "to_hf"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'jaxmoe.convert' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxmoe.convert.{_API[name]}"), name)

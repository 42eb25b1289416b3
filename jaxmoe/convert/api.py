"""Load a jaxmoe checkpoint and compute logits for token ids (the parity tests use this too).

    from jaxmoe.convert import load_checkpoint
    model = load_checkpoint("runs/tiny", overrides=["model.compute_dtype=float32"])
    logits = model.logits([[1, 2, 3, 4]])  # numpy float32 [batch, length, vocab]

`path` is anything `to-hf` accepts: a run directory (latest step), a step directory of a
training checkpoint, or a params-only checkpoint written by `from-hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import config as config_lib
from jaxmoe.convert.orbax_io import ParamsReader, abstract_params, fill_state

# Fields that change no parameter shape or dtype: safe to override when loading.
_NUMERIC_ONLY = ("compute_dtype", "dispatch", "capacity_factor", "remat", "scan_layers")


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint: `config`, and `graphdef`/`params`/`rest` as
    `nnx.split(model, nnx.Param, ...)` returns them."""

    config: config_lib.Config
    graphdef: Any
    params: Any
    rest: Any
    _forward: Any = dataclasses.field(default=None, repr=False)

    def module(self) -> nnx.Module:
        """The `MoETransformer` with these parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def logits(self, tokens: Any, segment_ids: Any = None) -> np.ndarray:
        """tokens [batch, length] ints -> logits [batch, length, vocab] float32 (NumPy).

        segment_ids [batch, length] (optional; default all ones): tokens attend only within
        their segment (0 = padding), and positions restart at 0 at each segment start."""
        tokens = np.asarray(tokens)
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens dtype {tokens.dtype}: expected integer token ids")
        if tokens.ndim != 2:
            raise ValueError(f"tokens shape {tokens.shape}: expected [batch, length]")
        vocab = self.config.model.vocab_size
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):  # before the cast
            raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}]: expected ids in "
                             f"[0, {vocab})")
        tokens = tokens.astype(np.int32)
        seg = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
        if seg.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {seg.shape}: expected {tokens.shape}")
        if self._forward is None:
            graphdef = self.graphdef

            def forward(params, rest, tokens, seg, pos):
                return nnx.merge(graphdef, params, rest)(tokens, seg, pos).logits

            self._forward = jax.jit(forward)
        out = self._forward(self.params, self.rest, tokens, seg, segment_positions(seg))
        return np.asarray(out, np.float32)


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions [batch, length] restarting at 0 wherever the segment id changes."""
    b, n = segment_ids.shape
    idx = np.broadcast_to(np.arange(n), (b, n))
    starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> LoadedModel:
    """Reads the parameters (and router biases) of a checkpoint onto the default device.

    overrides: `key=value` on the stored config; only numerics that leave parameter shapes
    and dtypes unchanged are allowed (e.g. `model.compute_dtype=float32`)."""
    reader = ParamsReader(path)
    values = config_lib.to_dict(reader.config)
    diff = config_lib.parse_overrides(list(overrides))
    for key in diff.get("model", {}):
        if key not in _NUMERIC_ONLY:
            raise config_lib.ConfigError(f"model.{key}: cannot be overridden when loading a "
                                         f"checkpoint (allowed: {', '.join(_NUMERIC_ONLY)})")
    if set(diff) - {"model"}:
        raise config_lib.ConfigError(f"{min(set(diff) - {'model'})}: only model.* "
                                     "overrides apply when loading a checkpoint")
    cfg = config_lib.config_from_dict(values, list(overrides))
    _, abstract = abstract_params(cfg.model)
    arrays = {name: jnp.asarray(reader.read(name)) for name in abstract}
    graphdef, params, rest = fill_state(cfg.model, arrays)
    return LoadedModel(cfg, graphdef, params, rest)

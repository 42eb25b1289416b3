"""Greedy sampling without a KV cache (fine for short samples from small models).

The sequence lives in a fixed `[rows, prompt + new]` buffer so the forward pass compiles once;
every row holds the same sequence (`rows` > 1 lets a batch-sharded mesh split the batch
evenly: one row over several devices is a full rematerialisation for XLA).
The positions from the cursor on are padding (segment id 0): causal attention already keeps
them out of earlier tokens, and the mask keeps them out of the MoE statistics and expert
slots. (A capacity-dispatch model's per-expert capacity is computed from the buffer length,
as in training, not from the prefix length, and grows with `rows`: row 0 comes first in
token order, so it keeps at least the slots it has alone.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.train.state import TrainState
from jaxmoe.train.step import forward


def greedy_generate(graphdef, state: TrainState, prompt: list[int], max_new_tokens: int,
                    eos_id: int | None = None, rows: int = 1) -> list[int]:
    """Returns the generated token ids (without the prompt), stopping at `eos_id`."""
    if not isinstance(rows, (int, np.integer)) or rows < 1:
        raise ValueError(f"rows={rows!r}: expected an integer >= 1")
    if not prompt:
        raise ValueError("prompt: expected at least one token id")
    vocab = int(np.shape(state.params["embedder"]["embedding"])[0])
    bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token {bad[0]!r}: expected integer ids in [0, {vocab})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    total = len(prompt) + max_new_tokens
    buf = np.zeros((rows, total), np.int32)
    buf[:, : len(prompt)] = prompt
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (rows, total))

    @jax.jit
    def next_token(params, rest, tokens, cursor):
        segments = (positions < cursor).astype(jnp.int32)  # 1: the prefix, 0: padding
        out = forward(graphdef, params, rest, {"inputs": tokens, "segment_ids": segments,
                                              "positions": positions})
        return jnp.argmax(out.logits[0, cursor - 1]).astype(jnp.int32)

    tokens = jnp.asarray(buf)
    generated = []
    for cursor in range(len(prompt), total):
        tok = int(next_token(state.params, state.rest, tokens, cursor))
        if eos_id is not None and tok == eos_id:
            break
        generated.append(tok)
        tokens = tokens.at[:, cursor].set(tok)
    return generated

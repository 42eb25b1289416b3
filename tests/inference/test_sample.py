"""Greedy sampling (`jaxmoe/inference/sample.py`) against a naive loop.

Reference: at every step, one forward pass of the whole buffer in which only the prefix is
real (segment id 1) and everything after it is *random* tokens marked as padding (segment
id 0), then argmax of the last prefix position's logits. Generation must not depend on
what fills the padding; with capacity dispatch and a small capacity factor (copies are
dropped) padding that took expert slots would change the prefix's outputs. Exact equality
of token ids (the same compiled shapes; ties are measure-zero with random weights).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.config import load_config
from jaxmoe.inference.sample import greedy_generate
from jaxmoe.train.optimizer import make_optimizer
from jaxmoe.train.state import init_state, model_graphdef
from jaxmoe.train.step import forward

BASE = ["model.vocab_size=48", "model.embed_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=1", "model.head_dim=16", "model.num_experts=4",
        "model.expert_mlp_dim=32", "model.compute_dtype=float32", "model.init_std=0.5"]
PROMPT, NEW = [1, 7, 9, 30, 4], 6


def naive_greedy(graphdef, state, prompt, new, seed=0):
    rng = np.random.default_rng(seed)
    total = len(prompt) + new
    fwd = jax.jit(lambda p, r, b: forward(graphdef, p, r, b).logits)
    ids = list(prompt)
    for cursor in range(len(prompt), total):
        tokens = rng.integers(0, 48, (1, total)).astype(np.int32)  # garbage padding
        tokens[0, :cursor] = ids
        batch = {"inputs": jnp.asarray(tokens),
                 "segment_ids": jnp.asarray((np.arange(total) < cursor)[None].astype(np.int32)),
                 "positions": jnp.arange(total, dtype=jnp.int32)[None]}
        ids.append(int(np.argmax(fwd(state.params, state.rest, batch)[0, cursor - 1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=["dropless", "capacity"])
def model(request):
    extra = ["model.capacity_factor=0.5"] if request.param == "capacity" else []
    cfg = load_config(None, BASE + [f"model.dispatch={request.param}", *extra])
    state = init_state(cfg.model, make_optimizer(cfg.train.optimizer, 10), 3)
    return model_graphdef(cfg.model), state


def test_greedy_matches_naive_loop_whatever_fills_the_padding(model):
    graphdef, state = model
    got = greedy_generate(graphdef, state, PROMPT, NEW)
    assert len(got) == NEW
    for seed in (0, 1):
        assert got == naive_greedy(graphdef, state, PROMPT, NEW, seed)


def test_dropless_greedy_matches_unpadded_prefix_forwards():
    """Reference with no padding buffer at all: each step runs the model on exactly the
    tokens so far ([1, cursor], float32) and takes the argmax of the last position. (The
    capacity model is left out: its per-expert capacity depends on the sequence length.)"""
    cfg = load_config(None, BASE + ["model.dispatch=dropless"])
    state = init_state(cfg.model, make_optimizer(cfg.train.optimizer, 10), 3)
    graphdef = model_graphdef(cfg.model)
    ids = list(PROMPT)
    for _ in range(NEW):
        n = len(ids)
        batch = {"inputs": jnp.asarray([ids], jnp.int32),
                 "segment_ids": jnp.ones((1, n), jnp.int32),
                 "positions": jnp.arange(n, dtype=jnp.int32)[None]}
        logits = forward(graphdef, state.params, state.rest, batch).logits
        ids.append(int(np.argmax(logits[0, -1])))
    assert greedy_generate(graphdef, state, PROMPT, NEW) == ids[len(PROMPT):]
    # Several identical rows (one per batch shard of a mesh) give the same tokens
    assert greedy_generate(graphdef, state, PROMPT, NEW, rows=3) == ids[len(PROMPT):]


def test_greedy_stops_at_eos_without_emitting_it(model):
    graphdef, state = model
    full = greedy_generate(graphdef, state, PROMPT, NEW)
    k = 2
    eos = full[k]
    assert eos not in full[:k], full  # pick a position whose token is new
    assert greedy_generate(graphdef, state, PROMPT, NEW, eos_id=eos) == full[:k]
    with pytest.raises(ValueError, match="prompt: expected at least one token id"):
        greedy_generate(graphdef, state, [], NEW)
    # Ids outside the vocabulary would read a NaN embedding (jnp.take) and emit token 0.
    for prompt, new, message in (([1, 48], NEW, "prompt token 48: expected integer ids in "
                                   "[0, 48)"),
                                 ([-1], NEW, "prompt token -1: expected"),
                                 ([1.5], NEW, "prompt token 1.5: expected"),
                                 ([1], -1, "max_new_tokens=-1: expected an integer >= 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            greedy_generate(graphdef, state, prompt, new)
    with pytest.raises(ValueError, match=re.escape("rows=0: expected an integer >= 1")):
        greedy_generate(graphdef, state, PROMPT, NEW, rows=0)
    assert greedy_generate(graphdef, state, PROMPT, 0) == []

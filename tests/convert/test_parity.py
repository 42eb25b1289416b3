"""Logits parity with transformers (float32, eager attention), both directions, per format.

jaxmoe -> to-hf -> AutoModelForCausalLM: no missing/unexpected/mismatched keys, logits within
TOL of jaxmoe's. transformers save_pretrained -> from-hf -> jaxmoe: logits within TOL of
transformers'; then to-hf again: every tensor byte-identical to what transformers saved.
"""

import json
import os

import numpy as np
import pytest

from jaxmoe.convert import from_hf, load_checkpoint, to_hf
from tests.convert.helpers import (
    TOL,
    hf_logits,
    jaxmoe_config,
    load_hf,
    random_params,
    read_tensors,
    save_random_hf,
    tokens,
    write_export,
)

FORMATS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, tmp_path_factory):
    """(format, jaxmoe logits, HF model dir) of a jaxmoe-born model exported to HF."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"to_hf_{fmt}")
    cfg = jaxmoe_config(fmt)
    src = write_export(cfg, random_params(cfg, bias=fmt == "deepseek_v3"), root / "jaxmoe")
    to_hf(src, root / "hf", fmt)
    return fmt, load_checkpoint(src).logits(tokens()), root / "hf"


def test_jaxmoe_to_transformers_logits(exported):
    fmt, ours, hf_dir = exported
    model, info = load_hf(hf_dir)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (
        set(), set(), set()), info
    assert type(model).__name__ == CLASSES[fmt]
    # The byte tokenizer's ids (data.tokenizer=byte), which generate() stops at.
    g = model.generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (1, 2, 0)
    theirs = hf_logits(model, tokens())
    assert np.abs(theirs).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    # The byte tokenizer comes along: AutoTokenizer gives the ids of a training prompt.
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok("sort 3 1 -> 1 3")["input_ids"] == [1] + [b + 3 for b in b"sort 3 1 -> 1 3"]


@pytest.fixture(scope="module", params=FORMATS)
def imported(request, tmp_path_factory):
    """(format, HF dir, jaxmoe checkpoint) of a transformers-born model imported into jaxmoe."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"from_hf_{fmt}")
    hf_dir = save_random_hf(fmt, root / "hf")
    from_hf(hf_dir, root / "jaxmoe", ["model.compute_dtype=float32"])
    return fmt, hf_dir, root / "jaxmoe"


def test_transformers_to_jaxmoe_logits(imported):
    _, hf_dir, ckpt = imported
    model, _ = load_hf(hf_dir)
    theirs = hf_logits(model, tokens(seed=2))
    ours = load_checkpoint(ckpt).logits(tokens(seed=2))
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_round_trip_is_byte_identical(imported, tmp_path, monkeypatch, caplog):
    fmt, hf_dir, ckpt = imported
    # Read through a relative path with `..` (tensorstore's file driver refuses `..` in the
    # absolute paths it was given: "Invalid file path").
    monkeypatch.chdir(hf_dir)
    to_hf(os.path.join("..", ckpt.name), tmp_path / "again", fmt)
    # The context length survives (it was the training seq_len, 256, after a round trip).
    configs = [json.loads((d / "config.json").read_text()) for d in (hf_dir, tmp_path / "again")]
    assert configs[0]["max_position_embeddings"] == configs[1]["max_position_embeddings"]
    # So do the special token ids and generation_config.json (dropped before: generate()
    # never stopped at EOS).
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert configs[1].get(key) == configs[0].get(key), key
    generation = [(d / "generation_config.json").read_text() for d in (hf_dir, tmp_path / "again")]
    assert json.loads(generation[1]) == json.loads(generation[0])
    # No byte tokenizer for a model that came with its own (the import's data.tokenizer).
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    assert "copy the source model's tokenizer files" in caplog.text
    original, again = read_tensors(hf_dir), read_tensors(tmp_path / "again")
    assert sorted(again) == sorted(original)
    for name, (dtype, shape, raw) in original.items():
        assert again[name][:2] == (dtype, shape), name
        assert again[name][2] == raw, f"{name}: bytes differ"

"""Config loading, overrides and validation: every bad value is one line naming key and value."""

from pathlib import Path

import pytest

from jaxmoe.config import Config, ConfigError, dump_config, load_config, parse_overrides

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "c.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_overrides_apply_and_coerce():
    cfg = load_config(None, ["model.num_experts=8", "train.optimizer.learning_rate=1e-4",
                             "model.router_scoring=sigmoid", "model.rope_theta=500000"])
    assert cfg.model.num_experts == 8
    assert cfg.train.optimizer.learning_rate == 1e-4
    assert cfg.model.router_scoring == "sigmoid"
    assert isinstance(cfg.model.rope_theta, float) and cfg.model.rope_theta == 5e5


BAD = [
    (["model.num_experts_per_tok=5"], "model.num_experts_per_tok=5: expected between 1 and model.num_experts=4"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3: expected a divisor of model.num_heads=4"),
    (["model.head_dim=33"], "model.head_dim=33: expected an even number"),
    (["model.router_scoring=relu"], "model.router_scoring='relu': expected one of softmax, sigmoid"),
    (["model.dispatch=dense"], "model.dispatch='dense': expected one of dropless, capacity"),
    (["model.num_layers=0"], "model.num_layers=0: expected a positive integer"),
    (["model.num_layers=two"], "model.num_layers='two': expected an integer"),
    (["model.embed_dim=1.5"], "model.embed_dim=1.5: expected an integer"),
    (["model.tie_embeddings=3"], "model.tie_embeddings=3: expected true or false"),
    (["model.num_expert=4"], "model.num_expert: unknown key"),
    (["modle.num_experts=4"], "modle: unknown key"),
    (["model.capacity_factor=0"], "model.capacity_factor=0.0: expected > 0"),
    (["model.gmm_block_size=12"], "model.gmm_block_size=12: expected 0 (auto) or a positive"),
    (["model.gmm_block_size=-8"], "model.gmm_block_size=-8: expected 0 (auto) or a positive"),
    (["model.num_layers=4", "model.moe_every=3"], "model.moe_every=3: expected a divisor of num_layers - first_k_dense = 4"),
    (["model.first_k_dense=7"], "model.first_k_dense=7: expected between 0 and model.num_layers=2"),
    (["train.grad_accum_steps=3"], "train.grad_accum_steps=3: expected a divisor of train.batch_size=16"),
    (["train.optimizer.warmup_steps=-5"], "train.optimizer.warmup_steps=-5: expected >= 0"),
    (["train.optimizer.learning_rate=-1"], "train.optimizer.learning_rate=-1.0: expected > 0"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "expected at most one axis set to -1"),
    (["mesh.tensor=0"], "mesh.tensor=0: expected a positive integer or -1"),
    (["data.seq_len=1"], "data.seq_len=1: expected an integer >= 2"),
    (["model.num_experts=4", "model.num_experts=8"], "model.num_experts: given twice with different values 4 and 8"),
    (["model.num_experts"], "expected key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    text = str(e.value)
    assert message in text
    assert "\n" not in text


def test_same_key_twice_with_same_value_is_fine():
    assert parse_overrides(["a.b=1", "a.b=1"]) == {"a": {"b": 1}}


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_are_valid():
    assert load_config(None) == Config()

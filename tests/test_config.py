"""Config loading, overrides and validation: every bad value is one line naming key and value."""

import json
from pathlib import Path

import pytest
import yaml

from jaxmoe.config import (
    Config,
    ConfigError,
    check_data,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from jaxmoe.config_yaml import parse_yaml

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
    (["model.num_experts_per_tok=5"],
     "model.num_experts_per_tok=5: expected between 1 and model.num_experts=4"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3: expected a divisor of model.num_heads=4"),
    (["model.head_dim=33"], "model.head_dim=33: expected an even number"),
    (["model.router_scoring=relu"],
     "model.router_scoring='relu': expected one of softmax, sigmoid"),
    (["model.dispatch=dense"], "model.dispatch='dense': expected one of dropless, capacity"),
    (["model.aux_loss_scope=token"],
     "model.aux_loss_scope='token': expected one of batch, sequence"),
    (["model.num_layers=0"], "model.num_layers=0: expected a positive integer"),
    (["model.num_layers=two"], "model.num_layers='two': expected an integer"),
    (["model.embed_dim=1.5"], "model.embed_dim=1.5: expected an integer"),
    (["model.tie_embeddings=3"], "model.tie_embeddings=3: expected true or false"),
    (["model.num_expert=4"], "model.num_expert: unknown key"),
    (["modle.num_experts=4"], "modle: unknown key"),
    (["model.capacity_factor=0"], "model.capacity_factor=0.0: expected > 0"),
    (["model.gmm_block_size=12"], "model.gmm_block_size=12: expected 0 (auto) or a positive"),
    (["model.gmm_block_size=-8"], "model.gmm_block_size=-8: expected 0 (auto) or a positive"),
    (["model.num_layers=4", "model.moe_every=3"],
     "model.moe_every=3: expected a divisor of num_layers - first_k_dense = 4"),
    (["model.first_k_dense=7"], "model.first_k_dense=7: expected between 0 and model.num_layers=2"),
    (["train.grad_accum_steps=3"],
     "train.grad_accum_steps=3: expected a divisor of train.batch_size=16"),
    (["train.optimizer.warmup_steps=-5"], "train.optimizer.warmup_steps=-5: expected >= 0"),
    (["train.optimizer.learning_rate=-1"], "train.optimizer.learning_rate=-1.0: expected > 0"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh.data=-1 and mesh.fsdp=-1: expected at most one "
     "mesh axis set to -1 (the devices left over); mesh.data is -1 by default: give it a size "
     "(e.g. mesh.data=1)"),
    (["mesh.data=2", "mesh.fsdp=-1", "mesh.expert=-1"],
     "mesh.fsdp=-1 and mesh.expert=-1: expected at most one mesh axis set to -1 (the devices "
     "left over)"),
    (["mesh.tensor=0"], "mesh.tensor=0: expected a positive integer or -1"),
    # a DCN degree cannot be -1: offering it led to a second refusal (config_degrees)
    (["mesh.dcn_fsdp=0"], "mesh.dcn_fsdp=0: expected a positive integer (DCN degrees cannot "
     "be -1)"),
    (["mesh.data=1", "mesh.dcn_data=-1"], "mesh.dcn_data=-1: expected a positive integer "
     "(DCN degrees cannot be -1)"),
    (["data.seq_len=1"], "data.seq_len=1: expected an integer >= 2"),
    (["model.num_experts=4", "model.num_experts=8"],
     "model.num_experts: given twice with different values 4 and 8"),
    (["model.num_experts"], "expected key=value"),
    (["=3"], "expected key=value"),
    # override values: YAML syntax errors, YAML 1.1 quirks
    (["model.num_experts=[1,2"],
     "model.num_experts='[1,2': expected a YAML value (expected ',' or ']', but got"),
    (["mesh.rules={embed: [fsdp}"], "mesh.rules='{embed: [fsdp}': expected a YAML value ("),
    (["train.steps=1:2"], "train.steps='1:2': expected an integer"),  # not base-60 62
    (["train.tensorboard=yes"], "train.tensorboard='yes': expected true or false"),
    # impossible values
    (["train.optimizer.b1=1.5"], "train.optimizer.b1=1.5: expected a fraction in [0, 1)"),
    (["train.optimizer.b2=1"], "train.optimizer.b2=1.0: expected a fraction in [0, 1)"),
    (["train.optimizer.b1=-0.1"], "train.optimizer.b1=-0.1: expected a fraction in [0, 1)"),
    (["train.optimizer.eps=0"], "train.optimizer.eps=0.0: expected > 0"),
    (["train.optimizer.weight_decay=-0.1"], "train.optimizer.weight_decay=-0.1: expected >= 0"),
    (["train.optimizer.grad_clip_norm=-1"],
     "train.optimizer.grad_clip_norm=-1.0: expected >= 0 (0 disables clipping)"),
    (["train.eval_batches=0"], "train.eval_batches=0: expected a positive integer"),
    (["train.sample_tokens=-1"], "train.sample_tokens=-1: expected between 0 (no sample) and "
     "4096 (the end-of-run sample has no KV cache: every token is a forward pass over the "
     "whole sample)"),
    # found only after training, as a 36 TiB allocation (and summary.json was lost)
    (["train.sample_tokens=10000000000000"], "train.sample_tokens=10000000000000: expected "
     "between 0 (no sample) and 4096"),
    (["train.sample_tokens=4097"], "train.sample_tokens=4097: expected between 0 (no sample) "
     "and 4096"),
    # a string is not a number (it was read as one for floats only: learning_rate='3e-4')
    (["train.optimizer.learning_rate='3e-4'"],
     "train.optimizer.learning_rate='3e-4': expected a number"),
    # the int32 block offsets overflowed in the train step, with a traceback
    (["model.grouped_matmul=blocks", "model.gmm_block_size=1073741824"],
     "model.gmm_block_size=1073741824: expected 0 (auto) or a positive multiple of 8 up to "
     "65536"),
    (["train.seed=99999999999"], "train.seed=99999999999: expected an integer in [0, 4294967295]"),
    (["train.seed=-1"], "train.seed=-1: expected an integer in [0, 4294967295]"),
    (["data.seed=4294967296"], "data.seed=4294967296: expected an integer in [0, 4294967295]"),
    (["model.norm_eps=0"], "model.norm_eps=0.0: expected > 0"),
    (["model.routed_scaling_factor=-2.5"], "model.routed_scaling_factor=-2.5: expected > 0"),
    (["model.shared_expert_mlp_dim=-4"], "model.shared_expert_mlp_dim=-4: expected >= 0"),
    (["model.num_shared_experts=-1"], "model.num_shared_experts=-1: expected >= 0"),
    (["model.rope_theta=1" + "0" * 400], "model.rope_theta=1" + "0" * 400 + ": expected a "
     "finite number"),
    (["model.num_layers=100000000000000000000"],
     "model.num_layers=100000000000000000000: expected an integer within 64 bits"),
    (["model.context_length=-1"],
     "model.context_length=-1: expected an integer >= 0 (0: data.seq_len)"),
    # shared experts need routed ones; their options need shared experts
    (["model.num_experts=0", "model.num_shared_experts=1"],
     "model.num_shared_experts=1: expected 0 when model.num_experts=0"),
    (["model.num_experts=0", "model.shared_expert_gate=true"],
     "model.shared_expert_gate=True: expected false when model.num_shared_experts=0"),
    (["model.shared_expert_mlp_dim=64"],
     "model.shared_expert_mlp_dim=64: expected 0 when model.num_shared_experts=0"),
    # data.sources entries are typed like top-level fields and named by index
    (["data.source=mixture", "data.sources=[{source: synthetic, weight: abc}]"],
     "data.sources[0].weight='abc': expected a number"),
    (["data.source=mixture", "data.sources=[{source: synthetic}, {source: synthetic, weight: 0}]"],
     "data.sources[1].weight=0.0: expected a positive number"),
    (["data.source=mixture", "data.sources=[{source: synthetic, weight: .inf}]"],
     "data.sources[0].weight=inf: expected a finite number"),
    (["data.source=mixture", "data.sources=[{source: synthetic, text_field: 3}]"],
     "data.sources[0].text_field=3: expected a string"),
    (["data.source=mixture", "data.sources=[{source: synthetic, wieght: 2}]"],
     "data.sources[0].wieght: unknown key; expected one of eval_paths, paths, source"),
    (["data.source=mixture", "data.sources=[{source: jsonl}]"],
     "data.sources[0].paths=(): expected at least one path for source 'jsonl'"),
    (["data.source=mixture", "data.sources=[synthetic]"],
     "data.sources[0]='synthetic': expected a mapping of SourceConfig fields"),
    (["data.source=mixture", "data.sources=3"], "data.sources=3: expected a list of SourceConfig"),
    (["data.tokenizer=tok.txt"], "data.tokenizer='tok.txt': expected 'byte', a Hugging Face"),
    # mesh.rules: known logical names, known mesh axes
    (["mesh.rules={embed: [fsdpx]}"], "mesh.rules.embed=['fsdpx']: expected mesh axes among"),
    (["mesh.rules.embd=[fsdp]"], "mesh.rules.embd: unknown logical axis; expected one of batch"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    text = str(e.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("overrides,field,value", [
    # every expert chosen: "between 1 and model.num_experts=4" includes 4
    (["model.num_experts_per_tok=4"], "num_experts_per_tok", 4),
    # an all-dense model: "between 0 and model.num_layers=2" includes 2 (the decoder builds
    # it as one dense group: tests/model/test_decoder.py, layers=4, k=4)
    (["model.first_k_dense=2"], "first_k_dense", 2),
    # grouped routing, 8 experts in 4 groups of 2, 1 group kept: at most 1 * 2 experts
    (["model.num_experts=8", "model.n_group=4", "model.topk_group=1",
      "model.num_experts_per_tok=2"], "num_experts_per_tok", 2),
], ids=["experts_per_tok=num_experts", "first_k_dense=num_layers",
        "experts_per_tok=topk_group*group_size"])
def test_bounds_accept_their_edge(overrides, field, value):
    """Reference: the bound each refusal message states (BAD above, and the grouped-routing
    one in tests/model/test_mla.py) is inclusive: the edge value itself validates."""
    cfg = load_config(None, overrides)
    assert getattr(cfg.model, field) == value


@pytest.mark.parametrize("values,message", [
    ({"data": {"text_field": 3}}, "data.text_field=3: expected a string"),
    ({"data": {"source": "mixture", "sources": [{"text_field": 3}]}},
     "data.sources[0].text_field=3: expected a string"),
    ({"mesh": {"rules": {"embed": 3}}}, "mesh.rules.embed=3: expected mesh axes among"),
])
def test_bad_yaml_typed_values_give_one_line(values, message):
    """As from a YAML file: a string field's override would read `3` as the string '3'."""
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_override_values_read_as_yaml_1_2_and_strings_verbatim():
    cfg = load_config(None, [
        "train.steps=010", "train.optimizer.warmup_steps=0o10", "model.num_experts=0x8",
        "train.log_every=1_000", "train.optimizer.learning_rate=1e-4",
        "train.sample_prompt=1:2", "data.pad_token=no", "data.bos_token='<s> '",
        "data.eos_token==", "data.source=jsonl", "data.paths=*.jsonl",
        "data.eval_paths=[a.jsonl, 'b*.jsonl']"])
    assert cfg.train.steps == 10  # not octal 8
    assert cfg.train.optimizer.warmup_steps == 8 and cfg.model.num_experts == 8
    assert cfg.train.log_every == 1000 and cfg.train.optimizer.learning_rate == 1e-4
    assert cfg.train.sample_prompt == "1:2"  # not base-60 62
    assert (cfg.data.pad_token, cfg.data.bos_token, cfg.data.eos_token) == ("no", "<s> ", "=")
    assert cfg.data.paths == ("*.jsonl",) and cfg.data.eval_paths == ("a.jsonl", "b*.jsonl")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_read_as_with_yaml_1_1(path):
    """The YAML 1.2 reader changes nothing in the shipped configs (types included)."""
    text = path.read_text()
    assert repr(parse_yaml(text)) == repr(yaml.safe_load(text))


@pytest.mark.parametrize("prompt", ["010", "1:2", "yes", "0o10", "1_0", "null", "1e3", "=", ".inf"])
def test_dumped_strings_that_look_like_other_types_round_trip(prompt, tmp_path):
    cfg = load_config(None, [f"train.sample_prompt={prompt}"])
    assert cfg.train.sample_prompt == prompt
    dumped = tmp_path / "c.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg
    assert yaml.safe_load(dumped.read_text())["train"]["sample_prompt"] == prompt  # YAML 1.1 too


def test_yaml_syntax_error_in_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_experts: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: expected valid YAML (")
    assert "at line 3" in str(e.value) and "\n" not in str(e.value)


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"model:\n  num_experts: 4 # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: byte 29 is not UTF-8; expected a UTF-8 YAML text file"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `model:` section dropped the first
    one's values without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  num_experts: 8\ntrain:\n  steps: 10\nmodel:\n  num_layers: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: expected valid YAML (duplicate key 'model' at line 5, "
                            "column 1)")
    with pytest.raises(ConfigError, match=r"duplicate key 'steps'"):
        load_config(None, ["train={steps: 1, steps: 2}"])


def test_a_short_context_keeps_the_default_sample():
    """The sample may run past the trained context (RoPE extrapolates; it is a demo): a
    bound at data.seq_len refused every short-sequence config that kept the default 48."""
    assert load_config(None, ["data.seq_len=16"]).train.sample_tokens == 48


def test_mla_configs_skip_the_gqa_head_checks():
    """MLA has its own head widths and no kv heads: DeepSeek-V3 with one head was refused as
    "model.num_kv_heads=2: expected a divisor of model.num_heads=1"."""
    path = CONFIGS[0].parent / "deepseek_v3_671b.yaml"
    cfg = load_config(path, ["model.num_heads=1", "model.head_dim=3"])
    assert (cfg.model.num_heads, cfg.model.attention) == (1, "mla")
    with pytest.raises(ConfigError, match=r"^model\.num_kv_heads=2: expected a divisor"):
        load_config(path, ["model.num_heads=1", "model.attention=gqa", "model.rope_scaling=none"])


def test_yaml_merge_keys_work(tmp_path):
    """`<<: *anchor` was refused as invalid YAML (the duplicate-key check could not read a
    merge key). Reference: PyYAML's safe_load of the same file; keys beside the merge win."""
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {num_layers: 3, num_experts: 8}\n"
                    "data:\n  source: mixture\n  sources:\n"
                    "    - &src {source: synthetic, weight: 1.0}\n"
                    "    - <<: *src\n      weight: 2.0\n")
    loaded = parse_yaml(path.read_text())
    assert loaded == yaml.safe_load(path.read_text())
    assert loaded["data"]["sources"][1] == {"source": "synthetic", "weight": 2.0}
    path.write_text("model: &m\n  num_layers: 3\n  num_experts: 8\n"
                    "train:\n  <<: {steps: 7, log_every: 2}\n  steps: 9\n")
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.log_every, cfg.model.num_layers) == (9, 2, 3)
    with pytest.raises(ConfigError, match=r"duplicate key 'steps'"):  # still refused
        load_config(None, ["train={<<: {log_every: 2}, steps: 1, steps: 2}"])


@pytest.mark.parametrize("overrides", [
    ["model.num_experts=8", "model={num_layers: 4}"],
    ["model={num_layers: 4}", "model.num_experts=8"],
])
def test_a_key_and_its_section_both_given_is_an_error(overrides):
    """Reference: either order used to drop one of them silently in one of the orders."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == ("model.num_experts and model: both given; expected one (put "
                            "num_experts inside the model value)")


def test_dotted_rules_override_merges_with_the_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("mesh:\n  rules:\n    embed: [fsdp]\n    mlp: [tensor]\n")
    merged = load_config(path, ["mesh.rules.mlp=[expert]"]).mesh.rules
    assert merged == {"embed": ["fsdp"], "mlp": ["expert"]}
    whole = load_config(path, ["mesh.rules={mlp: [expert]}"]).mesh.rules  # all the rules
    assert whole == {"mlp": ["expert"]}
    assert load_config(path, ["mesh={rules: {mlp: [expert]}}"]).mesh.rules == whole


DATA_BAD = [
    (["model.vocab_size=100"],
     "model.vocab_size=100: expected >= 259, the vocab_size of data.tokenizer='byte'"),
    (["data.tokenizer={tmp}/nope.json"],
     "data.tokenizer='{tmp}/nope.json': expected 'byte' or an existing tokenizer file"),
    (["data.source=jsonl", "data.paths={tmp}/none*.jsonl"],
     "data.paths='{tmp}/none*.jsonl': expected a file or a glob pattern matching files"),
    (["data.source=jsonl", "data.paths={tmp}/a.jsonl", "data.eval_paths={tmp}/b.jsonl"],
     "data.eval_paths='{tmp}/b.jsonl': expected a file or a glob pattern matching files"),
    (["data.source=mixture",
      "data.sources=[{source: synthetic}, {source: parquet, paths: ['{tmp}/*.parquet']}]"],
     "data.sources[1].paths='{tmp}/*.parquet': expected a file or a glob pattern matching"),
    (["data.source=jsonl", "data.paths={tmp}/*.jsonl", "data.eval_paths={tmp}/a.jsonl"],
     "data.eval_paths: '{tmp}/a.jsonl' is also in data.paths; expected held-out files"),
    (["data.tokenizer={tmp}/bad.json"],  # not a tokenizer: exit 2, not a traceback
     "data.tokenizer='{tmp}/bad.json': cannot be read ("),
]


@pytest.mark.parametrize("overrides,message", DATA_BAD, ids=[b[1][:40] for b in DATA_BAD])
def test_missing_data_and_small_vocab_give_one_line(overrides, message, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "bad.json").write_text('{"text": "x"}\n')
    cfg = load_config(None, [o.replace("{tmp}", str(tmp_path)) for o in overrides])  # valid
    with pytest.raises(ConfigError) as e:
        check_data(cfg)
    assert message.replace("{tmp}", str(tmp_path)) in str(e.value) and "\n" not in str(e.value)


def test_existing_data_passes_check_data(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    for path in CONFIGS:
        check_data(load_config(path))
    check_data(load_config(None, ["data.source=mixture", "data.sources=[{source: synthetic}, "
                                  f"{{source: jsonl, paths: ['{tmp_path}/*.jsonl']}}]"]))


def test_same_key_twice_with_same_value_is_fine():
    assert parse_overrides(["a.b=1", "a.b=1"]) == {"a": {"b": 1}}


def test_a_hugging_face_config_points_to_convert(tmp_path):
    """A transformers config.json given as --config said "architectures: unknown key"."""
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                              "hidden_size": 4096}))
    with pytest.raises(ConfigError) as e:
        load_config(hf)
    assert str(e.value) == (f"--config {hf}: a Hugging Face config (model_type 'mixtral'); "
                            "expected a jaxmoe config: `jaxmoe convert from-hf HF_DIR OUT` "
                            "imports the model and writes OUT/config.json for it")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    name = tmp_path / ("a" * 300 + ".yaml")  # was an OSError traceback
    with pytest.raises(ConfigError) as e:
        load_config(name)
    assert str(e.value) == (f"--config {name}: cannot be read (File name too long); expected "
                            "a readable YAML file")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)  # a folder is not reported as missing
    assert str(e.value) == f"--config {tmp_path}: is a directory; expected a YAML file"


def test_defaults_are_valid_and_as_documented():
    """No YAML, no overrides: the defaults validate, and the ones the README and the
    foundation issue state hold (float32 parameters, bfloat16 compute, dropless dispatch,
    full remat, the embedded synthetic corpus, no accumulation)."""
    cfg = load_config(None)
    assert cfg == Config()
    m = cfg.model
    assert (m.param_dtype, m.compute_dtype, m.dispatch, m.remat) == (
        "float32", "bfloat16", "dropless", "full")
    assert (cfg.data.source, cfg.train.grad_accum_steps) == ("synthetic", 1)

"""`jaxmoe info` and CLI error handling (in-process: every command is a plain function)."""

import re

import pytest

from jaxmoe.cli import main
from jaxmoe.config import load_config
from jaxmoe.model.params import parameter_counts


def test_info_prints_breakdown_and_flops(capsys):
    assert main(["info", "--config", "configs/mixtral_8x7b.yaml"]) == 0
    out = capsys.readouterr().out
    counts = parameter_counts(load_config("configs/mixtral_8x7b.yaml").model)
    for part in ("embeddings", "attention", "dense_mlp", "routed_experts", "shared_experts"):
        line = next(l for l in out.splitlines() if l.startswith(part))
        total, active = (int(x.replace(",", "")) for x in line.split()[1:3])
        assert (total, active) == (counts["total"][part], counts["active"][part])
    # Mixtral 8x7B: 46.7B total, 12.9B active (Mistral AI's published figures)
    assert "total parameters: 46.70" in out and "active per token: 12.88" in out
    assert re.search(r"training FLOPs per token \(seq_len 4096\): \d", out)


def test_info_override_changes_counts(capsys):
    main(["info", "--config", "configs/tiny_moe.yaml", "model.num_experts=8"])
    out8 = capsys.readouterr().out
    main(["info", "--config", "configs/tiny_moe.yaml"])
    out4 = capsys.readouterr().out
    assert out8 != out4


def test_config_error_is_one_line_and_exit_2(capsys):
    assert main(["info", "--config", "configs/tiny_moe.yaml", "model.num_experts_per_tok=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxmoe: config error: model.num_experts_per_tok=9: expected between 1 and "
                   "model.num_experts=4")


@pytest.mark.parametrize("override, message", [
    ("data.tokenizer=/nonexistent/tok.json",
     "data.tokenizer='/nonexistent/tok.json': expected 'byte' or an existing tokenizer file"),
    ("model.vocab_size=100",
     "model.vocab_size=100: expected >= 259, the vocab_size of data.tokenizer='byte'"),
])
def test_train_checks_data_before_starting(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                     override]) == 2
    assert capsys.readouterr().err.strip() == f"jaxmoe: config error: {message}"
    assert not run_dir.exists()

"""`jaxmoe info` and CLI error handling (in-process: every command is a plain function)."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from jaxmoe.cli import main
from jaxmoe.config import load_config
from jaxmoe.model.params import parameter_counts


def test_info_prints_breakdown_and_flops(capsys):
    assert main(["info", "--config", "configs/mixtral_8x7b.yaml"]) == 0
    out = capsys.readouterr().out
    counts = parameter_counts(load_config("configs/mixtral_8x7b.yaml").model)
    for part in ("embeddings", "attention", "dense_mlp", "routed_experts", "shared_experts"):
        line = next(ln for ln in out.splitlines() if ln.startswith(part))
        total, active = (int(x.replace(",", "")) for x in line.split()[1:3])
        assert (total, active) == (counts["total"][part], counts["active"][part])
    # Mixtral 8x7B: 46.7B total, 12.9B active (Mistral AI's published figures)
    assert "total parameters: 46.7B, active per token: 12.9B\n" in out
    # By hand: 6 x (active 12,879,925,248 - embedding lookup 32000 x 4096 - norms 4096 x 65);
    # attention 12 x 32 layers x 32 heads x 128 x 4096 (PaLM's count)
    matmul = 6 * (12_879_925_248 - 32000 * 4096 - 4096 * 65)
    attention = 12 * 32 * 32 * 128 * 4096
    assert (f"training FLOPs per token (seq_len 4096): {matmul + attention:.3e} (matmul "
            f"{matmul:.3e} + attention {attention:.3e})\n") in out


def _info_rows(out: str) -> dict[str, tuple[int, int]]:
    """The printed table of `jaxmoe info`: part (and "all") -> (total, active)."""
    rows = (re.fullmatch(r"(\w+) +([\d,]+) +([\d,]+)", line) for line in out.splitlines())
    return {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in rows if m}


def test_info_override_changes_counts(capsys):
    """model.num_experts=8 on tiny_moe: every printed row equals `parameter_counts` of the
    overridden config, and the expert rows equal a closed form by hand (tiny_moe.yaml: 2 MoE
    layers, embed 128, expert MLP 256, top-2; a SwiGLU expert is 3 matrices of 128 x 256, the
    router 128 x E per layer), exact integers."""
    assert main(["info", "--config", "configs/tiny_moe.yaml", "model.num_experts=8"]) == 0
    rows8 = _info_rows(capsys.readouterr().out)
    assert main(["info", "--config", "configs/tiny_moe.yaml"]) == 0
    rows4 = _info_rows(capsys.readouterr().out)
    counts = parameter_counts(load_config("configs/tiny_moe.yaml", ["model.num_experts=8"]).model)
    assert rows8 == {**{p: (counts["total"][p], counts["active"][p]) for p in counts["total"]},
                     "all": (sum(counts["total"].values()), sum(counts["active"].values()))}
    layers, expert, router = 2, 3 * 128 * 256, 128  # router: per layer and expert
    assert rows8["routed_experts"] == (layers * 8 * expert, layers * 2 * expert)
    assert rows4["routed_experts"] == (layers * 4 * expert, layers * 2 * expert)
    assert rows8["router"] == (layers * 8 * router,) * 2
    # Only the 4 extra experts and their router columns are new (active: the router only).
    assert rows8["all"][0] - rows4["all"][0] == layers * 4 * (expert + router)
    assert rows8["all"][1] - rows4["all"][1] == layers * 4 * router


def test_config_error_is_one_line_and_exit_2(capsys):
    assert main(["info", "--config", "configs/tiny_moe.yaml", "model.num_experts_per_tok=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxmoe: config error: model.num_experts_per_tok=9: expected between 1 and "
                   "model.num_experts=4")


def test_the_command_sends_each_stderr_line_in_one_write():
    """Reference: the order of bytes on the stderr pipe, through the `jaxmoe` entry point
    (its `main` replaced by one that prints a line in two parts around a raw write to the
    same file, as a C++ thread's log would land). The line is held until its newline, so
    the raw write lands before it. Under PYTHONUNBUFFERED=1 (set here; Python's default
    for a pipe is line-buffered already) the pipe read `one|\n` before."""
    code = ("import os, sys\n"
            "from jaxmoe import cli\n"
            "def main(**kwargs):\n"
            "    print('one', file=sys.stderr, end='')\n"
            "    os.write(2, b'|')\n"
            "    print(file=sys.stderr)\n"
            "    return 0\n"
            "cli.main = main\n"
            "sys.exit(cli.entry())\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and run.stderr == b"|one\n", run.stderr


@pytest.mark.parametrize("override, message", [
    ("data.tokenizer=/nonexistent/tok.json",
     "data.tokenizer='/nonexistent/tok.json': expected 'byte' or an existing tokenizer file"),
    ("model.vocab_size=100",
     "model.vocab_size=100: expected >= 259, the vocab_size of data.tokenizer='byte'"),
    ("model.compute_dtype=float16",
     "model.compute_dtype='float16': expected float32 or bfloat16 for training (float16 "
     "gradients need loss scaling, which jaxmoe does not do: small ones underflow)"),
])
def test_train_checks_data_before_starting(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                     override]) == 2
    assert capsys.readouterr().err.strip() == f"jaxmoe: config error: {message}"
    assert not run_dir.exists()


def test_multihost_flags_are_refused_before_the_restart(tmp_path, capsys, monkeypatch):
    """`--num-processes 2` without a coordinator is refused with its one line, labelled
    for what it is, before the huge-pages restart (stubbed here, as if glibc and the
    kernel wanted it) would say anything. Before, the restart ran first and the line
    came after it as a "mesh error". Reference: the message of sharding.multihost."""
    from jaxmoe import hugepages
    from sharding import multihost

    for name in (multihost.ENV_ADDRESS, multihost.ENV_COUNT, multihost.ENV_ID):
        monkeypatch.delenv(name, raising=False)
    restarts = []
    monkeypatch.setattr(hugepages, "wanted", lambda environ=None: True)
    monkeypatch.setattr(hugepages, "reexec_with_hugepages", lambda: restarts.append(1))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                 "--num-processes", "2"], hugepages=True) == 2
    assert restarts == [] and not run_dir.exists()
    assert capsys.readouterr().err.strip() == (
        "jaxmoe: multi-host settings: num_processes=2, process_id=None: expected a "
        "coordinator address too (--coordinator-address or JAXMOE_COORDINATOR_ADDRESS), or "
        "--distributed to auto-detect")


def test_overrides_may_follow_options():
    from jaxmoe.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "--config", "c.yaml", "a.b=1", "--run-dir",
                                       "r", "--no-progress", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.run_dir == "r"
    args = parse_args(build_parser(), ["convert", "from-hf", "hf", "out", "--param-dtype",
                                       "float32", "model.compute_dtype=float32"])
    assert args.overrides == ["model.compute_dtype=float32"] and args.param_dtype == "float32"
    for argv in (["train", "--config", "c.yaml", "--run-dir", "r", "--bogus"],
                 ["checkpoint", "inspect", "d", "x=1"]):  # no overrides there
        with pytest.raises(SystemExit) as e:
            parse_args(build_parser(), argv)
        assert e.value.code == 2


def test_options_that_would_be_silently_replaced_or_rounded_away_are_refused(capsys):
    """A second --config replaced the first; --max-shard-size 0.5 became 0 bytes (a shard
    per tensor). Each is one argparse line, exit 2. Reference: the messages."""
    from jaxmoe.cli import build_parser, parse_args
    from jaxmoe.convert.cli import parse_size

    with pytest.raises(SystemExit) as e:
        parse_args(build_parser(), ["info", "--config", "a.yaml", "--config", "b.yaml"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "jaxmoe info: error: --config given twice ('a.yaml' and 'b.yaml'); expected one")
    assert parse_size("1") == 1 and parse_size("1.5KiB") == 1536 and parse_size("5GB") == 5e9
    for bad, why in (("0.5", "expected at least 1 byte"), ("0", "expected at least 1 byte"),
                     ("5 parsecs", "expected a size such as 5GB or 500MiB")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^'{bad}': {why}$"):
            parse_size(bad)


def test_train_refuses_a_run_dir_that_is_a_file_or_holds_other_files(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    for run_dir, problem in ((a_file, "is a file; expected a directory"),
                             (other, "holds other files and no jaxmoe run (no config.yaml)"),
                             (a_file / "sub", f"{a_file} is a file; expected a path whose "
                                              "folders are folders")):
        assert main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
                     "train.steps=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jaxmoe: config error: --run-dir {run_dir}: {problem}"), err
        assert "\n" not in err
    assert a_file.read_text() == "mine" and sorted(p.name for p in other.iterdir()) == [
        "data.csv"]


def test_strict_bad_record_is_one_line(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "fine"}\n{not json\n' + '{"text": "more"}\n' * 50)
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir",
               str(tmp_path / "run"), "--no-progress", "train.steps=1", "data.source=jsonl",
               f"data.paths=[{data}]", "data.strict=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"jaxmoe: data error: {data}:2: bad record"), err
    assert err[-1].endswith("(data.strict=true stops at the first bad record)")


@pytest.mark.parametrize("source, problem", [
    # a misspelt text field: every record bad; the reader looped over the file for ever
    ("jsonl", "100 of the 100 records read are bad (missing_field 100; the last: "),
    # a file in another format: the reader library's traceback
    ("arrayrecord", "cannot be read as data.source='arrayrecord' ("),
])
def test_unreadable_data_is_one_line(tmp_path, capsys, source, problem):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"body": f"record {i} " + "x" * 40}) + "\n"
                            for i in range(3000)))
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir",
               str(tmp_path / "run"), "--no-progress", "train.steps=1", f"data.source={source}",
               f"data.paths=[{data}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("jaxmoe: data error: "), err
    assert problem in err[-1], err[-1]
    assert not (tmp_path / "run").exists()  # a run refused before it starts leaves nothing


def test_too_little_data_is_one_line(tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "the only record"}\n')
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir",
               str(tmp_path / "run"), "--no-progress", "train.steps=1", "data.source=jsonl",
               f"data.paths=[{data}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("jaxmoe: data error: data.paths=("), err
    assert "expected at least 2 records to hold out an eval split" in err and "\n" not in err


def test_diverged_loss_is_one_line(tmp_path, capsys):
    rc = main(["train", "--config", "configs/tiny_moe.yaml", "--run-dir",
               str(tmp_path / "run"), "--no-progress", "train.steps=5", "train.log_every=1",
               "train.optimizer.learning_rate=1e30", "train.optimizer.grad_clip_norm=0",
               "train.optimizer.warmup_steps=0", "train.sample_tokens=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and re.fullmatch(r"jaxmoe: training error: step \d: loss is nan; stopping "
                                    r"\(lower train.optimizer.learning_rate or check the "
                                    r"data\)", err), err


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    """Ctrl-C outside the training loop's guard (while compiling, or a second one while
    stopping) ends with one line and the shell's exit status for SIGINT, not a traceback."""
    import jaxmoe.model.params

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(jaxmoe.model.params, "parameter_counts", interrupted)
    assert main(["info", "--config", "configs/tiny_moe.yaml"]) == 130
    assert capsys.readouterr().err == "jaxmoe: interrupted\n"


def test_refused_resumes_keep_the_runs_config(tmp_path, capsys):
    """A resumed run keeps the checkpoint's tokenizer settings (the token ids would change
    meaning) and data stream (the saved data position belongs to it): refused in one line,
    config.yaml kept; train.restart_data=true resumes on a new stream from its beginning
    (once: given again with nothing changed, it is ignored).
    (Both were accepted with a log line: a run resumed on the synthetic corpus and byte
    tokenizer after training on a JSONL file with a BPE tokenizer.)"""
    run_dir = tmp_path / "run"
    base = ["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
            "--no-progress", "train.sample_tokens=0", "train.eval_batches=1"]
    assert main(base + ["train.steps=1"]) == 0
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    where = f"checkpoint {run_dir / 'checkpoints' / '1'}"
    assert main(base + ["train.steps=2", "data.add_bos=false"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"jaxmoe: {where}: data.add_bos=True -> False: expected the run's tokenizer settings "
        "(the model's token ids would change meaning; a tokenizer file is compared by its "
        "contents); a new tokenizer needs a new --run-dir")
    assert main(base + ["train.steps=2", "data.seed=5"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"jaxmoe: {where}: data.seed=0 -> 5: expected the run's data settings (its saved data "
        "position belongs to that stream); add train.restart_data=true to read the new data "
        "from its beginning")
    # config.yaml is the config of the run's checkpoints: a resume the checkpoint refuses
    # must not replace it with the refused config (a model change, here)
    assert main(base + ["train.steps=2", "model.qk_norm=true"]) == 2
    assert "missing from the checkpoint" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before
    assert main(base + ["train.steps=2", "data.seed=5", "train.restart_data=true"]) == 0
    out = capsys.readouterr()
    assert "train.restart_data=true: the data starts from its beginning" in out.err + out.out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1", "2"]
    # The same command again (a job script that keeps the flag): nothing changed, so the
    # data continues from where step 2 stood
    assert main(base + ["train.steps=3", "data.seed=5", "train.restart_data=true"]) == 0
    out = capsys.readouterr().out
    assert "train.restart_data=true ignored: the data settings are the checkpoint's" in out
    assert "the data starts from its beginning" not in out


def test_a_resume_with_another_model_names_the_settings(tmp_path, capsys):
    """A config whose model differs from the checkpoint's names the settings and the run's
    own config, not only arrays. (It named a router kernel's shapes and "12 more
    mismatches".) Reference: the run was trained with model.num_experts=8, tiny_moe.yaml
    has 4; the arrays follow the model's order (the first layer group's router)."""
    run_dir = tmp_path / "run"
    base = ["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
            "--no-progress", "train.sample_tokens=0", "train.eval_batches=1", "train.steps=1"]
    assert main(base + ["model.num_experts=8"]) == 0
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    where = run_dir / "checkpoints" / "1"
    assert err.startswith(f"jaxmoe: checkpoint {where}: array "), err
    assert err.endswith(
        "; the config does not match the checkpoint; model settings differ from the "
        f"checkpoint's: model.num_experts: 8 -> 4; to resume the run as it was, use --config "
        f"{run_dir / 'config.yaml'}\n"), err
    assert err.count("\n") == 1 and "(2, 128, 8) but the config expects (2, 128, 4)" in err


def test_resume_compares_tokenizer_and_data_files_by_what_they_hold(tmp_path, capsys):
    """The checkpoint's data state holds a fingerprint of the tokenizer file (its bytes) and
    of the train files (paths and sizes). A tokenizer retrained into the same file and a
    glob that matches one more file are refused in one line (both resumed silently while
    the tokenizer was compared by its path and the glob by its text); the same tokenizer
    under another path resumes (it was refused). Reference: hashlib of the files here."""
    import hashlib
    import shutil

    from input_pipeline.tokenizer import train_tokenizer

    texts = [f"document number {i} " + "ab cd " * (i % 7) for i in range(200)]
    d = tmp_path / "data"
    d.mkdir()
    write = lambda path, rows: path.write_text(  # noqa: E731
        "".join(json.dumps({"text": t}) + "\n" for t in rows))
    write(d / "a.jsonl", texts[:150])
    write(tmp_path / "eval.jsonl", texts[150:])
    tok = tmp_path / "tok.json"
    train_tokenizer(texts, str(tok), 300)
    run_dir = tmp_path / "run"
    base = ["train", "--config", "configs/tiny_moe.yaml", "--run-dir", str(run_dir),
            "--no-progress", "train.sample_tokens=0", "train.eval_batches=1",
            "train.batch_size=8", "data.seq_len=64", "data.source=jsonl",
            f"data.paths=[{d}/*.jsonl]", f"data.eval_paths=[{tmp_path / 'eval.jsonl'}]"]
    assert main(base + ["train.steps=1", f"data.tokenizer={tok}"]) == 0
    where = f"checkpoint {run_dir / 'checkpoints' / '1'}"
    moved = tmp_path / "moved.json"
    shutil.copy(tok, moved)
    digest = lambda path: "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    before = digest(tok)
    train_tokenizer(texts[:100], str(tok), 290)  # retrained into the same file
    capsys.readouterr()
    assert main(base + ["train.steps=2", f"data.tokenizer={tok}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"jaxmoe: {where}: data.tokenizer={str(tok)!r}: its contents differ from the run's "
        f"({before[:19]} -> {digest(tok)[:19]}): expected the run's tokenizer settings (the "
        "model's token ids would change meaning; a tokenizer file is compared by its "
        "contents); a new tokenizer needs a new --run-dir")
    assert main(base + ["train.steps=2", f"data.tokenizer={moved}"]) == 0  # the same bytes
    assert f"data.tokenizer: {str(tok)!r} -> {str(moved)!r}" in capsys.readouterr().out
    write(d / "b.jsonl", ["a shard added since"] * 20)
    base += [f"data.tokenizer={moved}"]
    assert main(base + ["train.steps=3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"jaxmoe: checkpoint {run_dir / 'checkpoints' / '2'}: the data files are not the "
        "run's (1 -> 2 files): expected the run's data settings (its saved data position "
        "belongs to that stream); add train.restart_data=true to read the new data from its "
        "beginning")
    assert main(base + ["train.steps=3", "train.restart_data=true"]) == 0
    assert "the data starts from its beginning" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1", "2", "3"]


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1K"), (1_017_472, "1.02M"), (624_256, "624K"),
    (999_499, "999K"), (999_500, "1M"), (999_600_000, "1B"), (999_700_000_000, "1T"),
    (671_026_419_200, "671B"), (1_028_300_000_000, "1.03T"), (5 * 10**15, "5,000T"),
])
def test_human_count(n, text):
    """Three significant digits in the unit that keeps them below 1000 (written out)."""
    from jaxmoe.model.params import human_count

    assert human_count(n) == text

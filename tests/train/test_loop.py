"""`train()` in process: the first step's compilation, every evaluation and the writing of
metrics are left out of the logged step time (the StepTimer itself is tested in
test_metrics.py), and an error mid-run lets the checkpoint save in flight finish.

Reference: the calls the loop makes, recorded by StepTimer and MetricsWriter subclasses and
a wrapped `evaluate` that measure their own wall time; one in-process run of a tiny model."""

import contextlib
import dataclasses
import io
import time

import pytest

from jaxmoe.config import load_config
from jaxmoe.train import loop
from jaxmoe.train.metrics import MetricsWriter, StepTimer

OVERRIDES = ["model.vocab_size=320", "model.embed_dim=32", "model.num_layers=1",
             "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
             "model.expert_mlp_dim=32", "train.batch_size=8", "data.seq_len=16",
             "data.num_documents=400", "train.steps=6", "train.log_every=2",
             "train.eval_every=4", "train.eval_batches=1", "train.sample_tokens=3",
             "data.add_bos=false", "data.packing=false",  # unpacked: tokens vary by step
             "train.optimizer.warmup_steps=6",  # the run ends in warm-up
             "train.seed=1"]  # steps 1 and 2, and 5 and 6, hold different numbers of tokens
GENERATED = [ord(c) + 3 for c in "abc"]  # byte tokenizer ids


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    calls = []
    eval_seconds = []

    class Recorder(StepTimer):
        def restart(self, step):
            calls.append(("restart", step))
            super().restart(step)

        def pause(self, seconds):
            calls.append(("pause", seconds))
            super().pause(seconds)

        def lap(self, step):
            out = super().lap(step)
            calls.append(("lap", step, out))
            return out

    class Writer(MetricsWriter):
        def _tensorboard(self):
            opening = self._tb is None
            out = super()._tensorboard()
            if opening and out is not None:
                calls.append(("tensorboard opened",))
            return out

        def write(self, step, split, values):
            t = time.perf_counter()
            super().write(step, split, values)
            calls.append(("write", split, step, time.perf_counter() - t))

    def timed_evaluate(*args, **kwargs):
        t = time.perf_counter()
        out = evaluate(*args, **kwargs)
        eval_seconds.append(time.perf_counter() - t)
        return out

    def generate(graphdef, state, prompt, max_new_tokens, eos_id=None, rows=1):
        calls.append(("generate", prompt, max_new_tokens, eos_id))
        return GENERATED

    def build_trainer(cfg, devices=None):
        trainer = loop_build_trainer(cfg, devices)

        def train_step(state, batch):
            state, metrics = trainer.train_step(state, batch)
            calls.append(("tokens", metrics["tokens"]))
            return state, metrics

        return dataclasses.replace(trainer, train_step=train_step)

    class Bar:  # the progress bar's count and what it shows (tqdm, drawn or not)
        def __init__(self, *, total, initial, **kwargs):
            self.n = initial

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **values):
            calls.append(("postfix", self.n, values["loss"]))

        def write(self, text):
            pass

        def close(self):
            pass

    evaluate, loop_build_trainer = loop.evaluate, loop.build_trainer
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "StepTimer", Recorder)
    mp.setattr(loop, "MetricsWriter", Writer)
    mp.setattr(loop, "evaluate", timed_evaluate)
    mp.setattr(loop, "greedy_generate", generate)
    mp.setattr(loop, "build_trainer", build_trainer)
    mp.setattr(loop, "tqdm", Bar)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            summary = loop.train(load_config(None, OVERRIDES), tmp_path_factory.mktemp("run"),
                                 progress=False, sample=True)
    finally:
        mp.undo()
    summary["stdout"] = out.getvalue()
    return calls, eval_seconds, summary


def test_the_sample_is_the_prompt_and_what_was_generated(timed_run):
    """The prompt the model is sampled after is tokenized as its training data was: no BOS
    with data.add_bos=false (it always had one); the sample is the prompt text and the
    decoded generation. Reference: the byte tokenizer's ids (byte + 3; EOS 2), by hand."""
    calls, _, summary = timed_run
    assert [c for c in calls if c[0] == "generate"] == [
        ("generate", [ord(c) + 3 for c in "12+7="], 3, 2)]
    assert summary["sample"] == "12+7=abc"


def test_compilation_is_not_step_time(timed_run):
    """The timer restarts right after step 1 (the compiling step), before the first lap;
    every lap covers exactly the steps since the previous one (a log row right after the
    compiling step, which has no step time, is tested with the StepTimer itself)."""
    calls, _, summary = timed_run
    assert [c for c in calls if c[0] == "restart"] == [("restart", 0), ("restart", 1)]
    laps = [c for c in calls if c[0] == "lap"]
    assert [c[1] for c in laps] == [2, 4, 6]
    assert all(c[2] > 0 for c in laps)
    assert calls.index(("restart", 1)) < calls.index(laps[0])
    assert [r["step"] for r in summary["train"]] == [2, 4, 6]


def test_rates_are_the_interval_tokens_over_its_time(timed_run):
    """tokens_per_s of a log row is the tokens of every step since the previous lap over
    their time (steps 2; 3-4; 5-6 here, unpacked so their tokens differ; the compiling
    step 1 is in no interval), model TFLOP/s that times the FLOPs per token. Reference:
    each step's `tokens` as its train step returned them, the lap's mean step time.
    Before, the row's last step's tokens were divided by the mean step time (5,487 tok/s
    for 6,365 in a 2-step CLI run)."""
    from jaxmoe.model.params import training_flops_per_token
    from jaxmoe.train.metrics import read_metrics

    calls, _, summary = timed_run
    tokens = [float(c[1]) for c in calls if c[0] == "tokens"]  # steps 1..6
    rows = read_metrics(summary["run_dir"], "train")
    flops = training_flops_per_token(load_config(None, OVERRIDES).model, 16)["total"]
    assert tokens[0] != tokens[1] and tokens[4] != tokens[5]  # the test tells them apart
    for row, steps in zip(rows, ([2], [3, 4], [5, 6]), strict=True):
        interval_tokens = sum(tokens[s - 1] for s in steps)
        expected = interval_tokens / (len(steps) * row["step_time_s"])
        assert row["tokens_per_s"] == pytest.approx(expected, rel=1e-6)
        assert row["model_tflops_per_s"] == pytest.approx(expected * flops / 1e12, rel=1e-6)


def _pauses_after(calls, split):
    """(write's seconds, the timer call that follows it) for each metrics row of `split`."""
    calls = [c for c in calls if c[0] != "postfix"]
    return [(c[3], calls[i + 1]) for i, c in enumerate(calls)
            if c[:2] == ("write", split)]


def test_each_evaluation_is_paused_out(timed_run):
    """One pause per evaluation (step 4, and the final step 6 though eval_every=4), right
    after its metrics row is written, each at least as long as the evaluation itself
    measured around `evaluate`."""
    calls, eval_seconds, summary = timed_run
    pauses = [pause for _, pause in _pauses_after(calls, "eval")]
    assert len(eval_seconds) == 2 and [p[0] for p in pauses] == ["pause", "pause"]
    assert all(p[1] >= e for p, e in zip(pauses, eval_seconds))
    assert [r["step"] for r in summary["eval"]] == [4, 6]


def test_writing_metrics_is_not_step_time(timed_run):
    """The TensorBoard writer (importing tensorboardX takes a second or two) is opened
    before the timer starts after the compiling step, not at the first write inside a timed
    interval; each train row's write is paused out of the next interval. Before, the
    interval after the first log row measured 1.25 s a step instead of 0.05 s."""
    calls, _, _ = timed_run
    assert calls.index(("tensorboard opened",)) < calls.index(("restart", 1))
    writes = _pauses_after(calls, "train")
    assert len(writes) == 3
    assert all(pause[0] == "pause" and pause[1] >= seconds for seconds, pause in writes)


def test_an_error_lets_the_save_in_flight_finish(tmp_path, monkeypatch, capsys):
    """An error mid-run (here the evaluation at step 3 raises) closes the checkpointer
    before it propagates, which waits for an async save still in flight (step 2's, if it
    has not finished by then; on this tiny model it often has): step 2 is complete on disk
    and no half-written step is left. A save failure reported by that close (made to raise
    here) is printed as one "also," line, and the first error is the one raised.
    Reference: the steps on disk, the calls made, stderr."""
    from jaxmoe.checkpoint import manager as ckpt
    from jaxmoe.checkpoint.damage import CheckpointError
    from jaxmoe.checkpoint.run import RunCheckpointer

    closed = []

    class Recorder(RunCheckpointer):
        def close(self):
            closed.append(self.manager.is_saving_in_progress())
            super().close()
            raise CheckpointError("checkpoint: saving step 2 failed: quota exceeded")

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(loop, "RunCheckpointer", Recorder)
    monkeypatch.setattr(loop, "evaluate", failing_evaluate)
    cfg = load_config(None, [o for o in OVERRIDES if not o.startswith("train.eval_every=")]
                      + ["train.checkpoint_every=2", "train.eval_every=3"])
    with pytest.raises(RuntimeError, match="disk gone"):
        loop.train(cfg, tmp_path, progress=False, sample=False)
    assert len(closed) == 1
    assert "jaxmoe: also, checkpoint: saving step 2 failed: quota exceeded\n" in (
        capsys.readouterr().err)
    assert ckpt.make_manager(ckpt.checkpoint_dir(tmp_path), keep_last=2).all_steps() == [2]
    assert ckpt.incomplete_checkpoints(ckpt.checkpoint_dir(tmp_path)) == []


def test_the_warmup_note_states_the_largest_rate_applied(timed_run):
    """warmup_steps == steps: step k applies schedule(k - 1) (optax counts from 0), so the
    peak 3e-3 is never applied; the largest rate is step 6's, 5/6 of it (by hand: 0.0025,
    83.3%), as the run logged it. Before, no note came when warmup_steps == steps, and with
    more warm-up steps it named steps / warmup_steps of the peak (a step too far)."""
    from jaxmoe.train.metrics import read_metrics

    _, _, summary = timed_run
    rates = {r["step"]: r["learning_rate"] for r in read_metrics(summary["run_dir"], "train")}
    assert max(rates.values()) == rates[6] == pytest.approx(0.0025)
    notes = [line for line in summary["stdout"].splitlines() if line.startswith("note:")]
    assert notes == ["note: train.optimizer.warmup_steps=6 >= train.steps=6: the run ends in "
                     "warm-up; the largest learning rate it applies is 0.0025 at step 6 "
                     "(83.3% of train.optimizer.learning_rate=0.003)"]


@pytest.mark.parametrize("steps, warmup, note", [
    (1, 10, "note: train.optimizer.warmup_steps=10 >= train.steps=1: the run ends in warm-up; "
            "its only step runs at learning rate 0 (the warm-up starts from 0), so the "
            "optimizer changes no parameter"),
    (3, 10, "note: train.optimizer.warmup_steps=10 >= train.steps=3: the run ends in warm-up; "
            "the largest learning rate it applies is 0.0006 at step 3 (20% of "
            "train.optimizer.learning_rate=0.003)"),
    (11, 10, None),  # step 11 applies schedule(10), the peak
])
def test_warmup_note_without_a_run(steps, warmup, note):
    """The note from the schedule alone. Reference: the learning rates a CLI run with
    train.steps=3 warmup_steps=10 logged (0, 0.0003, 0.0006); step 1 applies schedule(0) = 0
    (before, the note said 10% for one step and 30% for three)."""
    from jaxmoe.train.optimizer import learning_rate_schedule

    cfg = load_config(None, [f"train.steps={steps}", f"train.optimizer.warmup_steps={warmup}",
                             "train.optimizer.learning_rate=0.003"])
    schedule = learning_rate_schedule(cfg.train.optimizer, steps)
    assert loop._warmup_note(cfg, schedule) == note


def test_the_progress_bar_shows_a_loss_next_to_its_step(timed_run):
    """A step's loss is put on the bar once the bar counts that step. Before, set_postfix
    redrew it next to the previous step's count (loss of step 2 shown at 1/6)."""
    calls, _, summary = timed_run
    shown = [(c[1], c[2]) for c in calls if c[0] == "postfix"]
    assert shown == [(r["step"], f"{r['loss']:.3f}") for r in summary["train"]]
    assert [s for s, _ in shown] == [2, 4, 6]


def test_the_model_line_counts_as_jaxmoe_info_does(timed_run):
    """Parameter counts in `jaxmoe info`'s units (human_count: 36,064 and 29,920 for this
    model, from jaxmoe.model.params). Before, every count was in millions ("0.04M", and a
    1T config's "1028298.99M")."""
    _, _, summary = timed_run
    (line,) = [x for x in summary["stdout"].splitlines() if x.startswith("model:")]
    assert line.startswith("model: 36.1K parameters, 29.9K active; mesh ")

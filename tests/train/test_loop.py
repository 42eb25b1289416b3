"""`train()` in process: the first step's compilation and every evaluation are left out of
the logged step time (the StepTimer itself is tested in test_metrics.py), and an error
mid-run lets the checkpoint save in flight finish.

Reference: the calls the loop makes, recorded by a StepTimer subclass and a wrapped
`evaluate` that measures its own wall time; one in-process run of a tiny model."""

import time

import pytest

from jaxmoe.config import load_config
from jaxmoe.train import loop
from jaxmoe.train.metrics import StepTimer

OVERRIDES = ["model.vocab_size=320", "model.embed_dim=32", "model.num_layers=1",
             "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
             "model.expert_mlp_dim=32", "train.batch_size=8", "data.seq_len=16",
             "data.num_documents=400", "train.steps=6", "train.log_every=1",
             "train.eval_every=3", "train.eval_batches=1", "train.sample_tokens=3",
             "data.add_bos=false"]
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

    def timed_evaluate(*args, **kwargs):
        t = time.perf_counter()
        out = evaluate(*args, **kwargs)
        eval_seconds.append(time.perf_counter() - t)
        return out

    def generate(graphdef, state, prompt, max_new_tokens, eos_id=None, rows=1):
        calls.append(("generate", prompt, max_new_tokens, eos_id))
        return GENERATED

    evaluate = loop.evaluate
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "StepTimer", Recorder)
    mp.setattr(loop, "evaluate", timed_evaluate)
    mp.setattr(loop, "greedy_generate", generate)
    try:
        summary = loop.train(load_config(None, OVERRIDES), tmp_path_factory.mktemp("run"),
                             progress=False, sample=True)
    finally:
        mp.undo()
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
    """The timer restarts right after step 1 (the compiling step); step 1's log row has no
    step time, and every later lap covers exactly the steps since the previous one."""
    calls, _, summary = timed_run
    assert [c for c in calls if c[0] == "restart"] == [("restart", 0), ("restart", 1)]
    laps = [c for c in calls if c[0] == "lap"]
    assert [c[1] for c in laps] == [1, 2, 3, 4, 5, 6]
    assert laps[0][2] is None and all(c[2] > 0 for c in laps[1:])
    assert calls.index(("restart", 1)) < calls.index(laps[0])
    assert [r["step"] for r in summary["train"]] == [1, 2, 3, 4, 5, 6]


def test_each_evaluation_is_paused_out(timed_run):
    """One pause per evaluation (steps 3 and 6), each at least as long as the evaluation
    itself measured around `evaluate` (the pause also covers writing its metrics row)."""
    calls, eval_seconds, summary = timed_run
    pauses = [c[1] for c in calls if c[0] == "pause"]
    assert len(eval_seconds) == 2 and len(pauses) == 2
    assert all(p >= e for p, e in zip(pauses, eval_seconds))
    assert [r["step"] for r in summary["eval"]] == [3, 6]


def test_an_error_lets_the_save_in_flight_finish(tmp_path, monkeypatch):
    """An error mid-run (here the evaluation at step 3 raises) closes the checkpointer
    before it propagates, which waits for an async save still in flight (step 2's, if it
    has not finished by then; on this tiny model it often has): step 2 is complete on disk
    and no half-written step is left. Reference: the steps on disk, the calls made."""
    from jaxmoe.checkpoint import manager as ckpt
    from jaxmoe.checkpoint.run import RunCheckpointer

    closed = []

    class Recorder(RunCheckpointer):
        def close(self):
            closed.append(self.manager.is_saving_in_progress())
            super().close()

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(loop, "RunCheckpointer", Recorder)
    monkeypatch.setattr(loop, "evaluate", failing_evaluate)
    cfg = load_config(None, OVERRIDES + ["train.checkpoint_every=2"])
    with pytest.raises(RuntimeError, match="disk gone"):
        loop.train(cfg, tmp_path, progress=False, sample=False)
    assert len(closed) == 1
    assert ckpt.make_manager(ckpt.checkpoint_dir(tmp_path), keep_last=2).all_steps() == [2]
    assert ckpt.incomplete_checkpoints(ckpt.checkpoint_dir(tmp_path)) == []

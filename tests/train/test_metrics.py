"""metrics.jsonl on resume: rows after the resumed step and a torn last line are dropped, the file
rewritten atomically."""

from __future__ import annotations

import json

import pytest

from jaxmoe.train.metrics import MetricsWriter, read_metrics


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 8):
        w.write(step, "train", {"loss": 10.0 - step})
    w.write(5, "eval", {"loss": 1.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "split": "tr')  # killed mid-write
    w = MetricsWriter(tmp_path, tensorboard=False)
    assert w.resume_at(4) == 5  # steps 5, 6, 7, the eval at 5, and the torn line
    w.write(5, "train", {"loss": 0.5})
    w.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"),
                                                       (3, "train"), (4, "train"),
                                                       (5, "train")]
    assert rows[-1]["loss"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_resume_that_fails_to_rewrite_leaves_the_file(tmp_path, monkeypatch):
    """The rewrite is atomic: when the final rename fails (or a write before it), the log
    is byte-identical to what it was and no temporary file is left."""
    from jaxmoe import staging

    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 5):
        w.write(step, "train", {"loss": 10.0 - step})
    w.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def refuse(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(staging.os, "replace", refuse)
    w = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(OSError, match="No space"):
        w.resume_at(2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_with_nothing_to_drop_leaves_the_file(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, "train", {"loss": 1.0})
    w.close()
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    w = MetricsWriter(tmp_path, tensorboard=False)  # the restarted run
    assert w.resume_at(1) == 0
    w.close()
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before


def _tensorboard_events(directory):
    """Every Event proto in the TFRecord files of `directory`."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def test_resume_purges_tensorboard_steps_after_the_checkpoint(tmp_path):
    """TensorBoard hides events at or after a SessionLog START's step that were written
    before it; the resumed writer must emit one at checkpoint + 1."""
    w = MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write(step, "train", {"loss": 10.0 - step})
    w.close()
    w = MetricsWriter(tmp_path)
    w.resume_at(3)
    w.write(4, "train", {"loss": 0.5})
    w.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [4]
    scalars = [(e.step, e.summary.value[0].simple_value) for e in events
               if e.HasField("summary") and e.summary.value]
    assert sorted(scalars) == sorted([(s, 10.0 - s) for s in range(1, 6)] + [(4, 0.5)])


def test_resume_after_a_write_is_refused(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, "train", {"loss": 1.0})
    try:
        w.resume_at(0)
    except RuntimeError as e:
        assert "before the first write" in str(e)
    else:
        raise AssertionError("resume_at after a write must fail, not drop the row")
    w.close()
    assert len(read_metrics(tmp_path)) == 1


def test_resume_after_opening_tensorboard_is_refused(tmp_path):
    """The purge step is given when the TensorBoard writer opens: a resume_at after
    open_tensorboard would drop rows from metrics.jsonl but leave their events shown."""
    w = MetricsWriter(tmp_path)
    w.open_tensorboard()
    with pytest.raises(RuntimeError, match="before the first write and open_tensorboard"):
        w.resume_at(0)
    w.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_step_timer_leaves_out_compilation_and_eval():
    """A fake clock: every step takes 1 s, the first (compiling) step 30 s, an eval 100 s.
    Reference: 1 s per step for every logged interval."""
    from jaxmoe.train.metrics import StepTimer

    now = [0.0]
    timer = StepTimer(step=10, clock=lambda: now[0])
    now[0] += 30  # step 11 compiles
    timer.restart(11)
    assert timer.lap(11) is None  # logged right after it: no step has been timed yet
    laps = []
    for step in range(12, 31):
        now[0] += 1
        if step % 5 == 0:
            laps.append((step, timer.lap(step)))
        if step % 7 == 0:  # an eval, not on a log step: 100 s that are not step time
            now[0] += 100
            timer.pause(100)
    assert laps == [(15, 1.0), (20, 1.0), (25, 1.0), (30, 1.0)]

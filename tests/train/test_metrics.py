"""metrics.jsonl on resume: rows after the resumed step and a torn last line are dropped."""

from __future__ import annotations

import json

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
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_resume_with_nothing_to_drop_leaves_the_file(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, "train", {"loss": 1.0})
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    assert w.resume_at(1) == 0
    w.close()
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before

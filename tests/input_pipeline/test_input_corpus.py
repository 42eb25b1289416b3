"""The embedded synthetic corpus: deterministic, mixed lengths, learnable structure."""

from __future__ import annotations

import collections
import math

from input_pipeline import corpus


def test_deterministic_and_seeded() -> None:
    assert corpus.document(0, 17) == corpus.document(0, 17)
    assert corpus.document(0, 17) != corpus.document(1, 17)
    assert corpus.SyntheticSource(0, 10, 20)[3] == ("synthetic:13", corpus.document(0, 13))


def test_lengths_and_tasks() -> None:
    docs = [corpus.document(0, i) for i in range(400)]
    lengths = [len(d.encode()) for d in docs]
    assert min(lengths) >= corpus.MIN_DOC_BYTES and max(lengths) <= corpus.MAX_DOC_BYTES
    assert max(lengths) - min(lengths) > 300  # mixed lengths: packing matters
    text = "\n".join(docs)
    for marker in (" -> ", "+", "=", "rev ", "sort ", " ? ", " ."):
        assert marker in text, marker
    for line in text.splitlines():  # arithmetic lines are correct
        if line[:1].isdigit() and "=" in line and " " not in line:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), line


def test_split_bounds() -> None:
    assert corpus.split_bounds(100, 0.05, "train") == (0, 95)
    assert corpus.split_bounds(100, 0.05, "eval") == (95, 100)
    assert corpus.split_bounds(3, 0.01, "eval") == (2, 3)  # at least one held-out document


def _cross_entropy(train: list[bytes], held_out: list[bytes], order: int) -> float:
    """Held-out nats/byte of an add-0.01 smoothed `order`-gram byte model fit on `train`."""
    ctx, joint = collections.Counter(), collections.Counter()
    pad = b"\x01" * order
    for d in train:
        d = pad + d + b"\x02"
        for i in range(order, len(d)):
            joint[d[i - order:i + 1]] += 1
            ctx[d[i - order:i]] += 1
    total = count = 0
    for d in held_out:
        d = pad + d + b"\x02"
        for i in range(order, len(d)):
            p = (joint[d[i - order:i + 1]] + 0.01) / (ctx[d[i - order:i]] + 0.01 * 259)
            total -= math.log(p)
            count += 1
    return total / count


def test_structure_is_learnable_on_held_out_documents() -> None:
    # A 3-gram byte model fit on 1500 documents is already > 1.2 nats/byte below the
    # unigram entropy on held-out documents; a small transformer should do better still.
    train = [corpus.document(0, i).encode() for i in range(1500)]
    held_out = [corpus.document(0, i).encode() for i in range(10_000, 10_150)]
    unigram = _cross_entropy(train, held_out, 0)
    assert 3.0 < unigram < 3.6
    assert _cross_entropy(train, held_out, 3) < unigram - 1.2

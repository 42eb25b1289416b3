"""The evaluation step, run in micro-batches like training (`train.grad_accum_steps`), the
held-out loss `evaluate` takes over several batches, and the held-out batches themselves
(`_eval_batches`: padding once the split runs out; an error when it has no tokens).

Reference: a float64 NumPy cross-entropy over the logits of one full-batch forward pass,
summed over non-pad targets (over all batches, then divided by all their tokens); tolerance
rtol 1e-5 (float32 compute, summation order)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import input_pipeline
from jaxmoe.config import ConfigError, load_config
from jaxmoe.train.loop import _eval_batches, build_trainer, evaluate
from jaxmoe.train.step import forward, make_eval_step
from tests.train.test_step import OVERRIDES, _setup, make_batch


def _reference(graphdef, state, batch):
    logits = np.asarray(forward(graphdef, state.params, state.rest, batch).logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["segment_ids"] > 0
    return float(((logz - target) * mask).sum()), int(mask.sum())


def test_eval_in_micro_batches_equals_full_batch_cross_entropy():
    _, _, state, graphdef = _setup()
    batch = make_batch(seed=3)
    ce_ref, tokens_ref = _reference(graphdef, state, batch)
    for micro in (1, 4):
        out = jax.jit(make_eval_step(graphdef, micro))(state, batch)
        assert int(out["tokens"]) == tokens_ref
        np.testing.assert_allclose(float(out["ce_sum"]), ce_ref, rtol=1e-5)


def test_trainer_evaluates_in_the_configured_micro_batches():
    """The jitted eval step of a grad_accum_steps=4 trainer runs 4 forward passes of 2 rows:
    its program scans over micro-batches whose logits are [2, 16, vocab]."""
    from jaxmoe.config import load_config
    from jaxmoe.train.loop import build_trainer
    from tests.train.test_step import OVERRIDES

    cfg = load_config(None, OVERRIDES + ["train.grad_accum_steps=4", "mesh.data=1"])
    trainer = build_trainer(cfg, jax.devices()[:1])
    with trainer.context():
        state = jax.eval_shape(trainer.init)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch().items()}
        hlo = trainer.eval_step.lower(state, batch).as_text()
    assert "tensor<2x16x64xf32>" in hlo and "tensor<8x16x64xf32>" not in hlo


# ----------------------------------------------------------------------------- evaluate

EVAL_DOCS = 30  # a held-out split of 2 synthetic documents: 547 tokens, 5 batches of 8 x 16


@pytest.fixture(scope="module")
def evaluator():
    """(trainer, state, jitted forward logits): the test_step model with the byte
    tokenizer's 259-token vocabulary, on one device. Every batch of this module is 8 x 16, so
    each program compiles once per module."""
    cfg = load_config(None, [o for o in OVERRIDES if not o.startswith("model.vocab_size=")]
                      + ["model.vocab_size=259", "mesh.data=1", "train.eval_batches=7",
                         f"data.num_documents={EVAL_DOCS}"])
    trainer = build_trainer(cfg, jax.devices()[:1])
    with trainer.context():
        state = trainer.init()
    logits = jax.jit(lambda s, b: forward(trainer.graphdef, s.params, s.rest, b).logits)
    return trainer, state, logits


def _reference_mean(evaluator, batches):
    """float64 sum of the cross-entropy over every non-pad target / their number."""
    trainer, state, logits_fn = evaluator
    ce, tokens = 0.0, 0
    for b in batches:
        with trainer.context():
            logits = np.asarray(logits_fn(state, b), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        mask = b["segment_ids"] > 0
        ce += float(((logz - target) * mask).sum())
        tokens += int(mask.sum())
    return ce / tokens


def _cut(batch, lengths):
    """`batch` with row r kept up to `lengths[r]` tokens, the rest padding (zeros)."""
    keep = np.arange(batch["inputs"].shape[1]) < np.asarray(lengths)[:, None]
    return {k: np.where(keep, v, 0).astype(v.dtype) for k, v in batch.items()}


def test_evaluate_weighs_every_token_alike(evaluator):
    """Three batches of 113, 20 and 0 tokens: the result is the cross-entropy summed over all
    of them / 133 (a mean of per-batch means would weigh the 20 tokens like the 113).
    Reference: `_reference_mean` (float64, from the forward logits); rtol 1e-5."""
    full = make_batch(seed=3)
    few = _cut(make_batch(seed=4), [5, 3, 0, 0, 4, 8, 0, 0])
    empty = {k: np.zeros_like(v) for k, v in full.items()}
    batches = [full, few, empty]
    assert [int((b["segment_ids"] > 0).sum()) for b in batches] == [113, 20, 0]
    got = evaluate(evaluator[0], evaluator[1], batches)
    np.testing.assert_allclose(got, _reference_mean(evaluator, batches), rtol=1e-5)
    # The two means differ by far more than the tolerance, so the test tells them apart.
    means = [_reference_mean(evaluator, [b]) for b in batches[:2]]
    assert abs(np.mean(means) - got) > 1e-3 * got


def test_eval_batches_pad_a_short_split(evaluator):
    """train.eval_batches=7 over a split of 5 batches: the 5 batches the pipeline reads
    (exactly), then 2 all-padding batches that change nothing. Reference for the loss:
    `_reference_mean` over the pipeline's own batches (float64); rtol 1e-5. Tokens: the
    byte tokenizer gives each document `1 + len(text)` input/target pairs (BOS, EOS)."""
    trainer, state, _ = evaluator
    cfg = trainer.cfg
    it = input_pipeline.make_dataset(cfg.data, split="eval", batch_size=8, seed=0,
                                     num_epochs=1)
    read = list(it)
    start, stop = input_pipeline.corpus.split_bounds(EVAL_DOCS, cfg.data.eval_fraction, "eval")
    tokens = sum(1 + len(input_pipeline.corpus.document(cfg.data.seed, i))
                 for i in range(start, stop))
    assert len(read) == 5 and sum(int(b["segment_ids"].astype(bool).sum()) for b in read) \
        == tokens

    batches = _eval_batches(cfg, 8)
    assert len(batches) == cfg.train.eval_batches == 7
    for got, want in zip(batches, read):
        for k in input_pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for extra in batches[len(read):]:
        assert sorted(extra) == sorted(input_pipeline.BATCH_KEYS)
        for k, v in extra.items():
            assert (v.shape, v.dtype) == ((8, cfg.data.seq_len), np.int32), k
            assert not v.any(), f"{k}: a batch past the split's end holds data"
    np.testing.assert_allclose(evaluate(trainer, state, batches),
                               _reference_mean(evaluator, read), rtol=1e-5)


def test_eval_split_without_tokens_is_refused(evaluator, tmp_path):
    """The held-out record (the last of 2, eval_fraction 0.05) is blank: a bad record,
    skipped, so the split gives no token at all."""
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"text": "a fine training record"}) + "\n"
                    + json.dumps({"text": "   "}) + "\n")
    cfg = evaluator[0].cfg
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source="jsonl", paths=(str(data),)))
    with pytest.raises(ConfigError) as e:
        _eval_batches(cfg, 8)
    assert str(e.value) == ("data.eval_fraction=0.05: the held-out split gave no tokens (1 "
                            "held-out records were bad: empty_text 1); expected a larger "
                            "fraction or corpus")
    # Held-out files instead: they are named, not the fraction (which plays no part)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_paths=(str(blank),)))
    with pytest.raises(ConfigError) as e:
        _eval_batches(cfg, 8)
    assert str(e.value) == (f"data.eval_paths={[str(blank)]}: the held-out files gave no "
                            "tokens (1 held-out records were bad: empty_text 1); expected "
                            "documents in them")


def test_held_out_records_without_the_text_field_name_the_field(evaluator, tmp_path):
    """A misspelt data.text_field on a small corpus: the held-out split (read first) was
    all bad and the error asked for a larger data.eval_fraction, which cannot help (a large
    corpus reached the bad-fraction check, which names the field)."""
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} of a small corpus"}) + "\n"
                            for i in range(40)))
    cfg = evaluator[0].cfg
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source="jsonl", paths=(str(data),), text_field="txt"))
    with pytest.raises(ConfigError) as e:
        _eval_batches(cfg, 8)
    assert str(e.value) == ("data.text_field='txt': the held-out split gave no tokens (2 "
                            "held-out records were bad: missing_field 2); expected records "
                            "that data.source reads with that field (check data.source and "
                            "data.text_field; or, if only a few records are held out, a "
                            "larger data.eval_fraction)")

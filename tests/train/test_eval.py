"""The evaluation step, run in micro-batches like training (`train.grad_accum_steps`).

Reference: a float64 NumPy cross-entropy over the logits of one full-batch forward pass,
summed over non-pad targets; tolerance rtol 1e-5 (float32 compute, summation order)."""

import jax
import numpy as np

import jaxmoe  # noqa: F401
from jaxmoe.train.step import forward, make_eval_step
from tests.train.test_step import _setup, make_batch


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

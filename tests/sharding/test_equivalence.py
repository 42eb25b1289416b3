"""Three training steps of the tiny model give the same losses and parameters on every
mesh layout as on one device (float32 compute).

Tolerance: losses 1e-5 relative; parameters 1e-4 absolute. The layouts differ only in the
order of float32 sums (losses agree to ~1e-7), but Adam divides each update by its running
RMS, so an element whose gradient is ~0 turns that noise into a visible fraction of a step:
1e-4 is 3% of one step at lr 3e-3 (measured worst: 3.5e-5). Sending tokens to the wrong
experts moves the losses by ~3e-2 and the parameters by ~1e-2.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmoe.train.loop import build_trainer
from tests.sharding._helpers import batches, tiny_config

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4

MESHES = {
    "dp8": ["mesh.data=8"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
    "dp2_tp4": ["mesh.data=2", "mesh.tensor=4"],
    "dp2_ep4": ["mesh.data=2", "mesh.expert=4"],
    "fsdp2_tp2_ep2": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"],
}


def run(overrides: list[str], devices) -> tuple[list[float], dict]:
    cfg = tiny_config(*overrides)
    trainer = build_trainer(cfg, devices)
    with trainer.context():
        state = trainer.init()
        losses = []
        for b in batches(cfg, cfg.train.steps):
            state, metrics = trainer.train_step(state, trainer.put_batch(b))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference():
    return run(["mesh.data=1"], jax.devices()[:1])


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_one_device(name, reference):
    assert jax.device_count() == 8, "tests/conftest.py must set 8 simulated devices"
    ref_losses, ref_params = reference
    losses, params = run(MESHES[name], jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert ref_losses[-1] < ref_losses[0]  # the steps did train
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         params, ref_params)
    worst = max(jax.tree.leaves(diffs))
    assert worst < PARAM_ATOL, f"{name}: max parameter difference {worst:.3g}"

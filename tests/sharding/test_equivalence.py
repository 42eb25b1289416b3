"""Three training steps of the tiny model give the same losses and parameters on every
mesh layout as on one device (float32 compute).

Tolerance: losses 1e-5 relative, parameters 5e-6 absolute (measured: 2e-7 and 4e-7; the
layouts differ only in the order of float32 sums). Adam's eps is raised to 1e-3 here so that
an update is a smooth function of its gradient: with eps=1e-8 an element whose gradient
cancels to ~0 turns summation-order noise into a visible fraction of lr (1e-4 measured),
which would hide real differences. Sending tokens to the wrong experts moves the losses by
~3e-2 and the parameters by ~1e-2.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmoe.train.loop import build_trainer
from tests.sharding._helpers import batches, tiny_config

LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-6
SMOOTH_ADAM = ["train.optimizer.eps=1e-3"]

MESHES = {
    "dp8": ["mesh.data=8"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
    "dp2_tp4": ["mesh.data=2", "mesh.tensor=4"],
    "dp2_ep4": ["mesh.data=2", "mesh.expert=4"],
    "fsdp2_tp2_ep2": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"],
    # The expert axis (size 1) is not among the batch axes: refused by name ("expert axes
    # ('expert',) must also shard 'batch'") although nothing is expert-parallel.
    "dp8_batch_over_data": ["mesh.data=8", "mesh.rules={batch: [data]}"],
}


def run(overrides: list[str], devices) -> tuple[list[float], dict]:
    cfg = tiny_config(*overrides, *SMOOTH_ADAM)
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


# The modules tiny_moe.yaml leaves out (a dense first layer, a gated shared expert, MLA
# attention), on the mesh that splits every axis (one model: each compile costs ~20 s).
EVERY_MODULE = {
    "mla_dense_shared": ["model.num_layers=3", "model.first_k_dense=1", "model.mlp_dim=96",
                         "model.num_shared_experts=1", "model.shared_expert_gate=true",
                         "model.attention=mla", "model.q_lora_rank=48", "model.kv_lora_rank=32",
                         "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
                         "model.v_head_dim=16"],
}


@pytest.mark.parametrize("name", list(EVERY_MODULE))
def test_every_module_matches_one_device_on_a_split_mesh(name):
    """Reference: the same model on one device (tolerances as above)."""
    ref_losses, ref_params = run(EVERY_MODULE[name] + ["mesh.data=1"], jax.devices()[:1])
    losses, params = run(EVERY_MODULE[name] + MESHES["fsdp2_tp2_ep2"], jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert ref_losses[-1] < ref_losses[0]
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         params, ref_params)
    worst = max(jax.tree.leaves(diffs))
    assert worst < PARAM_ATOL, f"{name}: max parameter difference {worst:.3g}"

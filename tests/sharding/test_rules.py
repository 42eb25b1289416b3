"""Logical-axis rules: the partition specs the defaults and `mesh.rules` overrides give.

Reference: the specs written out by hand from the rule table in sharding/rules.py.
"""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from sharding.rules import DEFAULT_RULES, logical_to_spec, make_rules

ACTIVATION = ("batch", "length", "embed")
WEIGHT = ("embed", "mlp")
EXPERT_WEIGHT = ("expert", "embed", "mlp")


def test_defaults():
    rules = make_rules()
    assert rules == DEFAULT_RULES
    assert logical_to_spec(ACTIVATION, rules) == P(("data", "fsdp", "expert"), None, None)
    assert logical_to_spec(WEIGHT, rules) == P(("fsdp", "expert"), "tensor")
    assert logical_to_spec(EXPERT_WEIGHT, rules) == P("expert", "fsdp", "tensor")


@pytest.mark.parametrize("overrides, activation, weight", [
    # An embed override must not take the batch's mesh axes in the residual stream.
    ({"embed": ["fsdp", "data"]}, P(("data", "fsdp", "expert"), None, None),
     P(("fsdp", "data"), "tensor")),
    ({"embed": "fsdp"}, P(("data", "fsdp", "expert"), None, None), P("fsdp", "tensor")),
    ({"embed": None}, P(("data", "fsdp", "expert"), None, None), P(None, "tensor")),
    # A batch that leaves fsdp/expert free lets the activation's embed take them.
    ({"batch": ["data"]}, P("data", None, ("fsdp", "expert")), P(("fsdp", "expert"), "tensor")),
    ({"mlp": None}, P(("data", "fsdp", "expert"), None, None), P(("fsdp", "expert"), None)),
])
def test_override_keeps_the_default_precedence(overrides, activation, weight):
    rules = make_rules(overrides)
    assert logical_to_spec(ACTIVATION, rules) == activation
    assert logical_to_spec(WEIGHT, rules) == weight
    # One rule per overridden name, where the first default rule of that name was.
    names = [n for n, _ in rules]
    for name in overrides:
        assert names.count(name) == 1
        assert names.index(name) == [n for n, _ in DEFAULT_RULES].index(name)


def test_bad_mesh_axis_is_one_line():
    with pytest.raises(ValueError, match=r"mesh.rules.embed=\['fsdpx'\]: expected mesh axes "
                                         r"among data, fsdp, expert, tensor or null"):
        make_rules({"embed": ["fsdpx"]})
    with pytest.raises(ValueError, match=r"^mesh.rules.embed=\['fsdp', 'fsdp'\]: expected each "
                                         r"mesh axis once$"):  # was a DuplicateSpecError
        make_rules({"embed": ["fsdp", "fsdp"]})


@pytest.mark.parametrize("override, message", [
    # tensor on embed: weights whose mlp/heads took tensor lost fsdp too (even at tensor=1)
    ("mesh.rules={embed: [fsdp, tensor]}",
     "mesh.rules.embed=['fsdp', 'tensor']: leaves the embed dimension of "
     "moe.units.block0.ffn.w_down ['layers', 'expert', 'mlp', 'embed'] (1.0 MB) unsplit: its "
     "mlp dimension already uses tensor (a rule applies only where all its mesh axes are "
     "free, earlier rules first); expected axes the other dimensions leave free, e.g. "
     "embed: ['fsdp']"),
    # every weight with a head_dim dimension has an embed one, which takes fsdp first: the
    # override applies nowhere
    ("mesh.rules={head_dim: fsdp}",
     "mesh.rules.head_dim='fsdp': leaves the head_dim dimension of moe.units.block0.attn.k "
     "['layers', 'embed', 'kv_heads', 'head_dim'] (0.1 MB) unsplit: its embed dimension "
     "already uses fsdp (a rule applies only where all its mesh axes are free, earlier rules "
     "first); expected axes the other dimensions leave free, or embed on other axes"),
])
@pytest.mark.parametrize("fsdp", [8, 2])
def test_an_override_that_leaves_weights_unsplit_is_refused(override, message, fsdp):
    """Reference: the message in full (the largest such weight, named by hand); the rule the
    check states: a weight left replicated over free mesh axes of product >= 2 is refused,
    so for `embed: [fsdp, tensor]` fsdp=2 (free product exactly 2) is refused like fsdp=8
    (`head_dim: fsdp` leaves no axis free: refused as applying nowhere, either way)."""
    import jax

    from jaxmoe.train.optimizer import make_optimizer
    from jaxmoe.train.state import init_state
    from sharding import MeshError, check_overrides, make_mesh, make_rules
    from tests.sharding._helpers import tiny_config

    cfg = tiny_config(f"mesh.data={8 // fsdp}", f"mesh.fsdp={fsdp}", override)
    abstract = jax.eval_shape(lambda: init_state(cfg.model, make_optimizer(
        cfg.train.optimizer, cfg.train.steps), 0))
    mesh = make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "expert": 1, "tensor": 1})
    with pytest.raises(MeshError) as e:
        check_overrides(abstract.params, mesh, make_rules(cfg.mesh.rules), cfg.mesh.rules,
                        MeshError)
    assert str(e.value) == message
    check_overrides(abstract.params, mesh, make_rules({"embed": ["fsdp"]}), {"embed": ["fsdp"]})
    # Not refused: an override that loses nothing (fsdp of size 1, tensor taken elsewhere),
    # and one that some weights take (their layers dimension gets fsdp).
    tp8 = make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 8})
    ok = {"embed": ["fsdp", "tensor"]}
    check_overrides(abstract.params, tp8, make_rules(ok), ok, MeshError)
    check_overrides(abstract.params, mesh, make_rules({"layers": "fsdp"}), {"layers": "fsdp"},
                    MeshError)

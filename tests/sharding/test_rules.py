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

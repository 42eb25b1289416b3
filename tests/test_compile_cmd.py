"""`jaxmoe compile`'s expert-parallel degree follows the logical-axis rules (`mesh.rules`)."""

import pytest

import sharding
from jaxmoe.compile_cmd import expert_parallel_degree

SHAPE = {"data": 2, "fsdp": 3, "expert": 4, "tensor": 5}


@pytest.mark.parametrize("overrides, degree", [
    (None, 4),                                   # experts over the `expert` mesh axis
    ({"expert": "tensor"}, 5),                   # moved to another mesh axis
    ({"expert": ["fsdp", "expert"]}, 12),        # over two mesh axes
    ({"expert": None}, 1),                       # replicated: no expert parallelism
])
def test_expert_parallel_degree(overrides, degree):
    assert expert_parallel_degree(SHAPE, sharding.make_rules(overrides)) == degree

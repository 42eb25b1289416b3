"""Logical axis names of the model's parameters (what `sharding/rules.py` maps to mesh axes).

References: the rules' own table of known names, the dimension sizes (every width distinct,
so a size says what a dimension is), and a grep of jaxmoe/model/ for mesh axis names.
"""

import dataclasses
import re
from pathlib import Path

import pytest
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import MoETransformer
from tests.model.test_decoder import COUNT_CASES, TINY


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_every_variable_carries_logical_axis_names(case):
    """Every parameter and buffer of the model names each of its dimensions with a logical
    axis that `sharding/rules.py` maps (the one place mesh axes are named), None only for a
    size-1 dimension; a variable with no names, or one name too few, would silently be
    replicated on every device."""
    from sharding.rules import DEFAULT_RULES, variable_axes

    known = {name for name, _ in DEFAULT_RULES}
    cfg = dataclasses.replace(TINY, **COUNT_CASES[case])
    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    variables = list(nnx.to_flat_state(nnx.state(model)))
    assert len(variables) >= 10
    for path, v in variables:
        axes = variable_axes(v)
        assert axes is not None and len(axes) == len(v.shape), (path, axes, v.shape)
        # None (kept whole) only for a dimension of size 1 (the shared expert's gate column)
        assert set(axes) - {None} <= known, (path, axes)
        assert all(a is not None or n == 1 for a, n in zip(axes, v.shape)), (path, axes)


# Every dimension a distinct size, so its size says what it is (the reference below).
_AXES_GQA = ModelConfig(vocab_size=97, embed_dim=40, num_heads=4, num_kv_heads=2, head_dim=6,
                        mlp_dim=56, num_experts=3, num_experts_per_tok=2, expert_mlp_dim=24,
                        num_shared_experts=1, shared_expert_mlp_dim=28, shared_expert_gate=True,
                        qkv_bias=True, qk_norm=True, num_layers=7, first_k_dense=3, moe_every=2,
                        compute_dtype="float32")
_AXES_MLA = dataclasses.replace(_AXES_GQA, attention="mla", qkv_bias=False, qk_norm=False,
                                q_lora_rank=18, kv_lora_rank=11, qk_nope_head_dim=8,
                                qk_rope_head_dim=2, v_head_dim=14)
_SIZE_MEANS = {97: "vocab", 40: "embed", 4: "heads", 56: "mlp", 24: "mlp", 28: "mlp",
               3: "expert"}
_SIZE_MEANS_GQA = {**_SIZE_MEANS, 2: "kv_heads", 6: "head_dim"}
_SIZE_MEANS_MLA = {**_SIZE_MEANS, 18: "q_lora", 11: "kv_lora", 8: "head_dim", 2: "head_dim",
                   10: "head_dim", 14: "head_dim"}


@pytest.mark.parametrize("cfg, means", [(_AXES_GQA, _SIZE_MEANS_GQA),
                                        (_AXES_MLA, _SIZE_MEANS_MLA)], ids=["gqa", "mla"])
def test_each_dimension_is_named_for_what_it_is(cfg, means):
    """Reference: the dimension sizes. With every width distinct, each parameter dimension
    must carry the logical name its size stands for (vocab 97, embed 40, heads 4, kv heads
    2, head widths, MLP widths 56/24/28, 3 experts, MLA's latent ranks 18/11), the stacked
    layer axis `layers` first in a layer group, `norm` for a norm's scale (the per-head q/k
    norms scale a head_dim), None only for a size-1 dimension. A weight tagged (embed, mlp)
    instead of (mlp, embed) -- a row-parallel matmul sharded as a column-parallel one, with
    the same values -- fails here."""
    from sharding.rules import variable_axes

    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    variables = list(nnx.to_flat_state(nnx.state(model)))
    assert len(variables) > 30
    for path, v in variables:
        names = [str(p) for p in path]
        shape = list(v.shape)
        want = []
        if names[1:2] == ["units"]:  # a scanned layer group: [layers, ...]
            want.append("layers")
            shape = shape[1:]
        if names[-1] == "scale" and names[-2] not in ("q_norm", "k_norm"):
            want += ["norm"] * len(shape)
        else:
            want += [None if n == 1 else means[n] for n in shape]
        assert tuple(variable_axes(v)) == tuple(want), ("/".join(names), v.shape)


def test_model_code_names_no_mesh_axis():
    """Modules name logical axes only: no mesh, PartitionSpec or mesh-only axis name
    (`data`, `fsdp`, `tensor`) in jaxmoe/model/ (`expert` is also a logical name)."""
    root = Path(__file__).parents[2] / "jaxmoe" / "model"
    pattern = re.compile(r"PartitionSpec|NamedSharding|jax\.sharding|Mesh\(|"
                         r"[\"'](data|fsdp|tensor)[\"']")
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 10
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{f}:{i}: {line.strip()}"

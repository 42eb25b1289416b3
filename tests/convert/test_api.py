"""The logits API: packed segments behave like separate sequences; bad token ids and
overrides that would change the parameters are refused."""

import numpy as np
import pytest

from jaxmoe.config import ConfigError
from jaxmoe.convert import load_checkpoint
from jaxmoe.convert.api import segment_positions
from tests.convert.helpers import TOL, jaxmoe_config, random_params, tokens, write_export


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = jaxmoe_config("mixtral")
    path = write_export(cfg, random_params(cfg), tmp_path_factory.mktemp("api") / "ckpt")
    return path, load_checkpoint(path)


def test_packed_segments_equal_separate_sequences(saved):
    _, model = saved
    a, b = tokens(seed=5, batch=1, length=7)[0], tokens(seed=6, batch=1, length=5)[0]
    seg = np.array([[1] * 7 + [2] * 5])
    assert segment_positions(seg).tolist() == [list(range(7)) + list(range(5))]
    packed = model.logits(np.concatenate([a, b])[None], seg)[0]
    np.testing.assert_allclose(packed[:7], model.logits(a[None])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(packed[7:], model.logits(b[None])[0], atol=TOL, rtol=0)


def test_bad_inputs_and_overrides_are_refused(saved):
    path, model = saved
    with pytest.raises(ValueError, match=r"token ids in \[0, 64\]: expected ids in \[0, 64\)"):
        model.logits([[0, 64]])
    with pytest.raises(ValueError, match=r"expected \[batch, length\]"):
        model.logits([1, 2, 3])
    with pytest.raises(ValueError, match="tokens dtype float64: expected integer token ids"):
        model.logits([[1.7, 2.0]])  # was truncated to [[1, 2]] silently
    with pytest.raises(ValueError, match=r"token ids in \[5, 4294967301\]"):
        model.logits(np.asarray([[5, 2**32 + 5]], np.int64))  # not wrapped to 5 by int32
    with pytest.raises(ConfigError, match="model.num_experts: cannot be overridden"):
        load_checkpoint(path, overrides=["model.num_experts=8"])
    assert load_checkpoint(path, ["model.compute_dtype=bfloat16"]).config.model.compute_dtype \
        == "bfloat16"

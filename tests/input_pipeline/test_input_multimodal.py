"""Multimodal collation: fixed shapes, zero-filled absent modalities, presence masks."""

from __future__ import annotations

import numpy as np
import pytest

from input_pipeline.multimodal import (
    MultimodalSpec,
    collate_example,
    make_multimodal_dataset,
    present,
)
from input_pipeline.tokenizer import ByteTokenizer

SPEC = MultimodalSpec(text_len=8, image_shape=(2, 3, 1), max_frames=3, audio_len=5,
                      max_points=4, point_dim=3)
SHAPES = {"inputs": (8,), "targets": (8,), "segment_ids": (8,), "positions": (8,),
          "text_mask": (), "image": (2, 3, 1), "image_mask": (), "video": (3, 2, 3, 1),
          "video_valid": (3,), "video_mask": (), "audio": (5,), "audio_valid": (5,),
          "audio_mask": (), "points": (4, 3), "points_valid": (4,), "points_mask": ()}


def _rand(*shape):
    return np.random.default_rng(len(shape)).uniform(1, 2, shape).astype(np.float32)


def test_every_subset_has_the_same_shapes() -> None:
    full = {"text": "hello world", "image": _rand(2, 3, 1), "video": _rand(2, 2, 3, 1),
            "audio": _rand(7), "points": _rand(3, 3)}
    for mask in range(1, 32):
        example = {k: v for i, (k, v) in enumerate(full.items()) if mask >> i & 1}
        out = collate_example(example, SPEC, ByteTokenizer())
        assert {k: v.shape for k, v in out.items()} == SHAPES
        for m in ("text", "image", "video", "audio", "points"):
            assert bool(out[f"{m}_mask"]) == (m in example), m
        absent = [k for k in ("image", "video", "audio", "points") if k not in example]
        for k in absent:
            assert not out[k].any(), k  # zero-filled
        if "text" not in example:
            assert not out["segment_ids"].any() and not out["inputs"].any()


def test_partial_modalities_are_cropped_and_masked() -> None:
    out = collate_example({"video": _rand(5, 2, 3, 1), "audio": _rand(2), "points": _rand(6, 3),
                           "text": "a long text that is cut"}, SPEC, ByteTokenizer())
    assert out["video_valid"].tolist() == [True] * 3
    np.testing.assert_array_equal(out["video"], _rand(5, 2, 3, 1)[:3])
    assert out["audio_valid"].tolist() == [True, True, False, False, False]
    assert not out["audio"][2:].any()
    assert out["points_valid"].all()
    assert out["inputs"][0] == 1 and out["segment_ids"].all()  # BOS, text cut to 8 pairs
    np.testing.assert_array_equal(out["positions"], np.arange(8))


def test_batches_and_padding_rows() -> None:
    examples = [{"text": "hi"}, {"image": _rand(2, 3, 1)}, {"audio": _rand(3)}]
    it = make_multimodal_dataset(examples, SPEC, batch_size=2, seed=0, shuffle=False,
                                 num_epochs=1)
    b0, b1 = list(it)
    assert {k: v.shape[1:] for k, v in b0.items()} == SHAPES
    assert b0["text_mask"].tolist() == [True, False]
    assert b0["image_mask"].tolist() == [False, True]
    assert present(b0) == ("text", "image")
    assert b1["audio_mask"].tolist() == [True, False]  # the filler row has no modality
    assert present(b1) == ("audio",)
    assert b1["audio_valid"].sum() == 3


def test_modalities_not_in_spec_are_not_carried() -> None:
    spec = MultimodalSpec(modalities=("image",), image_shape=(2, 2, 1))
    it = make_multimodal_dataset([{"image": np.ones((2, 2, 1)), "text": "ignored"}], spec,
                                 batch_size=1, seed=0, num_epochs=1)
    assert set(next(it)) == {"image", "image_mask"}
    with pytest.raises(ValueError, match=r"^multimodal\.modalities=\('smell',\)"):
        MultimodalSpec(modalities=("smell",))


def test_sharding_over_processes() -> None:
    examples = [{"audio": np.full((1,), i, np.float32)} for i in range(10)]
    spec = MultimodalSpec(modalities=("audio",), audio_len=1)
    seen = [sorted(int(v) for b in make_multimodal_dataset(
        examples, spec, batch_size=1, seed=0, num_epochs=1, process_index=p, process_count=2)
        for v in b["audio"][:, 0]) for p in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and not set(seen[0]) & set(seen[1])

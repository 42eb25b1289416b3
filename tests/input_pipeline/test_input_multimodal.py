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
from input_pipeline.sources import BadRecord, BadRecordError
from input_pipeline.tokenizer import ByteTokenizer

SPEC = MultimodalSpec(text_len=8, image_shape=(2, 3, 1), max_frames=3, audio_len=5,
                      max_points=4, point_dim=3)
SHAPES = {"inputs": (8,), "targets": (8,), "segment_ids": (8,), "positions": (8,),
          "text_mask": (), "image": (2, 3, 1), "image_mask": (), "video": (3, 2, 3, 1),
          "video_valid": (3,), "video_mask": (), "audio": (5,), "audio_valid": (5,),
          "audio_mask": (), "points": (4, 3), "points_valid": (4,), "points_mask": ()}


def _rand(*shape):
    return np.random.default_rng(len(shape)).uniform(1, 2, shape).astype(np.float32)


def _fitted(x: np.ndarray, length: int) -> np.ndarray:
    """Reference for a present video/audio/points: the first `length` rows of x as float32,
    then zero rows up to `length` (x cropped or zero-padded along axis 0)."""
    pad = np.zeros((max(0, length - len(x)), *x.shape[1:]))
    return np.concatenate([x[:length].astype(np.float32), pad]).astype(np.float32)


def test_every_subset_has_the_same_shapes() -> None:
    """Present modalities keep their values exactly (no tolerance): the image as float32,
    video/audio/points as `_fitted` (here audio 7 -> 5 samples is cropped, video 2 -> 3
    frames and points 3 -> 4 rows are zero-padded), with validity masks over the kept rows."""
    full = {"text": "hello world", "image": _rand(2, 3, 1), "video": _rand(2, 2, 3, 1),
            "audio": _rand(7), "points": _rand(3, 3)}
    length = {"video": SPEC.max_frames, "audio": SPEC.audio_len, "points": SPEC.max_points}
    for mask in range(1, 32):
        example = {k: v for i, (k, v) in enumerate(full.items()) if mask >> i & 1}
        out = collate_example(example, SPEC, ByteTokenizer())
        assert {k: v.shape for k, v in out.items()} == SHAPES
        for m in ("text", "image", "video", "audio", "points"):
            assert bool(out[f"{m}_mask"]) == (m in example), m
        if "image" in example:
            assert out["image"].dtype == np.float32
            np.testing.assert_array_equal(out["image"], full["image"].astype(np.float32))
        for k in set(length) & set(example):
            assert out[k].dtype == np.float32, k
            np.testing.assert_array_equal(out[k], _fitted(full[k], length[k]), err_msg=k)
            n = min(len(full[k]), length[k])
            assert out[f"{k}_valid"].tolist() == [True] * n + [False] * (length[k] - n), k
        absent = [k for k in ("image", "video", "audio", "points") if k not in example]
        for k in absent:
            assert not out[k].any(), k  # zero-filled
        if "text" not in example:
            assert not out["segment_ids"].any() and not out["positions"].any()
            assert (out["inputs"] == 0).all() and (out["targets"] == 0).all()  # pad_id 0


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
    ids = [1, *ByteTokenizer().encode("a long text that is cut")]  # BOS + bytes (EOS cut off)
    np.testing.assert_array_equal(out["inputs"], ids[:8])
    np.testing.assert_array_equal(out["targets"], ids[1:9])  # inputs shifted by one


class _Pad7(ByteTokenizer):
    pad_id = 7


def test_text_targets_and_pad_id() -> None:
    tok = _Pad7()
    out = collate_example({"text": "hi"}, SPEC, tok)
    ids = [tok.bos_id, *tok.encode("hi"), tok.eos_id]  # 4 ids -> 3 (input, target) pairs
    np.testing.assert_array_equal(out["inputs"], ids[:-1] + [7] * 5)
    np.testing.assert_array_equal(out["targets"], ids[1:] + [7] * 5)
    assert out["segment_ids"].tolist() == [1] * 3 + [0] * 5
    assert out["positions"].tolist() == [0, 1, 2] + [0] * 5
    no_text = collate_example({"audio": _rand(2)}, SPEC, tok)  # text absent: all padding
    assert (no_text["inputs"] == 7).all() and (no_text["targets"] == 7).all()
    assert not no_text["segment_ids"].any() and not no_text["positions"].any()
    spec = MultimodalSpec(modalities=("text", "audio"), text_len=6, audio_len=2)
    b = next(make_multimodal_dataset([{"text": "hi"}, {"audio": np.ones(2)}, {"text": "yo"}],
                                     spec, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                     tokenizer=tok))
    assert b["text_mask"].tolist() == [True, False, True, False]
    assert (b["inputs"][1] == 7).all() and (b["targets"][1] == 7).all()  # no-text row
    assert (b["inputs"][3] == 7).all()  # filler row


BAD_EXAMPLES = {  # name -> (example, reason)
    "ragged points": ({"points": [[1, 2, 3], [1, 2]]}, "bad_shape"),
    "ragged audio": ({"audio": [[1.0], 2.0]}, "bad_shape"),
    "ragged video": ({"video": [np.zeros((2, 3, 1)), np.zeros((2, 2, 1))]}, "bad_shape"),
    "empty audio": ({"audio": np.zeros((0,))}, "bad_shape"),
    "empty points": ({"points": np.zeros((0, 3))}, "bad_shape"),
    "empty video": ({"video": np.zeros((0, 2, 3, 1))}, "bad_shape"),
    "empty audio list": ({"audio": [], "text": "hi"}, "bad_shape"),
    "lone surrogate": ({"text": "bad \ud800 x", "audio": np.ones(2)}, "not_utf8"),
    "NaN audio": ({"audio": [1.0, float("nan")]}, "not_finite"),
    "points past float32": ({"points": [[1e300, 0.0, 0.0]]}, "not_finite"),
}


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_bad_examples_are_skipped_and_counted(name: str) -> None:
    example, reason = BAD_EXAMPLES[name]
    with pytest.raises(BadRecord) as e:
        collate_example(example, SPEC, ByteTokenizer())
    assert e.value.reason == reason
    examples = [{"text": "one"}, example, {"text": "two"}]
    it = make_multimodal_dataset(examples, SPEC, batch_size=2, seed=0, shuffle=False,
                                 num_epochs=1)
    batches = list(it)
    assert len(batches) == 1 and batches[0]["text_mask"].tolist() == [True, True]
    assert it.stats().bad_records == {reason: 1} and it.stats().documents == 2
    strict = make_multimodal_dataset(examples, SPEC, batch_size=2, seed=0, shuffle=False,
                                     num_epochs=1, strict=True)
    with pytest.raises(BadRecordError, match=rf"^examples:1: bad record \({reason}"):
        list(strict)


def test_batches_and_padding_rows() -> None:
    examples = [{"text": "hi"}, {"image": _rand(2, 3, 1)}, {"audio": _rand(3)}]
    it = make_multimodal_dataset(examples, SPEC, batch_size=2, seed=0, shuffle=False,
                                 num_epochs=1)
    b0, b1 = list(it)
    assert {k: v.shape[1:] for k, v in b0.items()} == SHAPES
    assert b0["text_mask"].tolist() == [True, False]
    assert b0["image_mask"].tolist() == [False, True]
    assert present(b0) == ("text", "image")
    np.testing.assert_array_equal(b0["image"][1], _rand(2, 3, 1))  # exact, float32
    assert not b0["image"][0].any()  # the text-only row
    assert b1["audio_mask"].tolist() == [True, False]  # the filler row has no modality
    assert present(b1) == ("audio",)
    assert b1["audio_valid"].tolist() == [[True] * 3 + [False] * 2, [False] * 5]
    np.testing.assert_array_equal(b1["audio"], [[*_rand(3), 0, 0], [0] * 5])  # zero-padded
    assert b0["image"].dtype == b1["audio"].dtype == np.float32


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


def test_more_processes_than_examples_is_refused() -> None:
    """A process with no examples stopped at once, even with endless epochs (the others
    would wait for it); now it is one line, as for text data."""
    from input_pipeline import DataError

    examples = [{"text": "one"}, {"text": "two"}]
    with pytest.raises(DataError, match=r"^examples: 2 examples cannot be sharded over 3 "
                                        r"processes; expected at least one per process$"):
        make_multimodal_dataset(examples, SPEC, batch_size=1, seed=0, process_index=2,
                                process_count=3)

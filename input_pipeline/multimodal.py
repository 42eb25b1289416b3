"""Multimodal batches: examples with any subset of text, image, video, audio and point cloud.

An example is a dict with any of these keys (missing or None = absent):

    text    str                                   -> [BOS] + tokens + [EOS], cut to text_len + 1
    image   array [H, W, C]  == spec.image_shape  (any other shape is a bad record)
    video   array [T, H, W, C], frames of image_shape; T > max_frames keeps the first max_frames
    audio   array [S] (mono);  S > audio_len keeps the first audio_len samples
    points  array [N, point_dim];  N > max_points keeps the first max_points points

Ragged (non-rectangular) or non-numeric arrays and empty ones (T, S or N = 0) are bad records
(`bad_shape`), as are arrays holding NaN or inf in float32 (`not_finite`) and text that is
not valid Unicode (`not_utf8`: a lone surrogate).

Every example is collated to the same fixed shapes; absent modalities are zero-filled (text:
inputs/targets filled with `pad_id`) and `<modality>_mask[b]` is False, and partially filled ones
carry a validity mask. Modalities not in `spec.modalities` are not in the batch at all, and
`present(batch)` lists those with at least one example, so a train step can skip an encoder
whose inputs are all absent.

Batch (B = batch size; float arrays are float32, masks bool, token arrays int32):
    inputs, targets, segment_ids, positions  [B, text_len]             text_mask   [B]
    image                                    [B, H, W, C]              image_mask  [B]
    video                                    [B, F, H, W, C]           video_mask  [B]
                                             video_valid [B, F]
    audio                                    [B, audio_len]            audio_mask  [B]
                                             audio_valid [B, audio_len]
    points                                   [B, max_points, point_dim] points_mask [B]
                                             points_valid [B, max_points]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline.documents import DocumentIterDataset
from input_pipeline.pipeline import DataIterator, mark_absl_flags_parsed, stack_rows
from input_pipeline.sources import BadRecord, DataError, check_utf8
from input_pipeline.tokenizer import ByteTokenizer, Tokenizer, encode_document

MODALITIES = ("text", "image", "video", "audio", "points")


@dataclasses.dataclass(frozen=True)
class MultimodalSpec:
    """Fixed per-example shapes of the collated batch."""

    modalities: tuple[str, ...] = MODALITIES
    text_len: int = 64
    image_shape: tuple[int, int, int] = (32, 32, 3)  # [H, W, C]; video frames share it
    max_frames: int = 4
    audio_len: int = 4000
    max_points: int = 256
    point_dim: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"multimodal.modalities={self.modalities}: expected a non-empty "
                             f"subset of {MODALITIES}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"multimodal.image_shape={self.image_shape}: expected [H, W, C] > 0")
        for name in ("text_len", "max_frames", "audio_len", "max_points", "point_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"multimodal.{name}={getattr(self, name)}: expected >= 1")


def _array(example: dict, key: str, ndim: int) -> np.ndarray | None:
    """`example[key]` as float32 with `ndim` axes and a non-empty axis 0, or None if absent."""
    x = example.get(key)
    if x is None:
        return None
    try:
        x = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise BadRecord("bad_shape", f"{key} is not a rectangular array "
                                     f"({' '.join(str(e).split())[:80]})") from None
    if x.ndim != ndim or x.dtype.kind not in "biuf":
        raise BadRecord("bad_shape", f"{key} has shape {x.shape} ({x.dtype}), expected {ndim}-D")
    if x.shape[0] == 0:
        raise BadRecord("bad_shape", f"{key} has shape {x.shape}, expected at least one "
                                     "element along axis 0")
    with np.errstate(over="ignore", invalid="ignore"):  # too large: inf, refused below
        x = x.astype(np.float32)
    if not np.isfinite(x).all():  # NaN, inf, or too large for float32
        raise BadRecord("not_finite", f"{key} holds NaN or inf values (in float32)")
    return x


def _fit(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops/zero-pads axis 0 to `length`; returns (array, valid mask [length])."""
    n = min(len(x), length)
    out = np.zeros((length, *x.shape[1:]), np.float32)
    out[:n] = x[:n]
    valid = np.zeros((length,), bool)
    valid[:n] = True
    return out, valid


def collate_example(example: dict[str, Any], spec: MultimodalSpec,
                    tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """One example -> fixed-shape arrays (see the module docstring); raises `BadRecord`."""
    out: dict[str, np.ndarray] = {}
    present = False
    if "text" in spec.modalities:
        L = spec.text_len
        row = {k: np.full((L,), tokenizer.pad_id, np.int32) for k in ("inputs", "targets")}
        row["segment_ids"], row["positions"] = np.zeros((L,), np.int32), np.zeros((L,), np.int32)
        text = example.get("text")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise BadRecord("empty_text", f"text is {type(text).__name__} {text!r:.40}")
            ids = encode_document(tokenizer, check_utf8(text), True, True)[:L + 1]
            n = len(ids) - 1
            row["inputs"][:n], row["targets"][:n] = ids[:-1], ids[1:]
            row["segment_ids"][:n] = 1
            row["positions"][:n] = np.arange(n)
        out.update(row)
        out["text_mask"] = np.asarray(text is not None)
        present |= text is not None
    if "image" in spec.modalities:
        image = _array(example, "image", 3)
        if image is not None and image.shape != spec.image_shape:
            raise BadRecord("bad_shape", f"image has shape {image.shape}, "
                                         f"expected {spec.image_shape}")
        out["image"] = image if image is not None else np.zeros(spec.image_shape, np.float32)
        out["image_mask"] = np.asarray(image is not None)
        present |= image is not None
    if "video" in spec.modalities:
        video = _array(example, "video", 4)
        if video is not None and video.shape[1:] != spec.image_shape:
            raise BadRecord("bad_shape", f"video has shape {video.shape}, expected "
                                         f"[1..{spec.max_frames}, *{spec.image_shape}]")
        out["video"], out["video_valid"] = _fit(
            video if video is not None else np.zeros((0, *spec.image_shape)), spec.max_frames)
        out["video_mask"] = np.asarray(video is not None)
        present |= video is not None
    if "audio" in spec.modalities:
        audio = _array(example, "audio", 1)
        out["audio"], out["audio_valid"] = _fit(
            audio if audio is not None else np.zeros((0,)), spec.audio_len)
        out["audio_mask"] = np.asarray(audio is not None)
        present |= audio is not None
    if "points" in spec.modalities:
        points = _array(example, "points", 2)
        if points is not None and points.shape[1] != spec.point_dim:
            raise BadRecord("bad_shape", f"points have shape {points.shape}, "
                                         f"expected [N, {spec.point_dim}]")
        out["points"], out["points_valid"] = _fit(
            points if points is not None else np.zeros((0, spec.point_dim)), spec.max_points)
        out["points_mask"] = np.asarray(points is not None)
        present |= points is not None
    if not present:
        raise BadRecord("empty_example", f"none of {spec.modalities} present")
    return out


class _Collate(grain.transforms.Map):
    """`(location, example)` -> `{"example": arrays, "loc"}` or a bad-record marker."""

    def __init__(self, spec: MultimodalSpec, tokenizer: Tokenizer):
        self._spec, self._tokenizer = spec, tokenizer

    def map(self, record: tuple[str, dict]) -> dict[str, Any]:
        location, example = record
        try:
            if not isinstance(example, dict):
                raise BadRecord("bad_shape", f"example is a {type(example).__name__}, not a dict")
            return {"example": collate_example(example, self._spec, self._tokenizer),
                    "loc": location}
        except BadRecord as e:
            return {"bad": e.reason, "detail": str(e), "loc": location}


class _Located:
    """A random-access source of examples -> `(f"{name}:{index}", example)`."""

    def __init__(self, examples: Sequence[dict], name: str):
        self._examples, self._name = examples, name

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        return f"{self._name}:{int(i)}", self._examples[int(i)]


def make_multimodal_dataset(examples: Sequence[dict], spec: MultimodalSpec, *, batch_size: int,
                            seed: int, tokenizer: Tokenizer | None = None, shuffle: bool = True,
                            process_index: int = 0, process_count: int = 1,
                            num_epochs: int | None = None, strict: bool = False,
                            name: str = "examples", num_workers: int = 0,
                            max_bad_fraction: float | None = 0.1) -> DataIterator:
    """Batches of collated multimodal examples (keys and shapes in the module docstring).

    `examples` is any random-access sequence (a list, a grain data source); each process reads
    `examples[process_index::process_count]`. Bad examples are skipped and counted in
    `.stats().bad_records` (with `name:index` in the log), or raised when `strict`; more than
    `max_bad_fraction` of them (after 100) stops with a DataError, as `data.max_bad_fraction`
    does for text (None: never).
    """
    tokenizer = tokenizer or ByteTokenizer()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}: expected in [0, {process_count})")
    if len(examples) < process_count:  # a host without examples would stop at once
        raise DataError(f"{name}: {len(examples)} examples cannot be sharded over "
                        f"{process_count} processes; expected at least one per process")
    ds = grain.MapDataset.source(_Located(examples, name))[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Collate(spec, tokenizer)).to_iter_dataset(grain.ReadOptions(num_threads=0))
    ds = DocumentIterDataset(ds, chunk_len=None, strict=strict,
                             max_bad_fraction=max_bad_fraction,
                             check=f"the keys, shapes and values of {name} against the spec")
    ds = ds.batch(batch_size, batch_fn=functools.partial(
        stack_rows, batch_size=batch_size, pad_id=tokenizer.pad_id))
    if num_workers > 0:
        mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return DataIterator(ds.__iter__())


def present(batch: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Modalities carried by the batch with at least one example present (host-side check)."""
    return tuple(m for m in MODALITIES if f"{m}_mask" in batch and batch[f"{m}_mask"].any())

"""Bad records are skipped and counted with their location; `strict` raises instead."""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import pytest

from input_pipeline import BadRecordError, DataConfig, make_dataset
from input_pipeline.convert import write_arrayrecord
from input_pipeline.multimodal import MultimodalSpec, make_multimodal_dataset
from input_pipeline.sources import BadRecord, parse_text
from input_pipeline.tokenizer import train_tokenizer
from tests.input_pipeline._ip_helpers import all_batches, tmpfile, write_jsonl

GOOD = '{"text": "a good document"}\n'
BAD_LINES = {  # reason -> a JSONL line
    "invalid_json": b'{"text": "unterminated\n',
    "missing_field": b'{"body": "no text field"}\n',
    "not_utf8": b'{"text": "caf\xe9"}\n',
    "empty_text": b'{"text": "   "}\n',
}


def _jsonl_cfg(tmp_path, lines: list[bytes], **kw) -> DataConfig:
    path = tmpfile(tmp_path, "bad.jsonl")
    with open(path, "wb") as f:
        f.writelines(lines)
    ev = write_jsonl(tmpfile(tmp_path, "eval.jsonl"), ["held out"])
    return DataConfig(source="jsonl", paths=(path,), eval_paths=(ev,), seq_len=32,
                      packing=False, shuffle=False, **kw)


def _run(cfg: DataConfig):
    it = make_dataset(cfg, split="train", batch_size=2, seed=0, num_epochs=1)
    batches = list(it)
    return batches, it.stats()


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_kind_skipped_counted_and_logged(tmp_path, caplog, reason: str) -> None:
    cfg = _jsonl_cfg(tmp_path, [GOOD.encode(), BAD_LINES[reason], GOOD.encode()])
    with caplog.at_level(logging.WARNING, logger="input_pipeline"):
        batches, stats = _run(cfg)
    assert stats.bad_records == {reason: 1} and stats.documents == 2
    assert sum(int(b["segment_ids"][:, 0].sum()) for b in batches) == 2
    assert f"bad.jsonl:2: bad record ({reason}" in caplog.text  # file and 1-based line


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_strict_raises_with_location(tmp_path, reason: str) -> None:
    cfg = _jsonl_cfg(tmp_path, [GOOD.encode(), GOOD.encode(), BAD_LINES[reason]], strict=True)
    with pytest.raises(BadRecordError, match=rf"bad\.jsonl:3: bad record \({reason}"):
        _run(cfg)


@pytest.mark.parametrize("good_every", [None, 25])
def test_mostly_bad_records_stop_with_one_line(tmp_path, good_every) -> None:
    """A wrong data.text_field makes every record bad (or all but one in 25): the reader
    would loop over the files for ever without a batch. After MIN_BAD_TO_STOP bad records,
    more than max_bad_fraction (0.1) of the records read being bad stops it with one line
    counting them. Reference: the counts of the records written here."""
    from input_pipeline import DataError
    from input_pipeline.documents import MIN_BAD_TO_STOP

    lines = [BAD_LINES["missing_field"]] * 300
    if good_every:
        lines = [GOOD.encode() if i % good_every == 0 else line for i, line in enumerate(lines)]
    cfg = _jsonl_cfg(tmp_path, lines)
    it = make_dataset(cfg, split="train", batch_size=2, seed=0)  # repeats for ever
    with pytest.raises(DataError) as e:
        for _ in range(100):  # a few batches of the good records, then the error
            next(it)
    good = 0 if good_every is None else MIN_BAD_TO_STOP // (good_every - 1) + 1
    assert str(e.value).startswith(
        f"{MIN_BAD_TO_STOP} of the {MIN_BAD_TO_STOP + good} records read are bad "
        f"(missing_field {MIN_BAD_TO_STOP}; the last: ")
    assert "more than data.max_bad_fraction=0.1" in str(e.value) and "\n" not in str(e.value)


MAX_BATCHES = 5_000  # of 2 records: the mixture below stops well before


def _mixture_with_a_bad_source(tmp_path) -> DataConfig:
    """95% good records from source 0, 5% from source 1 whose every record lacks `text`
    (a misspelt text_field): 5% bad overall, under max_bad_fraction=0.1."""
    good = write_jsonl(tmpfile(tmp_path, "good.jsonl"), [f"document {i}" for i in range(500)])
    bad = tmpfile(tmp_path, "bad.jsonl")
    with open(bad, "wb") as f:
        f.writelines([BAD_LINES["missing_field"]] * 50)
    ev = write_jsonl(tmpfile(tmp_path, "eval.jsonl"), ["held out"])
    return DataConfig(source="mixture", seq_len=32, packing=False, sources=(
        {"source": "jsonl", "paths": [good], "eval_paths": [ev], "weight": 0.95},
        {"source": "jsonl", "paths": [bad], "eval_paths": [ev], "weight": 0.05}))


def test_a_mostly_bad_mixture_source_stops_though_the_stream_is_mostly_good(tmp_path) -> None:
    """max_bad_fraction is judged per source: the low-weight source whose records are all
    bad stops the run once it gave MIN_BAD_TO_STOP of them (judged over the whole stream,
    5% bad, it was skipped for ever). Reference: the counts of the records written here."""
    from input_pipeline import DataError
    from input_pipeline.documents import MIN_BAD_TO_STOP

    it = make_dataset(_mixture_with_a_bad_source(tmp_path), split="train", batch_size=2, seed=0)
    batches = 0
    with pytest.raises(DataError) as e:
        for batches in range(MAX_BATCHES):  # ~2,000 records hold 100 bad ones
            next(it)
    message = str(e.value)
    assert message.startswith(
        f"data.sources[1]: {MIN_BAD_TO_STOP} of the {MIN_BAD_TO_STOP} records read from it are "
        f"bad (missing_field {MIN_BAD_TO_STOP}; the last: ")
    assert ("check data.sources[1].source and data.sources[1].text_field" in message
            and "\n" not in message)
    stats = it.stats()  # the good source went on: ~19 good records per bad one
    assert stats.bad_records == {"missing_field": MIN_BAD_TO_STOP}
    assert stats.documents > 10 * MIN_BAD_TO_STOP and batches * 2 <= stats.documents


def test_per_source_bad_counts_survive_a_restore(tmp_path) -> None:
    """The per-source counts are iterator state: a restored iterator stops at the same
    batch as one that never stopped (counts restarted from zero would run longer)."""
    from input_pipeline import DataError

    cfg = _mixture_with_a_bad_source(tmp_path)

    def batches_until_error(it) -> int:
        with pytest.raises(DataError):
            for n in range(MAX_BATCHES):
                next(it)
        return n

    total = batches_until_error(make_dataset(cfg, split="train", batch_size=2, seed=0))
    it = make_dataset(cfg, split="train", batch_size=2, seed=0)
    for _ in range(total // 2):
        next(it)
    state = it.get_state()
    fresh = make_dataset(cfg, split="train", batch_size=2, seed=0)
    fresh.set_state(state)
    assert total // 2 + batches_until_error(fresh) == total
    # A state saved before per-source counts existed restores; those counts start afresh,
    # so it runs longer before stopping.
    old = make_dataset(cfg, split="train", batch_size=2, seed=0)
    old.set_state(_without_source_counts(state))
    assert total // 2 + batches_until_error(old) > total


def _without_source_counts(state):
    from input_pipeline.documents import STATE_KEY

    if isinstance(state, dict):
        return {k: ({n: c for n, c in v.items() if n != "sources"} if k == STATE_KEY
                    else _without_source_counts(v)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_without_source_counts(v) for v in state)
    return state


def test_blank_lines_are_not_records(tmp_path, caplog) -> None:
    """A blank (or whitespace-only) line between JSONL records is no record, good or bad
    (it was an invalid_json bad record: a file spaced by blank lines read as half bad and
    now stops at max_bad_fraction); locations keep the file's line numbers."""
    lines = [GOOD.encode(), b"\n", b"  \n", GOOD.encode(), b"\n"] * 200
    with caplog.at_level(logging.WARNING, logger="input_pipeline"):
        batches, stats = _run(_jsonl_cfg(tmp_path, lines + [BAD_LINES["missing_field"]]))
    assert stats.bad_records == {"missing_field": 1} and stats.documents == 400
    assert "bad.jsonl:1001: bad record (missing_field" in caplog.text


def test_a_few_bad_records_do_not_stop(tmp_path) -> None:
    """5% bad records (150 of 3000, past MIN_BAD_TO_STOP) are skipped and counted."""
    lines = [BAD_LINES["missing_field"] if i % 20 == 0 else GOOD.encode() for i in range(3000)]
    batches, stats = _run(_jsonl_cfg(tmp_path, lines))
    assert stats.bad_records == {"missing_field": 150} and stats.documents == 2850


def test_all_kinds_counted_together(tmp_path) -> None:
    cfg = _jsonl_cfg(tmp_path, [GOOD.encode(), *BAD_LINES.values(), *BAD_LINES.values()])
    _, stats = _run(cfg)
    assert stats.bad_records == {r: 2 for r in BAD_LINES} and stats.documents == 1


def test_parquet_bad_rows(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmpfile(tmp_path, "good.parquet")
    pq.write_table(pa.table({"text": ["one", None, "", "two", "three"]}), good, row_group_size=2)
    wrong = tmpfile(tmp_path, "wrong.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), wrong)
    cfg = DataConfig(source="parquet", paths=(good, wrong), eval_fraction=0.01, shuffle=False,
                     seq_len=16, packing=False)
    it = make_dataset(cfg, split="train", batch_size=4, seed=0, num_epochs=1)
    batches = list(it)
    # 7 records, the last one held out for eval: 3 good, None + "" + 1 missing column bad.
    assert it.stats().bad_records == {"missing_field": 2, "empty_text": 1}
    assert sum(int(b["segment_ids"][:, 0].sum()) for b in batches) == 3
    with pytest.raises(BadRecordError, match=r"good\.parquet:1: bad record \(missing_field"):
        all_batches(dataclasses.replace(cfg, strict=True), split="train",
                    batch_size=4, seed=0, num_epochs=1)


def test_arrayrecord_non_utf8(tmp_path) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmpfile(tmp_path, "x.arrayrecord")
    w = ArrayRecordWriter(path, "group_size:1")
    for rec in (b"fine", b"\xff\xfe", b"also fine", b"last"):
        w.write(rec)
    w.close()
    cfg = DataConfig(source="arrayrecord", paths=(path,), eval_fraction=0.2, shuffle=False,
                     seq_len=16, packing=False)
    it = make_dataset(cfg, split="train", batch_size=4, seed=0, num_epochs=1)
    list(it)
    assert it.stats().bad_records == {"not_utf8": 1} and it.stats().documents == 2
    with pytest.raises(BadRecordError, match=r"x\.arrayrecord:1: bad record \(not_utf8"):
        all_batches(dataclasses.replace(cfg, strict=True), split="train",
                    batch_size=4, seed=0, num_epochs=1)
    assert write_arrayrecord(["a", "b", "c"], tmpfile(tmp_path, "y"), 2) == [2, 1]


def test_wrong_image_shape(caplog) -> None:
    spec = MultimodalSpec(modalities=("text", "image"), image_shape=(4, 4, 3))
    examples = [{"image": np.zeros((4, 4, 3))}, {"image": np.zeros((4, 5, 3))},
                {"text": "ok", "image": np.zeros((4, 4))}, {"text": "fine"}]
    with caplog.at_level(logging.WARNING, logger="input_pipeline"):
        it = make_multimodal_dataset(examples, spec, batch_size=4, seed=0, shuffle=False,
                                     num_epochs=1)
        batch = next(it)
    assert it.stats().bad_records == {"bad_shape": 2}
    assert batch["image_mask"].tolist() == [True, False, False, False]
    assert "examples:1: bad record (bad_shape" in caplog.text
    strict = make_multimodal_dataset(examples, spec, batch_size=4, seed=0, shuffle=False,
                                     num_epochs=1, strict=True)
    with pytest.raises(BadRecordError, match=r"examples:1: bad record \(bad_shape"):
        next(strict)


SURROGATE = b'{"text": "bad \\ud800 x"}\n'  # valid JSON, but no UTF-8 encoding exists


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_lone_surrogate_is_not_utf8(tmp_path, tokenizer: str) -> None:
    tok = "byte"
    if tokenizer == "bpe":
        tok = tmpfile(tmp_path, "tok.json")
        train_tokenizer([f"doc {i} text" for i in range(50)], tok, 280)
    cfg = _jsonl_cfg(tmp_path, [GOOD.encode(), SURROGATE, GOOD.encode()], tokenizer=tok)
    batches, stats = _run(cfg)
    assert stats.bad_records == {"not_utf8": 1} and stats.documents == 2
    assert sum(int(b["segment_ids"][:, 0].sum()) for b in batches) == 2
    strict = dataclasses.replace(cfg, strict=True)
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:2: bad record \(not_utf8"):
        _run(strict)


def test_parse_text_lone_surrogate() -> None:
    for kind, payload in [("jsonl", SURROGATE), ("parquet", "x\udfff"), ("synthetic", "\ud800")]:
        with pytest.raises(BadRecord) as e:
            parse_text(kind, "text", payload)
        assert e.value.reason == "not_utf8", kind
    assert parse_text("jsonl", "text", '{"text": "ok \\u00e9"}'.encode()) == "ok \u00e9"


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmpfile(tmp_path, "x.parquet")
    pq.write_table(pa.table({"text": ["one", "two", "three"]}), path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    cfg = DataConfig(source="parquet", paths=(path,), eval_fraction=0.5, seq_len=16)
    with pytest.raises(ValueError, match=r"^data\.source='parquet' \('.*x\.parquet'\): expected "
                                         r"the pyarrow package to be installed") as e:
        make_dataset(cfg, split="train", batch_size=2, seed=0)
    assert "\n" not in str(e.value)


def test_multimodal_examples_that_are_all_bad_stop(tmp_path) -> None:
    """Examples without a text field are all bad: with repeating epochs the iterator looped
    for ever; it stops at max_bad_fraction like the text pipeline."""
    from input_pipeline import DataError

    it = make_multimodal_dataset([{"caption": "x"}] * 10, MultimodalSpec(), batch_size=2,
                                 seed=0)
    with pytest.raises(DataError, match=r"^100 of the 100 records read are bad \(") as e:
        next(it)
    # the hint names what to check in the examples (it said data.source and data.text_field)
    assert "(check the keys, shapes and values of examples against the spec)" in str(e.value)


def test_a_one_token_document_is_empty_text(tmp_path) -> None:
    """A document needs at least 2 token ids: the model is trained on (input, next-token
    target) pairs, `ids[:-1]` -> `ids[1:]`, and one id gives none. Without BOS/EOS the text
    "x" is 1 byte token: it is counted as an `empty_text` bad record and no zero-length
    piece is emitted. Reference: the documents and batches of the same stream without it."""
    from input_pipeline.documents import collect_counts
    from input_pipeline.pipeline import document_dataset

    kw = {"add_bos": False, "add_eos": False}
    cfg = _jsonl_cfg(tmp_path, [GOOD.encode(), b'{"text": "x"}\n', GOOD.encode()], **kw)
    (tmp_path / "ref").mkdir()
    ref = _jsonl_cfg(tmp_path / "ref", [GOOD.encode(), GOOD.encode()], **kw)
    it = document_dataset(cfg, split="train", seed=0, num_epochs=1).__iter__()
    docs = list(it)
    ref_docs = list(document_dataset(ref, split="train", seed=0, num_epochs=1))
    assert all(len(d["inputs"]) > 0 for d in docs)
    assert [d["inputs"].tolist() for d in docs] == [d["inputs"].tolist() for d in ref_docs]
    assert collect_counts(it.get_state()) == (2, {"empty_text": 1})
    (batches, stats), (ref_batches, _) = _run(cfg), _run(ref)
    assert stats.bad_records == {"empty_text": 1} and stats.documents == 2
    assert len(batches) == len(ref_batches)
    for b, r in zip(batches, ref_batches):
        assert all(np.array_equal(b[k], r[k]) for k in r)

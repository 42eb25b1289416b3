"""The tokenizer files of an export (jaxmoe/convert/tokenizer_files.py).

Reference: jaxmoe's own tokenizer (`input_pipeline.tokenizer`) on the same texts: the ids
`AutoTokenizer.from_pretrained` gives (default `add_special_tokens=True`) must be exactly
those of a training document without its EOS (a prompt), and decoding must give the text
back. Texts cover multi-byte UTF-8, emoji, runs of whitespace and the special tokens' own
strings (text in a document, not special ids)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from input_pipeline.config import DataConfig
from input_pipeline.tokenizer import encode_document, make_tokenizer, train_tokenizer
from jaxmoe.convert.tokenizer_files import tokenizer_files, write_tokenizer_files

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = ["12+7=19\nsort 3 1 2 -> 1 2 3", "héllo wörld ✓ 🙂", " leading  spaces\tand tabs ",
         "a <eos> b <bos> c <pad>", ""]


def _exported(data: DataConfig, tmp_path):
    files, why = tokenizer_files(data)
    assert why is None and sorted(files) == ["tokenizer.json", "tokenizer_config.json"]
    write_tokenizer_files(files, tmp_path)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


def _check_ids(data: DataConfig, hf_tok) -> None:
    ours = make_tokenizer(data)
    for text in TEXTS:
        want = encode_document(ours, text, data.add_bos, False).tolist()
        got = hf_tok(text)["input_ids"]
        assert got == want, (text, got, want)
        assert hf_tok.decode(got, skip_special_tokens=True) == text
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (
        ours.pad_id, ours.bos_id, ours.eos_id)


@pytest.mark.parametrize("add_bos", [True, False])
def test_byte_tokenizer(add_bos, tmp_path):
    data = DataConfig(add_bos=add_bos)
    hf_tok = _exported(data, tmp_path)
    _check_ids(data, hf_tok)
    assert len(hf_tok) == 259
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == data.seq_len


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_tokenizer((f"line {i}: sort {i % 7} {i % 5} -> héllo" for i in range(300)),
                    str(path), 300, kind="bpe")
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_trained_tokenizer_json(bpe_file, add_bos, tmp_path):
    data = DataConfig(tokenizer=str(bpe_file), add_bos=add_bos)
    _check_ids(data, _exported(data, tmp_path))


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_tokenizers_own_post_processor_gives_way(bpe_file, add_bos, tmp_path):
    """A tokenizer.json whose post-processor adds BOS and EOS: training ignores it (it
    encodes without special tokens), so the export's tokenizer does too."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_file(str(bpe_file))
    tok.post_processor = TemplateProcessing(single="<bos> $A <eos>",
                                            special_tokens=[("<bos>", 1), ("<eos>", 2)])
    path = tmp_path / "own.json"
    tok.save(str(path))
    assert tok.encode("héllo").ids[-1] == 2  # the file's own tokenizer adds EOS
    (tmp_path / "out").mkdir()
    data = DataConfig(tokenizer=str(path), add_bos=add_bos)
    _check_ids(data, _exported(data, tmp_path / "out"))


def test_no_files_and_the_reason(tmp_path):
    """A SentencePiece model (transformers' converters may tokenize it otherwise) and a
    tokenizer file that is not on this machine give no files and one line saying why."""
    files, why = tokenizer_files(DataConfig(tokenizer=str(tmp_path / "spm.model")))
    assert files == {} and why.startswith(f"data.tokenizer='{tmp_path}/spm.model' is a "
                                          "SentencePiece model: no tokenizer files")
    gone = dataclasses.replace(DataConfig(), tokenizer=str(tmp_path / "gone.json"))
    files, why = tokenizer_files(gone)
    assert files == {} and why == (f"no tokenizer files: data.tokenizer='{tmp_path}/gone.json'"
                                   ": expected 'byte' or an existing tokenizer file")
    assert "\n" not in why

"""The tokenizer of an export, as Hugging Face files: `AutoTokenizer.from_pretrained(out)`
then gives the ids the model was trained on.

* `data.tokenizer=byte`: a byte-level BPE `tokenizer.json` with no merges, so every UTF-8
  byte b is one token of id b + 3 and pad/bos/eos are ids 0/1/2, as `ByteTokenizer`;
* a `tokenizer.json` (Hugging Face tokenizers): the file itself;
* a SentencePiece `.model`: none (transformers' converters may tokenize it differently).

Both come with a `tokenizer_config.json` naming the special tokens and setting
`split_special_tokens` (jaxmoe reads "<eos>" in a document as text, not as EOS). Training
encodes text without a tokenizer's own special tokens and puts BOS before documents when
`data.add_bos`: the exported post-processor does the same (it replaces any the file had),
so the default `add_special_tokens=True` gives what a prompt looked like in training; EOS
is not added, as for a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from input_pipeline.config import DataConfig
from input_pipeline.tokenizer import ByteTokenizer, make_tokenizer


def tokenizer_files(data: DataConfig) -> tuple[dict[str, str], str | None]:
    """({file name: text} to write beside config.json, or {}; why there are none, or None:
    a SentencePiece model, no tokenizers package, or a tokenizer file that is not on this
    machine or cannot be read)."""
    if data.tokenizer.endswith(".model"):
        return {}, (f"data.tokenizer={data.tokenizer!r} is a SentencePiece model: no "
                    "tokenizer files are written (copy it as tokenizer.model with a "
                    "tokenizer_config.json that suits your transformers version)")
    try:
        import tokenizers
    except ImportError:
        return {}, ("no tokenizer files: the tokenizers package is not installed "
                    "(pip install -e '.[data]')")
    try:
        tok = make_tokenizer(data)  # checks the file and the special tokens
    except ValueError as e:
        return {}, f"no tokenizer files: {e}"
    if data.tokenizer == "byte":
        hf = _byte_tokenizer(tokenizers, data)
    else:
        hf = tokenizers.Tokenizer.from_file(data.tokenizer)
    # Training encodes without the tokenizer's own special tokens and puts BOS itself: the
    # exported post-processor does the same, in place of any the file had.
    hf.post_processor = None
    if data.add_bos:
        from tokenizers.processors import TemplateProcessing

        hf.post_processor = TemplateProcessing(
            single=f"{data.bos_token} $A", pair=f"{data.bos_token} $A {data.bos_token} $B:1",
            special_tokens=[(data.bos_token, tok.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": data.bos_token,
              "eos_token": data.eos_token, "pad_token": data.pad_token,
              "split_special_tokens": True, "model_max_length": data.seq_len,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": hf.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}, None


def _byte_tokenizer(tokenizers, data: DataConfig):
    """A `tokenizers.Tokenizer` equal to `ByteTokenizer`: byte-level BPE without merges."""
    from tokenizers import decoders, models, pre_tokenizers

    chars = _byte_chars()
    vocab = {data.pad_token: ByteTokenizer.pad_id, data.bos_token: ByteTokenizer.bos_id,
             data.eos_token: ByteTokenizer.eos_id}
    vocab.update({chars[b]: b + ByteTokenizer.OFFSET for b in range(256)})
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([data.pad_token, data.bos_token, data.eos_token])
    return hf


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE writes for each byte (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer_files(files: dict[str, str], folder: Path) -> None:
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")

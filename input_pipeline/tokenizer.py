"""Tokenizers: byte-level (the default, no files) and trained ones loaded from a local file.

All tokenizers share one small interface (`Tokenizer`): `encode(str) -> list[int]` (no special
tokens), `decode(list[int]) -> str` (special tokens dropped), `vocab_size`, `pad_id`, `bos_id`,
`eos_id`. `encode_document` adds BOS/EOS as the config asks and returns int32 NumPy ids.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from input_pipeline.config import DataConfig
from input_pipeline.convert import fsync_path


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: pad=0, bos=1, eos=2, byte b -> b + 3; vocab_size 259."""

    OFFSET = 3
    vocab_size = 256 + OFFSET
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode_np(self, text: str) -> np.ndarray:
        """Ids of `text` as int32, shape `[num_bytes]`."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32) + self.OFFSET

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def decode(self, ids: list[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _special_id(lookup, name: str, token: str, path: str) -> int:
    token_id = lookup(token)
    if token_id is None:
        raise ValueError(f"data.{name}={token!r}: expected a token in the vocabulary of {path}")
    return int(token_id)


def _hf_tokenizers(path: str):
    """The `tokenizers` module; a one-line ValueError naming `path` when it is not installed."""
    try:
        import tokenizers  # optional dependency: pip install tokenizers
    except ImportError as e:
        raise ValueError(f"data.tokenizer={path!r}: expected the tokenizers package to be "
                         "installed (pip install -e '.[data]', or pip install tokenizers)") from e
    return tokenizers


def _unreadable(path: str, kind: str, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ValueError(f"data.tokenizer={path!r}: cannot be read ({first}); expected {kind}")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. written by tools/train_tokenizer.py)."""

    def __init__(self, path: str, pad_token: str, bos_token: str, eos_token: str):
        self.path = path
        tokenizers = _hf_tokenizers(path)  # not installed: its own one-line error
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise _unreadable(path, "a Hugging Face tokenizer.json", e) from e
        self._tok.encode_special_tokens = True  # "<eos>" in a document is text, not EOS
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        look = self._tok.token_to_id
        self.pad_id = _special_id(look, "pad_token", pad_token, path)
        self.bos_id = _special_id(look, "bos_token", bos_token, path)
        self.eos_id = _special_id(look, "eos_token", eos_token, path)

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self) -> dict:  # picklable for grain worker processes
        return {**self.__dict__, "_tok": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["_tok"] = _hf_tokenizers(state["path"]).Tokenizer.from_str(state["_tok"])
        state["_tok"].encode_special_tokens = True  # not part of the serialised tokenizer
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (needs `pip install sentencepiece`)."""

    def __init__(self, path: str, pad_token: str, bos_token: str, eos_token: str):
        self.path = path
        self._load()
        look = self._piece_id
        self.pad_id = _special_id(look, "pad_token", pad_token, path)
        self.bos_id = _special_id(look, "bos_token", bos_token, path)
        self.eos_id = _special_id(look, "eos_token", eos_token, path)

    def _load(self) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ValueError(f"data.tokenizer={self.path!r}: expected the sentencepiece "
                             "package to be installed (pip install sentencepiece)") from e
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise _unreadable(self.path, "a SentencePiece .model file", e) from e
        self.vocab_size = int(self._sp.get_piece_size())

    def _piece_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=8)
def _load(path: str, pad: str, bos: str, eos: str) -> Tokenizer:
    if path == "byte":
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise ValueError(f"data.tokenizer={path!r}: expected 'byte' or an existing tokenizer file")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, pad, bos, eos)
    if path.endswith(".json"):
        return HFTokenizer(path, pad, bos, eos)
    raise ValueError(f"data.tokenizer={path!r}: expected 'byte', a tokenizer.json (Hugging Face "
                     "tokenizers) or a .model (SentencePiece) file")


def make_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names, with its special ids from `cfg.*_token`."""
    return _load(cfg.tokenizer, cfg.pad_token, cfg.bos_token, cfg.eos_token)


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ValueError if the tokenizer emits ids >= the model's embedding size."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"data.tokenizer={getattr(tokenizer, 'path', 'byte')!r}: its vocab_size "
            f"{tokenizer.vocab_size} does not fit the model's vocab_size {model_vocab_size}")


def encode_document(tokenizer: Tokenizer, text: str, add_bos: bool, add_eos: bool) -> np.ndarray:
    """`[BOS] + encode(text) + [EOS]` as int32, shape `[num_tokens]`."""
    ids = tokenizer.encode_np(text) if hasattr(tokenizer, "encode_np") else np.asarray(
        tokenizer.encode(text), dtype=np.int32)
    parts = ([np.array([tokenizer.bos_id], np.int32)] if add_bos else []) + [ids.astype(np.int32)]
    if add_eos:
        parts.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(parts)


class _Counted:
    """Iterates `texts`, counting them and keeping the error they raised (SentencePiece turns
    it into a RuntimeError), to tell an empty or failing corpus from a library failure."""

    def __init__(self, texts: Iterable[str]):
        self._texts, self.n, self.error = texts, 0, None

    def __iter__(self):
        try:
            for t in self._texts:
                self.n += 1
                yield t
        except Exception as e:
            self.error = e
            raise


# The smallest vocabulary each trainer can honour: byte-level BPE keeps its 256-byte alphabet
# and the 3 special tokens (pad, bos, eos); SentencePiece adds unk and needs one more piece.
MIN_VOCAB = {"bpe": 259, "sentencepiece": 261}


def _check_train_args(out_path: str, vocab_size: int, kind: str,
                      specials: dict[str, str]) -> None:
    """One-line ValueErrors for arguments the tokenizer libraries would reject obscurely."""
    if kind not in ("bpe", "sentencepiece"):
        raise ValueError(f"kind={kind!r}: expected 'bpe' or 'sentencepiece'")
    minimum = MIN_VOCAB[kind]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r}: expected an integer >= {minimum} for "
                         f"kind={kind!r}")
    for name, token in specials.items():
        if not isinstance(token, str) or not token or token != token.strip():
            raise ValueError(f"{name}={token!r}: expected a non-empty token without "
                             "surrounding whitespace")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"special tokens {tuple(specials.values())}: expected pad, bos and eos "
                         "to be distinct")
    if kind == "sentencepiece" and not out_path.endswith(".model"):
        raise ValueError(f"out_path={out_path!r}: expected a path ending in .model")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"out_path={out_path!r}: expected an existing directory {out_dir!r}")
    if os.path.isdir(out_path):
        raise ValueError(f"out_path={out_path!r}: expected a file path, not a directory")


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int, *,
                    kind: str = "bpe", pad_token: str = "<pad>", bos_token: str = "<bos>",
                    eos_token: str = "<eos>") -> None:
    """Trains a tokenizer on `texts` and writes it to `out_path`; pad/bos/eos get ids 0/1/2.

    kind "bpe": byte-level BPE (Hugging Face `tokenizers`, writes tokenizer.json; round trips
    any text). kind "sentencepiece": a unigram SentencePiece model with byte fallback and
    identity normalisation (writes `<out_path>`, which must end in `.model`, and the `.vocab`
    next to it). Files are written under a temporary name in the same directory and renamed
    into place, so `out_path` is never a partly written file. Bad arguments and an empty
    `texts` raise a one-line ValueError.
    """
    _check_train_args(out_path, vocab_size, kind, {
        "pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token})
    package = "tokenizers" if kind == "bpe" else "sentencepiece"
    try:
        lib = importlib.import_module(package)
    except ImportError as e:
        raise ValueError(f"kind={kind!r}: expected the {package} package to be installed "
                         f"(pip install {package})") from e
    counted = _Counted(texts)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.tmp-", dir=out_dir)
    try:
        if kind == "bpe":
            from tokenizers import decoders, models, pre_tokenizers, trainers

            tok = lib.Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, special_tokens=[pad_token, bos_token, eos_token],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            tok.train_from_iterator(iter(counted), trainer=trainer)
            if not counted.n:
                raise ValueError(f"texts: expected at least one text to train {out_path!r} on")
            tok.save(os.path.join(tmp_dir, "tokenizer.json"))
            fsync_path(os.path.join(tmp_dir, "tokenizer.json"))  # complete before it is named
            os.replace(os.path.join(tmp_dir, "tokenizer.json"), out_path)
        else:
            prefix = os.path.join(tmp_dir, "spm")
            try:
                lib.SentencePieceTrainer.train(
                    sentence_iterator=iter(counted), model_prefix=prefix,
                    vocab_size=vocab_size, model_type="unigram", byte_fallback=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    split_by_whitespace=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                    pad_piece=pad_token, bos_piece=bos_token, eos_piece=eos_token,
                    hard_vocab_limit=False, minloglevel=2)
            except RuntimeError as e:
                if counted.error is not None:  # the texts' own error, not the library's
                    raise counted.error from None
                if not counted.n:
                    raise ValueError(f"texts: expected at least one text to train {out_path!r} "
                                     "on") from None
                detail = " ".join(str(e).split())
                raise ValueError(f"kind='sentencepiece', vocab_size={vocab_size}: training "
                                 f"failed ({detail})") from None
            out_prefix = out_path[: -len(".model")]
            if os.path.exists(prefix + ".vocab"):
                os.replace(prefix + ".vocab", out_prefix + ".vocab")
            fsync_path(prefix + ".model")
            os.replace(prefix + ".model", out_path)  # last: a .model is always complete
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

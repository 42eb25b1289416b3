"""What a data stream is read from, as a small JSON fingerprint saved with its position.

A resumed run compares the checkpoint's fingerprint with today's (`jaxmoe/checkpoint/run.py`):
the tokenizer by its file's contents, not its path (a tokenizer retrained into the same file
is noticed, the same file moved is not a change), and the split's files by their (absolute
path, size) list in reading order (source by source, each pattern's matches sorted): a
`data.paths` glob that matches more files since, or a file that grew, is noticed; so is a
relative pattern resumed from another working directory. The data files' contents are not
read: a file rewritten to the same size is not noticed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from input_pipeline.config import DataConfig
from input_pipeline.sources import expand_paths, split_field


def tokenizer_digest(tokenizer: str) -> str:
    """`byte`, or `sha256:<hex>` of the tokenizer file's bytes."""
    if tokenizer == "byte":
        return "byte"
    h = hashlib.sha256()
    with open(tokenizer, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def split_files(cfg: DataConfig, split: str) -> list[str]:
    """The files a split's records come from, source by source (none for synthetic ones):
    `eval_paths` for a held-out split that has them, else `paths`."""
    files = []
    for where, src in cfg.named_sources():
        if src.source == "synthetic":
            continue
        field = split_field(src, split)
        files += expand_paths(getattr(src, field), f"{where}.{field}")
    return files


def fingerprint(cfg: DataConfig, split: str) -> dict[str, Any]:
    """`{"tokenizer": digest, "files": count, "files_sha256": hex}` of a split's inputs."""
    h = hashlib.sha256()
    files = split_files(cfg, split)
    for path in files:
        h.update(f"{os.path.abspath(path)}\t{os.path.getsize(path)}\n".encode())
    return {"tokenizer": tokenizer_digest(cfg.tokenizer), "files": len(files),
            "files_sha256": h.hexdigest()}


def changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """What differs between two fingerprints, as `{"tokenizer" | "files": one-line text}`."""
    out = {}
    if stored.get("tokenizer") != current.get("tokenizer"):
        out["tokenizer"] = (f"its contents differ from the run's ({_short(stored.get('tokenizer'))}"
                            f" -> {_short(current.get('tokenizer'))})")
    if stored.get("files_sha256") != current.get("files_sha256"):
        n, m = stored.get("files"), current.get("files")
        out["files"] = (f"the data files are not the run's ({n} -> {m} files"
                        + (", other names or sizes" if n == m else "") + ")")
    return out


def _short(digest: Any) -> str:
    return str(digest)[:19]  # "sha256:" and 12 hex digits

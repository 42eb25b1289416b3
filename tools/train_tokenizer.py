"""Trains a tokenizer on a local corpus; point `data.tokenizer` at the file it writes.

    python tools/train_tokenizer.py --format jsonl --vocab_size 4096 \
        --out /data/tok/tokenizer.json '/data/raw/*.jsonl'
    python tools/train_tokenizer.py --format synthetic --num_documents 20000 \
        --kind sentencepiece --vocab_size 512 --out /tmp/tok/spm.model

Special tokens <pad>, <bos>, <eos> get ids 0, 1, 2 (the DataConfig defaults).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.sources import iter_texts
from input_pipeline.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", help="input files or glob patterns")
    p.add_argument("--format", choices=("jsonl", "parquet", "arrayrecord", "synthetic"),
                   required=True)
    p.add_argument("--field", default="text", help="JSON field / Parquet column of the text")
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer.json (bpe) or NAME.model (spm)")
    p.add_argument("--max_documents", type=int, default=None, help="train on the first N docs")
    p.add_argument("--num_documents", type=int, default=20000, help="synthetic corpus size")
    args = p.parse_args(argv)
    if args.format != "synthetic" and not args.inputs:
        p.error("inputs are required unless --format synthetic")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bad: dict[str, int] = {}
    texts = (t for _, t in iter_texts(args.format, tuple(args.inputs), args.field,
                                      bad_counts=bad, num_documents=args.num_documents))
    texts = itertools.islice(texts, args.max_documents)
    train_tokenizer(texts, args.out, args.vocab_size, kind=args.kind)
    print(f"wrote {args.out}; skipped bad records: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

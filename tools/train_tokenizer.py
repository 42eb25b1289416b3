"""Trains a tokenizer on a local corpus; point `data.tokenizer` at the file it writes.

    python tools/train_tokenizer.py --format jsonl --vocab-size 4096 \
        --out /data/tok/tokenizer.json '/data/raw/*.jsonl'
    python tools/train_tokenizer.py --format synthetic --num-documents 20000 \
        --kind sentencepiece --vocab-size 512 --out /tmp/tok/spm.model

Special tokens <pad>, <bos>, <eos> get ids 0, 1, 2 (the DataConfig defaults). `--kind bpe`
writes a tokenizer.json (`--out` must end in .json), `--kind sentencepiece` a .model file.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.sources import DataError, expand_paths, iter_texts, one_line
from input_pipeline.tokenizer import MIN_VOCAB, train_tokenizer

OUT_SUFFIX = {"bpe": ".json", "sentencepiece": ".model"}  # what `data.tokenizer` recognises


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("inputs", nargs="*", help="input files or glob patterns")
    p.add_argument("--format", choices=("jsonl", "parquet", "arrayrecord", "synthetic"),
                   required=True)
    p.add_argument("--field", default="text", help="JSON field / Parquet column of the text")
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size",
                   type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer.json (bpe) or NAME.model (spm)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a run trained with it refuses to resume)")
    p.add_argument("--max-documents", "--max_documents", dest="max_documents",
                   type=int, default=None, help="train on the first N docs")
    p.add_argument("--num-documents", "--num_documents", dest="num_documents",
                   type=int, default=20000, help="synthetic corpus size")
    args = p.parse_args(argv)
    if args.format != "synthetic" and not args.inputs:
        p.error("inputs are required unless --format synthetic")
    if args.format == "synthetic" and args.inputs:
        p.error(f"inputs {args.inputs!r}: expected none with --format synthetic")
    for pattern in args.inputs:
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            p.error(f"inputs: {pattern!r} matches no file; expected existing files or glob "
                    "patterns that match some")
    try:
        expand_paths(tuple(args.inputs), "inputs")  # a file two patterns match: read twice
    except DataError as e:
        p.error(str(e))
    if args.vocab_size < MIN_VOCAB[args.kind]:
        p.error(f"--vocab-size {args.vocab_size}: expected an integer >= "
                f"{MIN_VOCAB[args.kind]} for --kind {args.kind} (its byte alphabet and special "
                "tokens)")
    if args.max_documents is not None and args.max_documents < 1:
        p.error(f"--max-documents {args.max_documents}: expected an integer >= 1")
    if args.num_documents < 1:
        p.error(f"--num-documents {args.num_documents}: expected an integer >= 1")
    suffix = OUT_SUFFIX[args.kind]
    if not args.out.endswith(suffix) or not os.path.basename(args.out)[:-len(suffix)]:
        p.error(f"--out {args.out!r}: expected a file name ending in {suffix} for "
                f"--kind {args.kind}")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out!r}: is a directory; expected a file path")
    if os.path.exists(args.out) and not args.overwrite:
        p.error(f"--out {args.out!r}: exists; expected a new file, or --overwrite to replace "
                "it (runs trained with it then refuse to resume)")
    bad: dict[str, int] = {}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        texts = (t for _, t in iter_texts(args.format, tuple(args.inputs), args.field,
                                          bad_counts=bad, num_documents=args.num_documents))
        texts = itertools.islice(texts, args.max_documents)
        train_tokenizer(texts, args.out, args.vocab_size, kind=args.kind)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        skipped = (f" (skipped bad records of --format {args.format} --field {args.field!r}: "
                   f"{bad})") if bad else ""  # a misspelt --field skips every record
        print(f"{p.prog}: error: {one_line(e)}{skipped}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}; skipped bad records: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    from _run import run

    run(main)

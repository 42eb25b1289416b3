"""Converts JSONL or Parquet text files into ArrayRecord shards for `data.source: arrayrecord`.

    python tools/build_arrayrecord.py --format jsonl --field text \
        --out /data/corpus/train --num-shards 8 '/data/raw/*.jsonl'

Bad records (invalid JSON, missing field, non-UTF-8, empty text) are skipped and counted;
`--strict` stops at the first one, naming its file and line/row. Shards appear under their
final names only when the whole conversion succeeded; the tool refuses to add shards next to
other `<out>-*-of-*.arrayrecord` shards that the new set would not replace.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.convert import convert_to_arrayrecord, shard_paths, stale_shards
from input_pipeline.sources import DataError, expand_paths, one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("inputs", nargs="+", help="input files or glob patterns")
    p.add_argument("--format", choices=("jsonl", "parquet"), required=True)
    p.add_argument("--field", default="text", help="JSON field / Parquet column of the text")
    p.add_argument("--out", required=True, help="output prefix (shards get -NNNNN-of-NNNNN)")
    p.add_argument("--num-shards", "--num_shards", dest="num_shards",
                   type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    args = p.parse_args(argv)
    if args.num_shards < 1:
        p.error(f"--num-shards {args.num_shards}: expected an integer >= 1")
    if not args.field:
        p.error("--field '': expected a non-empty field / column name")
    if not os.path.basename(args.out):
        p.error(f"--out {args.out!r}: expected a file name prefix such as /data/corpus/train, "
                "not a directory")
    for pattern in args.inputs:
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            p.error(f"inputs: {pattern!r} matches no file; expected existing files or glob "
                    "patterns that match some")
    try:
        expand_paths(tuple(args.inputs), "inputs")  # a file two patterns match: read twice
    except DataError as e:
        p.error(str(e))
    stale = stale_shards(args.out, args.num_shards)
    if stale:
        p.error(f"--out {args.out!r}: {len(stale)} other shard(s) of this prefix exist "
                f"({stale[0]}{', ...' if len(stale) > 1 else ''}); expected none that the "
                f"{args.num_shards} new shards would not replace (a '{args.out}-*' glob would "
                "mix them): remove them or choose another --out")
    try:
        counts, bad = convert_to_arrayrecord(args.format, tuple(args.inputs), args.out,
                                             field=args.field, num_shards=args.num_shards,
                                             strict=args.strict)
    except (ValueError, OSError, ImportError) as e:  # BadRecordError is a ValueError
        print(f"{p.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    for path, n in zip(shard_paths(args.out, args.num_shards), counts):
        print(f"{path}: {n} records")
    print(f"total {sum(counts)} records; skipped bad records: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    from _run import run

    run(main)

"""Converts JSONL or Parquet text files into ArrayRecord shards for `data.source: arrayrecord`.

    python tools/build_arrayrecord.py --format jsonl --field text \
        --out /data/corpus/train --num_shards 8 '/data/raw/*.jsonl'

Bad records (invalid JSON, missing field, non-UTF-8, empty text) are skipped and counted;
`--strict` stops at the first one, naming its file and line/row.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.convert import convert_to_arrayrecord, shard_paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="input files or glob patterns")
    p.add_argument("--format", choices=("jsonl", "parquet"), required=True)
    p.add_argument("--field", default="text", help="JSON field / Parquet column of the text")
    p.add_argument("--out", required=True, help="output prefix (shards get -NNNNN-of-NNNNN)")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    args = p.parse_args(argv)
    counts, bad = convert_to_arrayrecord(args.format, tuple(args.inputs), args.out,
                                         field=args.field, num_shards=args.num_shards,
                                         strict=args.strict)
    for path, n in zip(shard_paths(args.out, args.num_shards), counts):
        print(f"{path}: {n} records")
    print(f"total {sum(counts)} records; skipped bad records: {bad or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

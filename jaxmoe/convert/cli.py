"""`jaxmoe convert to-hf CKPT OUT --format F` and `jaxmoe convert from-hf HF_DIR OUT`."""

from __future__ import annotations

import argparse
import re
import sys

from jaxmoe.convert import FORMAT_NAMES

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' classic max_shard_size="5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """"5GB" / "500MiB" / "1000000" -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB or 500MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 1 byte")
    return size


def _run(fn_name: str, *args, **kwargs) -> int:
    from jaxmoe.convert import hf  # JAX is imported only when a conversion runs
    from jaxmoe.convert.layout import ConversionError
    from jaxmoe.convert.orbax_io import CheckpointFormatError
    from jaxmoe.convert.safetensors_io import SafetensorsError

    try:
        report = getattr(hf, fn_name)(*args, **kwargs)
    except (ConversionError, CheckpointFormatError, SafetensorsError) as e:
        print(f"jaxmoe convert: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a full disk while writing config.json
        print(f"jaxmoe convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.out}: {report.tensors} tensors, {report.bytes / 1e6:,.1f} MB in "
          f"{report.seconds:.1f} s ({report.gb_per_s:.2f} GB/s)")
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    return _run("to_hf", args.checkpoint, args.out, args.format, args.dtype, args.max_shard_size)


def cmd_from_hf(args: argparse.Namespace) -> int:
    return _run("from_hf", args.hf_dir, args.out, args.overrides, args.param_dtype)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `convert` (with `to-hf` and `from-hf`) on the top-level sub-parsers."""
    p = sub.add_parser("convert", help="convert checkpoints to/from Hugging Face safetensors")
    csub = p.add_subparsers(dest="convert_command", required=True)
    t = csub.add_parser("to-hf", help="jaxmoe checkpoint -> HF config.json + sharded safetensors")
    t.add_argument("checkpoint", help="run directory, checkpoint step, or params-only checkpoint")
    t.add_argument("out", help="new output directory")
    t.add_argument("--format", required=True, choices=FORMAT_NAMES)
    t.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    t.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors shard (default 5GB)")
    t.set_defaults(fn=cmd_to_hf)
    f = csub.add_parser("from-hf", help="HF model directory -> params-only jaxmoe checkpoint")
    f.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    f.add_argument("out", help="new output directory")
    f.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="stored parameter dtype (default float32)")
    f.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. "
                   "model.compute_dtype=float32")
    f.set_defaults(fn=cmd_from_hf)

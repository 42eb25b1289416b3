"""`jaxmoe checkpoint inspect DIR` and `jaxmoe checkpoint export-params DIR OUT [--dtype D]`.

DIR is a run directory (its latest complete checkpoint is used), its `checkpoints/` folder,
one step's folder, or an export. Both commands are plain functions tests call directly.
"""

from __future__ import annotations

import argparse
import sys


def cmd_inspect(args: argparse.Namespace) -> int:
    from jaxmoe.checkpoint.inspect import describe

    print(describe(args.dir, config=not args.no_config))
    return 0


def cmd_export_params(args: argparse.Namespace) -> int:
    from jaxmoe.checkpoint.damage import drop_closed_loop_callbacks
    from jaxmoe.checkpoint.inspect import export_params, resolve_step_dir
    from jaxmoe.staging import output_folder

    _, problem = output_folder(args.out)
    if problem:  # bad input, refused before the checkpoint is read (exit 2, as in convert)
        print(f"jaxmoe: {problem}", file=sys.stderr)
        return 2
    drop_closed_loop_callbacks()
    source = resolve_step_dir(args.dir)
    out = export_params(source, args.out, dtype=args.dtype)
    print(f"exported the parameters of {source} to {out}"
          + (f" as {args.dtype}" if args.dtype else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `checkpoint {inspect,export-params}` on the top-level sub-parsers."""
    p = sub.add_parser("checkpoint", help="inspect checkpoints or export their parameters")
    commands = p.add_subparsers(dest="checkpoint_command", required=True)
    inspect = commands.add_parser(
        "inspect", help="arrays (shape, dtype, sharding, bytes), step, data state, config; "
        "from metadata: the array data is not read or verified (export-params reads it)")
    inspect.add_argument("dir", help="run directory, checkpoints/ folder or step folder")
    inspect.add_argument("--no-config", action="store_true", help="omit the stored config")
    inspect.set_defaults(fn=cmd_inspect)
    export = commands.add_parser("export-params",
                                 help="write a params-only checkpoint for inference")
    export.add_argument("dir", help="run directory, checkpoints/ folder or step folder")
    export.add_argument("out", help="new or empty output directory")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast floating parameters (default: keep the stored dtype)")
    export.set_defaults(fn=cmd_export_params)
    return p

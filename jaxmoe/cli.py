"""`jaxmoe CMD --config C [key=value ...]`: thin argument parsing and dispatch.

Every command is a plain function (`cmd_train`, `cmd_info`, ...) that tests call directly.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxmoe import config as config_lib
from jaxmoe import startup_signals


def _load(args) -> config_lib.Config:
    return config_lib.load_config(args.config, args.overrides)


def _check_multihost(args) -> None:
    """The train command's multi-host flags (or environment), as `cmd_train` will start
    with them: a MultiHostError if they cannot start a run. Touches no device."""
    from sharding.multihost import check_settings

    check_settings(args.coordinator_address, args.num_processes, args.process_id,
                   auto=args.distributed)


def _first_difference(first: str, other: str) -> str:
    """`"train.seed: 0 -> 1"`: the first key where two dumped configs differ ("" if none)."""
    from jaxmoe.checkpoint.run import config_diff
    from jaxmoe.config_yaml import parse_yaml

    diff = config_diff(parse_yaml(first), parse_yaml(other))
    return diff[0] if diff else ""


def guards_start_up(args) -> bool:
    """Whether `jaxmoe train` holds Ctrl-C/SIGTERM as a flag while it starts: single-process
    runs only. A multi-host run keeps the handlers it had before: jax.distributed installs
    its own SIGTERM handler (the preemption service the training loop relies on), which
    restoring ours would remove, and a flag seen by one process alone would stop it while
    the others wait in a collective."""
    from sharding.multihost import check_settings

    address = check_settings(args.coordinator_address, args.num_processes, args.process_id,
                             auto=args.distributed)[0]
    return address is None and not args.distributed


def cmd_train(args) -> int:
    # Before anything compiles: Ctrl-C only sets a flag until the training loop's guard
    # takes over (startup_signals.py); a KeyboardInterrupt inside XLA was lost or crashed.
    guard = guards_start_up(args) and startup_signals.install()
    try:
        return _train_command(args)
    finally:
        if guard:
            startup_signals.release()


def _train_command(args) -> int:
    from sharding.multihost import check_same_start, check_settings, initialize

    cfg = config_lib.check_data(_load(args))  # tokenizer and data files exist, ids fit
    # Before anything touches devices: joins the other processes of a multi-host run.
    if initialize(args.coordinator_address, args.num_processes, args.process_id,
                  auto=args.distributed):
        # Each process loaded its own config and overrides: all must agree before any work.
        count = check_settings(args.coordinator_address, args.num_processes,
                               args.process_id, auto=args.distributed)[1]
        check_same_start(config_lib.dump_config(cfg), count, describe=_first_difference)
    from jaxmoe.checkpoint.damage import drop_closed_loop_callbacks
    from jaxmoe.train.loop import train

    drop_closed_loop_callbacks()  # after a failed checkpoint read, one line is enough

    train(cfg, args.run_dir, progress=not args.no_progress)
    return 0


def format_info(cfg: config_lib.Config) -> str:
    from jaxmoe.model.params import human_count, parameter_counts, training_flops_per_token

    counts = parameter_counts(cfg.model)
    total, active = sum(counts["total"].values()), sum(counts["active"].values())
    lines = [f"{'part':<16}{'total':>18}{'active':>18}"]
    for part in counts["total"]:
        lines.append(f"{part:<16}{counts['total'][part]:>18,}{counts['active'][part]:>18,}")
    lines.append(f"{'all':<16}{total:>18,}{active:>18,}")
    lines.append(f"total parameters: {human_count(total)}, active per token: "
                 f"{human_count(active)}")
    f = training_flops_per_token(cfg.model, cfg.data.seq_len)
    lines.append(f"training FLOPs per token (seq_len {cfg.data.seq_len}): {f['total']:.4g} "
                 f"(matmul {f['matmul']:.4g} + attention {f['attention']:.4g})")
    return "\n".join(lines)


def cmd_info(args) -> int:
    print(format_info(_load(args)))
    return 0


class _Once(argparse.Action):
    """An option given at most once (a second `--config` silently replaced the first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and "
                         f"{values!r}); expected one")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmoe", description="Train, inspect, compile for TPU, and convert jaxmoe "
        "Mixture-of-Experts models. Commands take `--config C [key=value ...]` (train, info, "
        "compile) or paths (checkpoint, convert); `jaxmoe CMD -h` for each.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", action=_Once, help="YAML config (a diff on the defaults)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_experts=8")
        p.set_defaults(fn=fn)
        return p

    p = command("train", cmd_train, "train a model")
    p.add_argument("--run-dir", required=True, help="metrics, checkpoints and summary go here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator-address", help="multi-host: host:port of process 0 "
                   "(or JAXMOE_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process, 0-based")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: auto-detect the cluster (TPU pods, SLURM, MPI)")
    command("info", cmd_info, "parameter counts and FLOPs, without allocating the model")
    from jaxmoe.compile_cmd import add_arguments as add_compile_arguments
    from jaxmoe.compile_cmd import cmd_compile

    add_compile_arguments(command("compile", cmd_compile, "compile the train step for a TPU "
                                  "topology on this host; memory, FLOPs, collectives, MFU"))
    from jaxmoe.checkpoint.cli import add_parser as add_checkpoint_parser  # imports no jax

    add_checkpoint_parser(sub)
    from jaxmoe.convert.cli import add_parser as add_convert_parser  # imports no jax

    add_convert_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but `key=value` overrides may also come after options
    (`... --param-dtype float32 model.compute_dtype=float32`): argparse stops collecting a
    positional list at the first option."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None, *, hugepages: bool = False) -> int:
    """Runs one command; `hugepages`: `train` restarts itself with huge pages for malloc
    (jaxmoe/hugepages.py) once its arguments, config and data files have been checked, so
    bad input gets its one-line error before the restart says anything."""
    args = parse_args(build_parser(), argv)
    try:
        if hugepages and args.command == "train":
            from pathlib import Path

            from jaxmoe import hugepages as hp
            from jaxmoe.train.run_dir import check_run_dir

            if hp.wanted():  # a restart will follow: bad input is refused before it
                config_lib.check_data(_load(args))
                check_run_dir(Path(args.run_dir))
                _check_multihost(args)
            hp.reexec_with_hugepages()  # in the restarted process: says what it runs with
        return args.fn(args)
    except config_lib.ConfigError as e:
        print(f"jaxmoe: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Imported only if loaded: a MeshError/MultiHostError implies its module was.
        mesh, multi = sys.modules.get("sharding.mesh"), sys.modules.get("sharding.multihost")
        sources = sys.modules.get("input_pipeline.sources")
        if sources and isinstance(e, sources.BadRecordError):  # data.strict=true
            print(f"jaxmoe: data error: {e} (data.strict=true stops at the first bad record)",
                  file=sys.stderr)
            return 2
        if sources and isinstance(e, sources.DataError):
            print(f"jaxmoe: data error: {e}", file=sys.stderr)
            return 2
        if multi and isinstance(e, multi.MultiHostError):  # from the flags or environment
            print(f"jaxmoe: multi-host settings: {e}", file=sys.stderr)
            return 2
        if not (mesh and isinstance(e, mesh.MeshError)):
            raise
        print(f"jaxmoe: mesh error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while compiling, or a second one while stopping
        print("jaxmoe: interrupted", file=sys.stderr)
        return 130
    except startup_signals.Interrupted as e:  # Ctrl-C or SIGTERM while `train` started
        print(f"jaxmoe: interrupted ({e}) before training started; nothing saved",
              file=sys.stderr)
        return 128 + e.signum
    except FloatingPointError as e:  # the loss diverged (train/loop.py)
        print(f"jaxmoe: training error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # Imported here: whatever raised a CheckpointError has already imported it.
        from jaxmoe.checkpoint.damage import CheckpointError, CheckpointMismatch, NotACheckpoint

        if not isinstance(e, CheckpointError):
            raise
        _drop_abandoned_reads()
        print(f"jaxmoe: {e}", file=sys.stderr)
        # A config that does not fit, or a path that names no checkpoint: bad input (2);
        # a damaged checkpoint: 1.
        return 2 if isinstance(e, (CheckpointMismatch, NotACheckpoint)) else 1


def _drop_abandoned_reads() -> None:
    """When one array read of a damaged checkpoint fails, orbax abandons the others'
    coroutines and tasks; Python would print each (with a page of TensorStore spec) as
    "Exception ignored" or asyncio's "Task exception was never retrieved" when they are
    collected. The error line already says what failed."""
    import gc
    import inspect
    import logging

    asyncio_log = logging.getLogger("asyncio")
    if not any(getattr(f, "drops_abandoned_reads", False) for f in asyncio_log.filters):
        def unretrieved(record: logging.LogRecord) -> bool:
            return "exception was never retrieved" not in record.getMessage()
        unretrieved.drops_abandoned_reads = True
        asyncio_log.addFilter(unretrieved)
    default = sys.unraisablehook
    if getattr(default, "drops_abandoned_reads", False):  # installed by an earlier call
        gc.collect()
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if not (inspect.iscoroutine(unraisable.object) and "orbax" in code.co_filename):
            default(unraisable)
    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    gc.collect()


def whole_lines_on_stderr() -> None:
    """Makes each line printed to this process's stderr reach it in one write. Under
    PYTHONUNBUFFERED=1 or `python -u` (common in containers, CI and job launchers) Python
    writes stderr through unbuffered, so `print` sends a line's text and its newline in two
    writes; a C++ thread (Gloo, XLA) logging in between spliced its message into the middle
    of a one-line error (seen in a two-process run)."""
    if sys.stderr is sys.__stderr__ and hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(line_buffering=True, write_through=False)


def entry() -> int:
    """The `jaxmoe` command; `train` runs in a process started with huge pages for malloc."""
    whole_lines_on_stderr()
    rc = main(hugepages=True)
    if startup_signals.stopped_start_up():  # XLA's compile threads may still run, and
        # interpreter teardown around them crashed (a segmentation fault); nothing was
        # opened that needs closing (a run that trained closes its writers itself)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(entry())

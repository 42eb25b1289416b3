"""The `jaxmoe` command (also `python -m jaxmoe`): imports the CLI with Ctrl-C held.

Importing the CLI (JAX, Flax, grain, orbax) takes about a second, twice for `jaxmoe train`
(it restarts itself with huge pages). A Ctrl-C then either printed a page of import
traceback or, landing in JAX's garbage-collection callback, was swallowed and the run
trained to its end. This module, the package's `__init__` and `startup_signals` import only
the standard library, so the signals are held as a flag (`startup_signals`) from the
first line that can be interrupted until the CLI is imported, then given back.
"""

from __future__ import annotations

import sys

from jaxmoe import startup_signals


def entry() -> int:
    """Imports and runs `jaxmoe.cli.entry`. A Ctrl-C or SIGTERM during the import ends the
    command with one line and exit status 128 + the signal (130 for Ctrl-C)."""
    held = startup_signals.install()
    try:
        from jaxmoe import cli

        startup_signals.check()
    except startup_signals.Interrupted as e:
        print(f"jaxmoe: interrupted ({e})", file=sys.stderr)
        return 128 + e.signum
    finally:
        if held:
            startup_signals.release()
    try:
        return cli.entry()
    except KeyboardInterrupt:  # before the command's own handlers (arguments being parsed)
        print("jaxmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(entry())

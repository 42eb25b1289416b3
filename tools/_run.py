"""How every tool ends: with `main()`'s exit status, and Ctrl-C as one line and exit status
130 (the shell's for SIGINT), not a traceback. Tools clean up in `finally` blocks first."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)

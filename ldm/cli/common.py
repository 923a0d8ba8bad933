"""What every command-line door shares: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from ldm.errors import LdmError


def cli_main(func: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a `main(argv)` so that an LdmError prints `error: ...` and returns 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return int(func(argv) or 0)
        except LdmError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper

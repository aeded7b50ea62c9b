"""The ``continual`` command line: argparse (:mod:`.parser`), the commands (:mod:`.commands`),
and :func:`main`, which dispatches and turns the library's errors into one clear line and exit 2."""

from __future__ import annotations

import sys

from adapters import DeltaError
from streams import DataError

from ..rundir import RunStateError
from ..studies.pool import PoolError
from .commands import COMMANDS
from .parser import DEFAULTS, build_parser

__all__ = ["DEFAULTS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DataError, DeltaError, RunStateError, PoolError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"continual {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncontinual {args.command}: interrupted; finished tasks are saved, continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``continual`` command line: argparse (:mod:`.parser`), the commands (:mod:`.commands`),
and :func:`main`, which dispatches and turns the library's errors into one clear line and exit 2."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

from adapters import DeltaError
from streams import DataError

from ..rundir import RunStateError
from ..studies.pool import PoolError, library_bars
from ..training import DivergedError
from .commands import COMMANDS, train_config
from .parser import DEFAULTS, build_parser, training_options

__all__ = ["DEFAULTS", "build_parser", "main", "train_config", "training_options"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _quiet_libraries(getattr(args, "no_progress", False)):
            return COMMANDS[args.command](args)
    except (DataError, DeltaError, RunStateError, PoolError, DivergedError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"continual {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of stdout left (`continual report RUN | head`): stop quietly, as `cat | head` does,
        # not with a traceback; stdout goes to /dev/null so the interpreter's final flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the shell's code for a process ended by SIGPIPE
    except Exception as e:
        if type(e).__module__.startswith("mlflow"):
            print(f"continual {args.command}: error: {tracking_failure(e, getattr(args, 'tracking_uri', ''))}", file=sys.stderr)
            return 2
        from ..training import distributed

        if distributed.is_timeout(e):
            print(f"continual {args.command}: error: rank {distributed.rank()} waited more than "
                  f"{distributed.collective_timeout().total_seconds():.0f} s for the other processes (one is stuck or "
                  f"gone); finished tasks are saved: continue with --resume ({distributed.TIMEOUT_ENV} sets the wait)",
                  file=sys.stderr)
            return 2
        if type(e).__name__ == "SafetensorError" or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            print(f"continual {args.command}: error: could not write a file ({e}); what finished before is saved: free "
                  "space and continue with --resume", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"\ncontinual {args.command}: interrupted; finished tasks are saved, continue with --resume",
              file=sys.stderr)
        return 130


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """``--no-progress`` silences the libraries' bars too: transformers draws one while it loads a
    backbone's weights, and the hub one per download, which went to logs that asked for none."""
    if not quiet:
        yield
        return
    was = library_bars(False, False)
    try:
        yield
    finally:  # main() runs again in one process (tests, notebooks): leave the bars as found
        library_bars(*was)


def tracking_failure(e: BaseException, uri: str) -> str:
    """One line for an MLflow store that cannot be used (MLflow chains several exceptions)."""
    text = str(e)
    if "Connection refused" in text or "Failed to establish" in text:
        return (f"nothing answers at {uri} (connection refused): start the server (mlflow server --host 127.0.0.1 "
                "--port 5000) or give another --tracking-uri")
    if "timed out" in text.lower() or "Read timed out" in text:
        return f"the MLflow server at {uri} does not answer (timed out): check it, or give another --tracking-uri"
    return f"the MLflow store {uri} failed: {(text.splitlines() or [''])[0][:300]}"


if __name__ == "__main__":
    sys.exit(main())

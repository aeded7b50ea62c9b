"""How tracking failures are contained: a run never stops, hangs or loses work because of them.

- :class:`GuardedLogger` wraps every logger of a stream run: the first failure is reported once,
  with the command that uploads the run later (``continual sync``), and the logger goes quiet.
- :func:`check_uri` refuses stores that would lose everything (``sqlite:///`` is in memory) and
  bounds MLflow's HTTP retries, so a server that is down costs seconds, not minutes.
- :func:`store_lock` serialises the first creation of a SQLite store between processes.
- :func:`best_effort` makes a study's one-off logging a warning when it fails.
- :func:`check_resume_store` keeps a resumed run on the store that holds its MLflow run.

Nothing here imports mlflow (``continual.tracking`` does, alone).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from .logger import StreamLogger

# MLflow retries an HTTP call 7 times over minutes by default: a server that is down would hang a
# run. One retry with a 5 s timeout bounds a dead server to about 11 s per call, and the guard then
# stops logging for the run. Set the variables yourself to change this.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1"}


def check_uri(uri: str) -> str:
    """Refuse tracking URIs that would silently lose what is logged, or fail it later (a database
    store whose driver is not installed)."""
    if uri.rstrip("/") in ("sqlite:", "sqlite:/", "sqlite://") or uri == "sqlite:///" or uri.startswith("sqlite:///:memory:"):
        raise ValueError(f"tracking URI {uri!r} names no database file, so MLflow would log to memory and lose "
                         "everything; use e.g. sqlite:///mlflow.db")
    if uri.startswith(("http://", "https://")):
        _check_server_url(uri)
        for k, v in QUICK_HTTP.items():
            os.environ.setdefault(k, v)
    if re.match(r"(postgresql|mysql|mssql|oracle)(\+\w+)?://", uri):
        _check_database_driver(uri)
    return uri


def _check_server_url(uri: str) -> None:
    """A server URL no server can have (no host, a port outside 1-65535), refused: the run went on
    unlogged and pointed at a ``continual sync`` to the same URL, which could never work."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or port == 0:
        raise ValueError(f"tracking URI {uri!r} is not a server address: it needs a host and, if any, a port from 1 "
                         "to 65535, e.g. http://127.0.0.1:5000")


def _check_database_driver(uri: str) -> None:
    """A database store whose Python driver is not installed, refused by name: the run used to go
    on untracked ("No module named 'psycopg'") and point at a ``continual sync`` failing alike."""
    try:
        from sqlalchemy.engine import make_url  # MLflow's database stores are SQLAlchemy's
    except ImportError:
        return
    try:
        url = make_url(uri)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: MLflow says what is wrong with it
        return
    try:
        url.get_dialect().import_dbapi()
    except ImportError as e:
        raise ValueError(f"tracking URI {url.render_as_string(hide_password=True)!r}: its database driver is not "
                         f"installed ({e}); pip install it (psycopg for postgresql, mysqlclient for mysql, pyodbc "
                         "for mssql), or use sqlite:///mlflow.db") from None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI, as written (None for another store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


_held = threading.local()  # the stores whose lock this thread holds


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold an exclusive lock beside a SQLite store while it may be created (MLflow runs its schema
    migration on first use; two processes doing it at once fail with 'duplicate column name').

    Re-entrant within a thread: a second ``flock`` on a new descriptor of the same file waits for
    the first, so a nested use (a logger resuming a run takes the lock, then makes its client,
    which takes it again) hung for ever; `continual run --resume` of a tracked run did."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    db = db.resolve()
    held = _held.__dict__.setdefault("stores", set())
    if db in held:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        held.add(db)
        try:
            yield
        finally:
            held.discard(db)
            fcntl.flock(f, fcntl.LOCK_UN)



def best_effort(log: Any) -> Any:
    """For one-off logging after the work is done and saved (a study's report): a tracking failure
    is a warning, not a failed command; the files stay where they were written."""
    @functools.wraps(log)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return log(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            first = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
            print(f"warning: could not log to MLflow ({first}); the files written are complete", file=sys.stderr)
            return None
    return wrapper


class GuardedLogger(StreamLogger):
    """A logger whose failures never stop a run: the first exception (a server that is down, a
    full disk, a rejected value) is reported once on stderr with how to upload the run later, and
    the logger stays silent for the rest of the run; :attr:`failed` says why. The scheduler wraps
    every logger in one. An interrupt (Ctrl-C) still goes through."""

    def __init__(self, inner: StreamLogger, out_dir: str | Path) -> None:
        self.inner, self.out_dir = inner, Path(out_dir)
        self.failed: str | None = None

    def _call(self, method: str, *args: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return getattr(self.inner, method)(*args)
        except Exception as e:  # noqa: BLE001  any tracking failure: the run matters more
            self.failed = (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:300]
            uri = getattr(self.inner, "uri", "<uri>")
            print(f"\nwarning: tracking stopped for this run ({self.failed}). Nothing is lost: the run goes on and "
                  f"keeps everything in {self.out_dir}/; upload it later with\n"
                  f"  continual sync {self.out_dir} --tracking-uri {uri}", file=sys.stderr, flush=True)
            return None

    def start_stream(self, name, params, resume):
        return self._call("start_stream", name, params, resume)

    def start_step(self, row, tasks, params):
        self._call("start_step", row, tasks, params)

    def log_step(self, record):
        self._call("log_step", record)

    def end_step(self, row, metrics, artifacts):
        self._call("end_step", row, metrics, artifacts)

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self._call("log_matrix", row, tasks, R_row, F1_row, summary, A_row)

    def end_stream(self, summary, artifacts, status="FINISHED"):
        self._call("end_stream", summary, artifacts, status)


def check_resume_store(run_dir: str | Path, uri: str) -> None:
    """A resumed run logs on to its MLflow run, which is in the store it was started with; in
    another it is not, and logging had stopped at once (the run trained on, logged nowhere).
    ``ValueError`` naming both stores, before anything loads."""
    from .rundir import run_info

    run_dir = Path(run_dir)
    tracking = (run_info(run_dir) if run_dir.is_dir() else {}).get("tracking") or {}
    started = tracking.get("tracking_uri")
    if started and tracking.get("parent_run_id") and started != check_uri(uri):
        raise ValueError(f"{run_dir} logs to MLflow run {tracking['parent_run_id']} in {started}, not in {uri}: resume "
                         f"it with --tracking-uri {started}, or with --no-mlflow and upload it afterwards with "
                         f"`continual sync {run_dir} --tracking-uri URI`")

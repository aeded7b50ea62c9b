"""The one small interface between the scheduler and whatever records a run (MLflow, a test's
recorder, a user's own logger). Every method is optional."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StreamLogger:
    """The interface the runner talks to. Every method is optional (no-op here)."""

    def start_stream(self, name: str, params: dict[str, Any], resume: dict[str, Any] | None) -> dict[str, Any]:
        """Begin (or, with ``resume`` = what this returned last time, continue) a stream.
        Returns what must be kept to resume it."""
        return {}

    def start_step(self, row: int, tasks: list[str], params: dict[str, Any]) -> None: ...

    def log_step(self, record: dict[str, Any]) -> None: ...

    def end_step(self, row: int, metrics: dict[str, float], artifacts: dict[str, Path]) -> None: ...

    def log_matrix(self, row: int, tasks: list[str], R_row: list[float], F1_row: list[float], summary: dict[str, float],
                   A_row: list[float] | None = None) -> None:
        """Row ``row`` of R, of its macro-F1 twin and of the task-agnostic matrix, and the metrics so far."""

    def end_stream(self, summary: dict[str, float], artifacts: list[Path], status: str = "FINISHED") -> None: ...

"""Every metric key the project logs to MLflow, made in one place (:mod:`continual.tracking`
logs them; the scheduler, sync and the studies name them through these functions)."""

from __future__ import annotations

import math
import re
from typing import Any


def record_metric(field: str) -> str:
    """A training record's field: ``dev_accuracy`` -> ``dev/accuracy``, ``loss`` -> ``train/loss``."""
    return f"dev/{field[4:]}" if field.startswith("dev_") else f"train/{field}"


def matrix_metrics(row: int, tasks: list[str], R_row: list[float], F1_row: list[float],
                   summary: dict[str, float], scores: dict[str, str] | None = None,
                   A_row: list[float] | None = None) -> list[tuple[str, float, int]]:
    """(name, value, step) of one row of the matrix: ``<score>/<task>`` (``acc/<task>`` for a
    classifier's accuracy, a generative task's metric, ``exact_match/<task>``, ``rouge_l/<task>``,
    ..., from ``scores``) and ``f1/<task>`` (step = row), ``R.<row>.<j>``, and
    ``so_far/<metric>`` (the stream's metrics as if it ended at this row); from the task-agnostic
    row ``A_row``, ``agnostic/<task>`` (step = row) and ``A.<row>.<j>``."""
    out = []
    for j, name in enumerate(tasks):
        if A_row is not None and not math.isnan(A_row[j]):
            out += [(f"agnostic/{name}", float(A_row[j]), row), (f"A.{row}.{j}", float(A_row[j]), 0)]
        score = (scores or {}).get(name, "accuracy")
        for prefix, values in (("acc" if score == "accuracy" else score, R_row), ("f1", F1_row)):
            if not math.isnan(values[j]):
                out.append((f"{prefix}/{name}", float(values[j]), row))
        if not math.isnan(R_row[j]):
            out.append((f"R.{row}.{j}", float(R_row[j]), 0))
    out += [(f"so_far/{k}", v, row) for k, v in finite_values(summary).items()]
    return out


def step_metrics(result: Any, untrained: dict[str, float], test: dict[str, float],
                 trainable: dict[str, int]) -> dict[str, float]:
    """The metrics of one training step's nested run (per task: test accuracy, trainable parameters,
    and the accuracy before training where it was measured)."""
    out = {"best_dev_accuracy": result.best_dev["accuracy"], "train_seconds": result.seconds, "steps": result.steps,
           "best_step": result.best_step}
    out.update({f"untrained_test_accuracy/{t}": v for t, v in untrained.items()})
    out.update({f"test_accuracy/{t}": v for t, v in test.items()})
    out.update({f"trainable_params/{t}": v for t, v in trainable.items()})
    return out


def compare_metric(field: str, label: str) -> str:
    """``ACC/per-task_lora``: a comparison row's field (MLflow names allow no '@', '=', ',')."""
    return f"{field}/" + re.sub(r"[^\w\-. :/]", "_", label)


def fusion_metric(task: str, source: str) -> str:
    return f"fusion_weight/{task}/{source}"


def finite_values(d: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if v is not None and not math.isnan(v)}

"""Continual-learning metrics on the accuracy matrix, as pure functions.

``R[i, j]`` is the score on task j after training task i (0-based here; T tasks). ``b[j]`` is the
score of the untrained model on task j: the backbone with task j's freshly initialised (seeded)
head and, for delta methods, its untrained delta. Entries never measured are NaN.

Definitions (shared/seed-notes.md; Lopez-Paz & Ranzato 2017, Chaudhry et al. 2018):

- ACC        = mean_j R[T-1, j]                         average final score
- BWT        = mean_{j<T-1} (R[T-1, j] - R[j, j])       backward transfer (< 0: forgetting)
- FWT        = mean_{j>=1} (R[j-1, j] - b[j])           forward transfer: what training the earlier
                                                        tasks did for task j before it was trained
- forgetting = mean_{j<T-1} (max_{l<T-1} R[l, j] - R[T-1, j])   (Chaudhry et al.: the *max* over
                                                        earlier rows; Avalanche uses the first score
                                                        after training, R[j, j], instead)

A metric that needs an entry never measured (a joint-training run has only the last row) is NaN.
With one task, BWT, FWT and forgetting are NaN (nothing to average).

Beside R, :class:`AccuracyMatrix` holds ``A``: the same scores measured *without the task id*
(:mod:`continual.agnostic`), and ``routing[i]``, the share of test examples the router sent to
their own task after row i. ACC, BWT and forgetting are defined on A exactly as on R (suffix
``_agnostic``); FWT is not (before task j is trained no router can send anything to it).
"""

from __future__ import annotations

import math

import numpy as np


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {R.shape}")
    return R


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def average_accuracy(R: np.ndarray) -> float:
    R = _check(R)
    return _mean(list(R[-1]))


def backward_transfer(R: np.ndarray) -> float:
    R = _check(R)
    T = len(R)
    return _mean([R[T - 1, j] - R[j, j] for j in range(T - 1)])


def forward_transfer(R: np.ndarray, b: np.ndarray) -> float:
    R = _check(R)
    b = np.asarray(b, dtype=float)
    if b.shape != (len(R),):
        raise ValueError(f"b must have one entry per task ({len(R)}), got shape {b.shape}")
    return _mean([R[j - 1, j] - b[j] for j in range(1, len(R))])


def forgetting(R: np.ndarray) -> float:
    R = _check(R)
    T = len(R)
    # R[l, j] for l < j is the score before task j was trained: not something one can forget, so
    # the max runs over rows j..T-2 (at least the row where task j was learned).
    return _mean([np.max(R[j:T - 1, j]) - R[T - 1, j] for j in range(T - 1)])


def accuracy_curve(R: np.ndarray) -> list[float]:
    """The mean score over the tasks seen so far after each task: ``mean_{j<=i} R[i, j]`` for each
    row i (its last entry is ACC). The curve of the published method comparisons (one line per
    method); NaN at a row with an entry never measured."""
    R = _check(R)
    return [float(np.mean(R[i, : i + 1])) for i in range(len(R))]


def summarize(R: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All four metrics of one matrix."""
    return {"ACC": average_accuracy(R), "BWT": backward_transfer(R), "FWT": forward_transfer(R, b),
            "forgetting": forgetting(R)}


AGNOSTIC = ("ACC", "BWT", "forgetting")  # the metrics defined on the task-agnostic matrix


def summarize_agnostic(A: np.ndarray) -> dict[str, float]:
    """ACC, BWT and forgetting of a task-agnostic matrix, keys suffixed ``_agnostic``."""
    return {"ACC_agnostic": average_accuracy(A), "BWT_agnostic": backward_transfer(A), "forgetting_agnostic": forgetting(A)}


def score_label(matrix: "AccuracyMatrix") -> str:
    """What R holds, in a title: ``accuracy`` when every task is a classifier, else the names."""
    names = list(dict.fromkeys(matrix.scores))
    return "accuracy" if names == ["accuracy"] else "score (" + ", ".join(names) + ")"


class AccuracyMatrix:
    """R (each task's score), its macro-F1 twin and b, filled entry by entry as a stream runs.

    ``scores`` names what each task's entries are (``accuracy`` for a classifier, ``exact_match``,
    ``token_f1``, ``rouge_l``, ``edit_sim`` or ``sari`` for a generative task; ``score`` for a run
    saved before scores were named). The metrics are defined on "the task's score" whatever it is.
    A standalone metric object in the Avalanche style: ``update`` / ``result`` / ``reset``."""

    def __init__(self, tasks: list[str], scores: list[str] | None = None) -> None:
        self.tasks = list(tasks)
        self.scores = list(scores) if scores is not None else ["accuracy"] * len(self.tasks)
        if len(self.scores) != len(self.tasks):
            raise ValueError(f"{len(self.scores)} score names for {len(self.tasks)} tasks")
        self.reset()

    def reset(self) -> None:
        T = len(self.tasks)
        self.R = np.full((T, T), np.nan)
        self.F1 = np.full((T, T), np.nan)
        self.b = np.full(T, np.nan)
        self.b_f1 = np.full(T, np.nan)
        self.A = np.full((T, T), np.nan)  # without the task id
        self.routing = np.full(T, np.nan)  # routing accuracy after each row

    def update(self, row: int | None, task: int, accuracy: float, f1: float) -> None:
        """Record task ``task``'s score after training row ``row`` (``None``: the untrained model, b)."""
        if row is None:
            self.b[task], self.b_f1[task] = accuracy, f1
        else:
            self.R[row, task], self.F1[row, task] = accuracy, f1

    def update_agnostic(self, row: int, scores: list[float], routing: float) -> None:
        """Row ``row`` of A (tasks 0..len(scores)-1) and its routing accuracy."""
        self.A[row, :len(scores)] = scores
        self.routing[row] = routing

    def summary(self, row: int) -> dict[str, float]:
        """The metrics as if the stream ended after row ``row`` (both matrices; routing accuracy)."""
        n = row + 1
        out = summarize(self.R[:n, :n], self.b[:n])
        out.update(summarize_agnostic(self.A[:n, :n]))
        out["routing_accuracy"] = float(self.routing[row])
        return out

    def result(self) -> dict[str, float]:
        """Metrics on the task's score, the same on macro-F1 (suffix ``_f1``), ACC / BWT /
        forgetting without the task id (suffix ``_agnostic``) and the last routing accuracy."""
        out = summarize(self.R, self.b)
        out.update({f"{k}_f1": v for k, v in summarize(self.F1, self.b_f1).items()})
        out.update(summarize_agnostic(self.A))
        out["routing_accuracy"] = float(self.routing[-1])
        return out

    def to_dict(self) -> dict:
        nan = lambda a: [None if math.isnan(x) else float(x) for x in np.ravel(a)]  # noqa: E731 JSON has no NaN
        return {"tasks": self.tasks, "scores": self.scores, "R": [nan(r) for r in self.R], "F1": [nan(r) for r in self.F1],
                "b": nan(self.b), "b_f1": nan(self.b_f1), "R_agnostic": [nan(r) for r in self.A],
                "routing": nan(self.routing)}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        m = cls(d["tasks"], d.get("scores") or ["score"] * len(d["tasks"]))
        arr = lambda v: np.array([np.nan if x is None else x for x in np.ravel(v)], dtype=float)  # noqa: E731
        T = len(m.tasks)
        m.R, m.F1 = arr(d["R"]).reshape(T, T), arr(d["F1"]).reshape(T, T)
        m.b, m.b_f1 = arr(d["b"]), arr(d["b_f1"])
        if "R_agnostic" in d:  # (a run saved before task-agnostic scoring has none: NaN)
            m.A, m.routing = arr(d["R_agnostic"]).reshape(T, T), arr(d["routing"])
        return m

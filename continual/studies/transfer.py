"""Zero-shot transfer matrix (Delta Tuning survey, section 5.4): each task's delta and head applied,
untouched, to every other task with the same label space; generative tasks share one output space
(text), so every pair of them is scored: task i's delta answers task j's prompts, scored by task
j's metric.

    python -m continual transfer runs/sentiment-domains-per-task-bottleneck-s0

Entry [i, j]: accuracy of task i's delta + head on task j's test set, divided by task j's own
accuracy (relative performance; 1.0 = as good as the target's own delta). Pairs whose label names
differ are not comparable and stay empty. Every entry is scored in the precision and batch size
the run scored its matrix with (:func:`~continual.studies.route.run_scoring`), so the diagonal
is the run's own numbers. Writes ``transfer.csv``, ``transfer.md`` and
``transfer.png`` into the run directory and logs them as a nested ``transfer`` MLflow run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..plots import annotated_heatmap
from ..tracking import log_nested_run
from ..training import evaluate, task_loader
from .route import per_task_run, run_scoring


@dataclasses.dataclass
class TransferMatrix:
    """``accuracy[i, j]``: task i's delta + head on task j's test set (NaN: label spaces differ)."""

    tasks: list[str]
    accuracy: np.ndarray
    scored: str = "in fp32"  # how every entry was scored (run_scoring's account)
    scores: list[str] | None = None  # what each target's entries are (its metric; None: accuracy)

    @property
    def relative(self) -> np.ndarray:
        """accuracy[i, j] / accuracy[j, j]; NaN where the target's own accuracy is 0 (no ratio: it
        was inf, or NaN shown as if the label spaces differed)."""
        own = np.diag(self.accuracy)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(own > 0, self.accuracy / own, np.nan)

    def table(self) -> str:
        rel = self.relative
        lines = ["| source \\ target | " + " | ".join(self.tasks) + " |", "|---|" + "---|" * len(self.tasks)]
        for i, t in enumerate(self.tasks):
            cells = ["" if np.isnan(a) else f"- ({a:.3f})" if np.isnan(v) else f"{v:.3f} ({a:.3f})"
                     for v, a in zip(rel[i], self.accuracy[i])]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        kinds = sorted(set(self.scores or ["accuracy"]))
        what = "accuracy in brackets" if kinds == ["accuracy"] else f"in brackets the score by the target's metric: {', '.join(kinds)}"
        return ("\n".join(lines) + f"\n\nrelative performance ({what}); empty: label spaces differ; "
                f"-: the target's own score is 0, so there is no ratio; every entry scored {self.scored}")

    def save(self, directory: str | Path) -> list[Path]:
        d = Path(directory)
        rel = self.relative
        with open(d / "transfer.csv", "w") as f:
            f.write("source,target,accuracy,relative\n")
            for i, s in enumerate(self.tasks):
                for j, t in enumerate(self.tasks):
                    if not np.isnan(self.accuracy[i, j]):
                        f.write(f"{s},{t},{self.accuracy[i, j]:.6f},{'' if np.isnan(rel[i, j]) else f'{rel[i, j]:.6f}'}\n")
        (d / "transfer.md").write_text(self.table() + "\n")
        png = annotated_heatmap(rel, d / "transfer.png", self.tasks, self.tasks,
                                "zero-shot transfer: relative performance", xlabel="target (test set)",
                                ylabel="source delta + head", cmap="viridis")
        return [d / "transfer.csv", d / "transfer.md", png]


def transfer_matrix(run_dir: str | Path, backbone: str | None = None, progress: bool = True) -> TransferMatrix:
    """Score every task's delta + head on every task with the same label names (every pair of
    generative tasks), as the run scored its matrix. ``backbone``: default, the one the run's
    checkpoints name."""
    stream, info, model = per_task_run(Path(run_dir), backbone, "the transfer matrix applies one delta per stream task")
    precision, batch_size, scored = run_scoring(info)
    T = len(stream)
    acc = np.full((T, T), np.nan)
    sources = [[i for i, s in enumerate(stream) if s.label_names == t.label_names or (s.generative and t.generative)]
               for t in stream]  # the comparable sources of each target
    with tqdm(total=sum(map(len, sources)), desc="transfer: scoring", unit="pair", disable=not progress, leave=False) as bar:
        for j, target in enumerate(stream):
            loader = task_loader(target, "test", model, target.max_length or info["identity"]["train"]["max_length"], batch_size)
            for i in sources[j]:
                acc[i, j] = evaluate(model, stream.tasks[i].name, loader, precision=precision)["accuracy"]
                bar.update()
    return TransferMatrix(stream.names, acc, scored, [t.score_name for t in stream])


def log_transfer(run_dir: str | Path, files: list[Path], matrix: TransferMatrix) -> str | None:
    """A nested ``transfer`` run under the stream's MLflow run; None when the run was not logged."""
    rel = matrix.relative
    metrics = {f"relative/{s}/{t}": float(rel[i, j]) for i, s in enumerate(matrix.tasks)
               for j, t in enumerate(matrix.tasks) if i != j and not np.isnan(rel[i, j])}
    return log_nested_run(run_dir, "transfer", metrics, files)

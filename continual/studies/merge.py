"""Merging a finished run's task deltas into one (``fusion.merge_tasks``: linear, TIES, DARE, and
LoRA's exact ``cat``) and scoring every task with it: what one delta for the whole stream keeps of
each task's own delta.

    python -m continual merge runs/default-per-task-lora-s0 --how ties --how cat

Each task is scored with the merged delta and its own head: a classifier still needs its task's
head (a task id picks it), while a generative stream's tasks share the language model's head, so
there the merged delta answers every task with no task id at all. The run's own deltas are scored
alongside, on the same test sets, in the precision and batch size the run scored its matrix with
(:func:`~continual.studies.route.run_scoring`), so the own column is the matrix's last row. Writes ``merge.csv``,
``merge.md`` and ``merge.png`` into the run directory and logs them as a nested ``merge`` MLflow
run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from adapters import get_method
from fusion.merge import MAGMAX_SCALE, MERGES, merge_rule, merge_tasks

from ..plots import metric_bars
from ..tracking import compare_metric, log_nested_run
from ..training import evaluate, task_loader
from .route import per_task_run, run_scoring

OWN = "own delta"  # the column of each task's own delta


@dataclasses.dataclass
class MergeResult:
    """``scores[rule][j]``: task j's test score with the merged delta (``OWN``: its own delta)."""

    tasks: list[str]
    scores: dict[str, list[float]]
    settings: dict[str, dict[str, float]]
    generative: bool
    scored: str = "in fp32"  # how every column was scored (run_scoring's account)

    def acc(self, rule: str) -> float:
        return float(np.mean(self.scores[rule]))

    def table(self) -> str:
        rules = list(self.scores)
        lines = ["| task | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        lines += [f"| {t} | " + " | ".join(f"{self.scores[r][j]:.3f}" for r in rules) + " |" for j, t in enumerate(self.tasks)]
        lines.append("| **ACC** | " + " | ".join(f"**{self.acc(r):.3f}**" for r in rules) + " |")
        said = "; ".join(f"{r}: " + ", ".join(f"{k}={v:g}" for k, v in s.items()) for r, s in self.settings.items() if s)
        head = ("no task id: the tasks share the language model's head" if self.generative
                else "each task scored with its own head (a task id picks it)")
        return ("\n".join(lines) + f"\n\none delta merged from every task's, {head}" + (f"; {said}" if said else "")
                + f".\nEvery column scored {self.scored}")

    def save(self, directory: str | Path) -> list[Path]:
        d = Path(directory)
        with open(d / "merge.csv", "w") as f:
            f.write("rule,task,score\n")
            for r, row in self.scores.items():
                f.writelines(f"{r},{t},{v:.6f}\n" for t, v in zip(self.tasks, row))
        (d / "merge.md").write_text(self.table() + "\n")
        rows = {r: {**dict(zip(self.tasks, row)), "ACC": self.acc(r)} for r, row in self.scores.items()}
        png = metric_bars(rows, [*self.tasks, "ACC"], d / "merge.png", "each task with its own delta and with one merged delta")
        return [d / "merge.csv", d / "merge.md", png]


def check_rules(rules: Sequence[str], density: float | None, seed: int) -> None:
    """Refuse unknown or repeated rules and bad settings before the run's backbone is loaded."""
    twice = sorted({r for r in rules if list(rules).count(r) > 1})
    if twice:
        raise ValueError(f"merge rules {twice} are given more than once; give each once")
    for r in rules:
        merge_rule(r, density if MERGES.get(r) is not None else None, seed)
    if density is not None and all(MERGES[r] is None for r in rules):  # it would be ignored
        raise ValueError(f"a density is given, but no merge rule here uses one ({list(rules)}); ties and dare do")


def merge_run(run_dir: str | Path, rules: Sequence[str] | None = None, density: float | None = None, seed: int = 0,
              backbone: str | None = None, progress: bool = True) -> MergeResult:
    """Merge every task's delta of a finished per-task run by each rule and score every task with it.
    ``rules``: default linear, ties, dare, and cat where the deltas have a summed form (LoRA).
    ``density`` applies to the rules that have one (ties, dare; default each one's own). Every
    column is scored as the run scored its matrix (:func:`~continual.studies.route.run_scoring`)."""
    check_rules(rules or ["linear", "ties", "dare"], density, seed)  # before anything loads
    stream, info, model = per_task_run(Path(run_dir), backbone, "a merge combines one delta per stream task")
    names, (precision, batch_size, scored) = stream.names, run_scoring(info)
    if rules is None:  # cat where the deltas have a summed form
        summed = all(get_method(c.method).summed_config(c, len(names)) is not None for c in model.task(names[0]).configs)
        rules = ["linear", "ties", "dare"] + (["cat"] if summed else [])
    settings = {r: {} if MERGES[r] is None else {"density": MERGES[r] if density is None else density,
                                                  **({"seed": seed} if r == "dare" else {})} for r in rules}
    if "magmax" in settings:  # its weights scale the chosen entries: said, as a density is
        settings["magmax"] = {"scale": MAGMAX_SCALE}
    scores: dict[str, list[float]] = {OWN: [], **{r: [] for r in rules}}
    # the merged delta's name, one no stream task has (a task may well be called "merged0")
    merged = next(n for n in (f"merged{i}" for i in range(len(names) + 1)) if n not in model.tasks)
    bar = tqdm(total=len(names) * (1 + len(rules)), desc="merge: scoring", unit="score", disable=not progress, leave=False)
    for target in stream:
        loader = task_loader(target, "test", model, target.max_length or info["identity"]["train"]["max_length"], batch_size)
        scores[OWN].append(evaluate(model, target.name, loader, precision=precision)["accuracy"])
        bar.update()
        for r in rules:  # re-merged per target only to give it the target's head; each merge draws the same
            merge_tasks(model, merged, names, how=r, density=settings[r].get("density"), seed=seed, head_from=target.name)
            try:
                scores[r].append(evaluate(model, merged, loader, precision=precision)["accuracy"])
            finally:
                model.remove_task(merged)
            bar.update()
    bar.close()
    return MergeResult(names, scores, settings, all(t.generative for t in stream), scored)


def log_merge(run_dir: str | Path, files: list[Path], result: MergeResult) -> str | None:
    """A nested ``merge`` run under the stream's MLflow run; None when the run was not logged."""
    metrics = {compare_metric("ACC", r): result.acc(r) for r in result.scores}  # ACC/ties, movie/ties, ...
    metrics.update({compare_metric(t, r): v for r, row in result.scores.items() for t, v in zip(result.tasks, row)})
    return log_nested_run(run_dir, "merge", metrics, files)

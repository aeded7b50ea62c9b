"""Combining delta methods on one task (Delta Tuning survey, section 5.2), and a study over a grid.

- ``simultaneous``: one task carrying all the methods, trained together.
- ``sequential``: method 1 (with a head) is trained and frozen; method 2 is added on top of it
  (both act, method 2 after method 1), with a head starting from the previous one, and only
  method 2 and its head train; and so on.

    python -m continual combine --task movie --combo lora+bitfit --combo bottleneck+prompt \\
        --mode simultaneous --mode sequential

Each (combination, mode) is trained from the same seed on the same split and scored on test; the
study prints a Markdown table (accuracy, trainable parameters, seconds), writes it with a JSON copy,
and logs one MLflow run per cell (experiment ``combinations``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch
from datasets import DatasetDict

from adapters import DeltaModel
from adapters.model import MethodSpec
from adapters.spec import methods_label

from ..training import TrainConfig, eval_loader, evaluate, train_task

MODES = ("simultaneous", "sequential")


@dataclasses.dataclass
class CombinationResult:
    methods: list[str]  # each method with its non-default options, lora(rank=4): rows of one grid differ
    mode: str
    test_accuracy: float
    dev_accuracy: float
    trainable_params: int
    seconds: float
    stages: list[dict[str, Any]]


def train_combination(model: DeltaModel, name: str, data: DatasetDict, methods: Sequence[MethodSpec], mode: str,
                      label_names: Sequence[str], config: TrainConfig = TrainConfig()) -> CombinationResult:
    """Train ``methods`` on one task, together or one after another (see the module docstring).

    Adds task ``name`` (sequential: ``name``, ``name-2``, ...; the last one's head answers)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not methods:
        raise ValueError("a combination needs at least one method")
    groups = [list(methods)] if mode == "simultaneous" else [[m] for m in methods]
    active: list[str] = []
    stages, start, trainable = [], time.perf_counter(), 0
    test = eval_loader(data["test"], model.tokenizer, config.max_length)
    for k, group in enumerate(groups):
        task = name if k == 0 else f"{name}-{k + 1}"
        torch.manual_seed(config.seed + k)
        model.add_task(task, group, label_names=label_names)
        if active:  # start from the previous stage's head: the new delta refines, it does not restart
            model.task(task).head.load_state_dict(model.task(active[-1]).head.state_dict())
        active.append(task)
        result = train_task(model, task, data, config, active=tuple(active))
        model.freeze(task)
        params = model.task(task).delta_parameters() + model.task(task).head_parameters()
        trainable += params
        stages.append({"task": task, "methods": [methods_label([m], options=True) for m in group], "trainable_params": params,
                       "dev_accuracy": result.best_dev["accuracy"], "steps": result.steps,
                       "test_accuracy": evaluate(model, task, test, tuple(active))["accuracy"]})
    return CombinationResult([methods_label([m], options=True) for m in methods], mode, stages[-1]["test_accuracy"], stages[-1]["dev_accuracy"],
                             trainable, time.perf_counter() - start, stages)


def study_table(results: list[CombinationResult]) -> str:
    lines = ["| methods | mode | test accuracy | dev accuracy | trainable params | seconds | accuracy after each stage |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        per = ", ".join(f"{'+'.join(s['methods'])} {s['test_accuracy']:.3f}" for s in r.stages)
        lines.append(f"| {'+'.join(r.methods)} | {r.mode} | {r.test_accuracy:.3f} | {r.dev_accuracy:.3f} | "
                     f"{r.trainable_params:,} | {r.seconds:.0f} | {per} |")
    return "\n".join(lines)


def check_grid(combos: Sequence[Sequence[MethodSpec]], modes: Sequence[str]) -> None:
    """Refuse an unknown mode, and a combination or mode given twice (it trained the same cell
    twice and the table held two rows of it), before anything is loaded."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; one of {MODES}")
    labels = [methods_label(c, options=True) for c in combos]
    twice = sorted({x for x in [*labels, *modes] if [*labels, *modes].count(x) > 1})
    if twice:
        raise ValueError(f"{twice} given more than once; give each combination and mode once")


def run_study(model: DeltaModel, task: Any, combos: Sequence[Sequence[MethodSpec]], modes: Sequence[str],
              config: TrainConfig, on_result: Any = None) -> list[CombinationResult]:
    """Every (combination, mode) on ``task`` from the same seed and split, each on a model cleared
    of the previous cell's tasks; ``on_result(result)`` is called after each cell (to print, log)."""
    check_grid(combos, modes)
    results = []
    for methods in combos:
        for mode in modes:
            r = train_combination(model, "combo", task.splits(), methods, mode, task.label_names, config)
            results.append(r)
            for name in reversed(list(model.tasks)):
                model.remove_task(name)
            if on_result is not None:
                on_result(r)
    return results

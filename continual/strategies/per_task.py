"""Our method: one new delta + head per task, frozen after training; and continual fusion over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from adapters import DEFAULT_METHOD, DeltaModel, get_method
from adapters.model import MethodSpec
from fusion import FusionConfig, fusion_weights
from streams import Task

from ..plots import write_fusion_report
from ..training import train_task
from .base import Strategy, add_task, head_of


class PerTaskDelta(Strategy):
    """Old tasks' deltas are never touched again, so their predictions cannot change: BWT is exactly 0."""

    name = "per-task"
    description = "a new delta + head per task, frozen after training (no forgetting by construction)"

    starts_from_deltas = True

    def prepare(self, model: DeltaModel, task: Task) -> None:
        add_task(model, task, self.methods)


class ContinualFusion(PerTaskDelta):
    """Per-task deltas, plus for each new task an AdapterFusion over every delta so far (its own
    included), trained with a head after the task's own delta is frozen (Pfeiffer et al.'s two
    stages, repeated along the stream). The task is then scored through its fusion. Everything
    trained is frozen, so BWT stays exactly 0; FWT shows what fusing earlier tasks brings."""

    name = "per-task-fusion"
    description = "per-task deltas, then for each task an AdapterFusion over all deltas so far (its own included)"
    reports_run_model = True  # the fusion's attention weights on the test set
    defaults = {f.name: f.default for f in dataclasses.fields(FusionConfig) if f.name != "sources"}
    SUFFIX = "_fusion"

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), **fusion: Any) -> None:
        super().__init__(methods)
        if "sources" in fusion:
            raise ValueError(f"{self.name}: 'sources' is not an option: each task's fusion is over every delta so far")
        FusionConfig.from_dict({"sources": ["any"], **fusion})  # unknown or bad fields refused now, not after task 1
        unfusable = [m.method for m in self.methods if not get_method(m.method).capabilities.fusable]
        if unfusable:  # refused now, before the stream loads (the fusion of task 1 said so after the backbone)
            raise ValueError(f"{self.name}: {unfusable} cannot be fused (no per-module term to weigh: they change the "
                             "input sequence or the attention); use layer-wise methods (lora, bottleneck, parallel, ...)")
        self.fusion = fusion  # FusionConfig fields

    def fused(self, task: str) -> str:
        return task + self.SUFFIX

    def check_name(self, name: str) -> None:
        if name.endswith(self.SUFFIX):
            raise ValueError(f"task names ending in {self.SUFFIX!r} are reserved by the {self.name} strategy; rename {name!r}")

    def prepare(self, model: DeltaModel, task: Task) -> None:
        self.check_name(task.name)
        super().prepare(model, task)
        sources = tuple(n for n in model.tasks if not n.endswith(self.SUFFIX))
        model.add_task(self.fused(task.name), [FusionConfig(sources=sources, **self.fusion)], **head_of(task))

    def active(self, task: str) -> tuple[str, ...]:
        return (self.fused(task),)

    def exported(self, task: str) -> tuple[str, ...]:
        return (task, self.fused(task))  # the fusion is of no use without its own source

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        own = train_task(model, task.name, data(task), config, callback=callback, active=(task.name,))
        model.freeze(task.name)
        fused = model.task(self.fused(task.name))
        fused.head.load_state_dict(model.task(task.name).head.state_dict())  # start from the task's own head

        def shifted(record: dict[str, Any]) -> None:  # stage 2 steps continue stage 1's in the logs
            callback({**record, "step": record["step"] + own.steps, "stage": 2})

        result = train_task(model, self.fused(task.name), data(task), config, callback=shifted if callback else None)
        result.seconds += own.seconds
        return result

    def finish(self, model: DeltaModel, task: Task) -> None:
        model.freeze(task.name)
        model.freeze(self.fused(task.name))

    def reports(self, model: DeltaModel, task: Task, loader: Any, directory: Path) -> dict[str, Path]:
        """The fusion's attention per layer x delta on the task's test set: CSV, Markdown, heatmap."""
        write_fusion_report(fusion_weights(model, self.fused(task.name), loader), directory)
        return {"fusion": directory}

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        fused = model.task(self.fused(task.name))
        return super().trainable_parameters(model, task) + fused.delta_parameters() + fused.head_parameters()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fusion": dict(self.fusion)}

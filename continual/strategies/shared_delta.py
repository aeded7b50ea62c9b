"""Baselines with one delta shared by every task: trained in turn (forgets) or jointly (upper bound)."""

from __future__ import annotations

import dataclasses

import torch

from adapters import DeltaModel
from streams import Task

from ..training import train_joint
from .base import Strategy, head_of

SHARED = "shared_delta"  # the task holding a shared delta (no head)


class _SharedDelta(Strategy):
    """One delta shared by every task (a head-only task per task on top of it)."""

    reserved = (SHARED,)

    def prepare(self, model: DeltaModel, task: Task) -> None:
        self.check_name(task.name)
        if SHARED not in model.tasks:
            model.add_task(SHARED, self.methods)
        model.add_task(task.name, [], **head_of(task))

    def active(self, task: str) -> tuple[str, ...]:
        return (SHARED, task)

    @staticmethod
    def shared_params(model: DeltaModel) -> dict[str, torch.nn.Parameter]:
        """The shared delta's parameters by name (what EWC, MAS, SI and OGD weigh or project)."""
        return dict(model.task(SHARED).deltas.named_parameters())

    def earlier_tasks(self, model: DeltaModel, task: Task) -> list[str]:
        """The tasks trained before ``task``, in their order: the model's tasks but this one and
        those the strategy adds for itself (a resumed run has rebuilt them before it trains)."""
        return [n for n in model.tasks if n not in (*self.reserved, task.name)]

    def finish(self, model: DeltaModel, task: Task) -> None:
        model.freeze(task.name)  # the head; the shared delta keeps training on the next task

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        return model.task(SHARED).delta_parameters() + model.task(task.name).head_parameters()


class SequentialDelta(_SharedDelta):
    name = "seq-delta"
    description = "one shared delta trained on each task in turn (baseline: forgets)"


class Joint(_SharedDelta):
    name = "joint"
    description = "one shared delta trained on all tasks at once (multi-task upper bound; last row only)"

    def plan(self, num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]

    def train(self, model, tasks, config, data, callback):
        spec = {t.name: (self.active(t.name), data(t)) for t in tasks}
        # The same number of steps per task as a sequential run gets.
        config = dataclasses.replace(config, max_steps=config.max_steps * len(tasks))
        return train_joint(model, spec, config, callback=callback)

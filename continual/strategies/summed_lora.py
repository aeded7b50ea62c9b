"""What O-LoRA and InfLoRA share: a new LoRA per task, and every trained task's LoRA acting at once.

Both methods answer every input with the *sum* of all tasks' LoRAs (no task id picks a delta), and
differ only in how a new task's LoRA is kept from disturbing the earlier ones (a penalty in
``o_lora.py``, a designed subspace in ``inflora.py``). Each task keeps its own head (a classifier,
or the model's LM head); without a task id the run's router picks the classifier, as for every
strategy (docs/strategies.md).
"""

from __future__ import annotations

from typing import Sequence

from adapters import DeltaModel
from adapters.methods.lora import LoRASite
from adapters.model import MethodSpec
from streams import Task

from .base import Strategy, head_of


def lora_sites(model: DeltaModel, task: str) -> dict[str, LoRASite]:
    """``task``'s LoRA modules by ``<delta key>.<site key>`` (the same keys for every task built
    from the same configs)."""
    return {f"{key}.{site}": module for key, delta in model.task(task).deltas.items()
            for site, module in getattr(delta, "site_modules", {}).items() if isinstance(module, LoRASite)}


class SummedLoRA(Strategy):
    """Per-task LoRAs, all trained ones acting in every forward pass; the task's own head last."""

    def __init__(self, methods: Sequence[MethodSpec] = ("lora",)) -> None:
        super().__init__(methods)
        other = [m.method for m in self.methods if m.method != "lora"]
        if other or not self.methods:
            raise ValueError(f"{self.name} constrains LoRA subspaces: its methods must be lora (e.g. --method "
                             f"lora:rank=8); {other} are not")
        self.trained: list[str] = []  # in stream order; rebuilt on resume by finish()

    def prepare(self, model: DeltaModel, task: Task) -> None:
        model.add_task(task.name, self.methods, **head_of(task))

    def active(self, task: str) -> tuple[str, ...]:
        # every trained task's LoRA (their sum does not depend on this order: each adds at its own
        # hook, in the order the tasks were added), the task itself last: its head answers
        return tuple(t for t in self.trained if t != task) + (task,)

    def exported(self, task: str) -> tuple[str, ...]:
        return (task,)  # its LoRA and head; the sum is the other tasks' own checkpoints

    def finish(self, model: DeltaModel, task: Task) -> None:
        super().finish(model, task)
        if task.name not in self.trained:
            self.trained.append(task.name)

"""Sequential full fine-tuning of the backbone, a new head per task: the catastrophic-forgetting baseline."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import train_task
from ..training.config import MAX_LR
from .base import Strategy, check_option, head_of


class SequentialFineTune(Strategy):
    name = "seq-ft"
    description = "sequential full fine-tuning of the backbone, new head per task (baseline: forgets)"
    defaults = {"backbone_lr": 5e-5}
    trains_backbone = True

    def __init__(self, methods: Sequence[MethodSpec] = (), backbone_lr: float = 5e-5) -> None:
        super().__init__(methods)
        # a negative rate climbs the loss and NaN fills the backbone with NaN; both had trained and
        # printed scores, exit 0
        check_option(self.name, "backbone_lr", backbone_lr, lambda v: 0 < v <= MAX_LR, f"a number > 0 and <= {MAX_LR:g}")
        self.backbone_lr = backbone_lr

    def prepare(self, model: DeltaModel, task: Task) -> None:
        model.add_task(task.name, [], **head_of(task))

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        params = list(model.backbone.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            group = {"params": params, "lr": self.backbone_lr, "name": "backbone"}
            return train_task(model, task.name, data(task), config, callback=callback, extra_groups=[group])
        finally:
            for p in params:
                p.requires_grad_(False)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        out.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(backbone, strict=True)

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        return model.backbone_parameters() + model.task(task.name).head_parameters()

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "methods": [], "backbone_lr": self.backbone_lr}

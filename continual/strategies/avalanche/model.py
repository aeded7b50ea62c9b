"""What Avalanche's strategies train: our backbone and task heads as an Avalanche multi-task module,
and a plugin that gives them our training protocol. Imports avalanche: load it through
:mod:`continual.strategies.avalanche.strategy`, which checks the extra is installed.

- :class:`AvalancheNet` shares its modules with a :class:`~adapters.DeltaModel` (nothing is
  copied), so what an Avalanche strategy trains is what our evaluation scores. Inputs are the
  packed ``[B, 3, L]`` tensors of :mod:`continual.strategies.avalanche.export`.
- :class:`ProtocolPlugin` makes an Avalanche strategy train the way our own methods do, by
  driving the same :class:`~continual.training.Protocol` our loop drives (step budget, warm-up +
  linear-decay schedule, dev evaluation, early stopping, best-on-dev weights), so a comparison
  measures the continual-learning mechanism, not a different training recipe.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from ...training import Protocol

# Logit of a class a task's head does not have, in a batch mixing tasks with different label
# counts (replay memories): the softmax gives it probability 0. Avalanche's own default pads with
# 0, which gives such classes probability mass.
ABSENT = -1e4


class AvalancheNet(MultiTaskModule):
    """The backbone and one head per task; task label ``j`` is the ``j``-th task added."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.names: list[str] = []
        self._token_types = "token_type_ids" in inspect.signature(backbone.forward).parameters

    def sync(self, model: Any) -> None:
        """Add the heads of tasks the DeltaModel gained since (in its order), shared, not copied."""
        for name, task in model.tasks.items():
            if name not in self.heads:
                self.heads[name] = task.head
                self.names.append(name)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = x[:, 1]
        length = int(mask.sum(1).max())  # trim the split's padding to the batch's longest row
        x = x[..., :length]
        extra = {"token_type_ids": x[:, 2]} if self._token_types else {}
        return self.backbone(input_ids=x[:, 0], attention_mask=x[:, 1], **extra).last_hidden_state, x[:, 1]

    def _head(self, task: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.heads[self.names[task]](hidden, mask)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self._head(int(task_label), *self._encode(x))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        # One backbone pass for every head (LwF distils all old heads on each batch; Avalanche's
        # default runs the whole model once per head).
        hidden, mask = self._encode(x)
        return {t: self._head(t, hidden, mask) for t in sorted(self.known_train_tasks_labels)}

    def forward(self, x: torch.Tensor, task_labels: Any) -> Any:
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        tasks = torch.unique(task_labels).tolist()
        if len(tasks) == 1:
            return self.forward_single_task(x, tasks[0])
        hidden, mask = self._encode(x)  # one backbone pass for a batch mixing tasks
        width = max(self.heads[self.names[t]].num_labels for t in tasks)
        out = hidden.new_full((x.shape[0], width), ABSENT)
        for t in tasks:
            rows = task_labels == t
            logits = self._head(t, hidden[rows], mask[rows])
            out[rows, : logits.shape[1]] = logits.to(out.dtype)
        return out


class ProtocolPlugin(SupervisedPlugin):
    """Our training protocol (:class:`continual.training.Protocol`) inside an Avalanche strategy.

    The protocol is written once; this plugin only calls it at Avalanche's moments. Must be the
    strategy's first plugin: the best weights are restored in ``after_training_exp`` before any
    other plugin (EWC's importances, LwF's teacher, replay buffers) looks at the model.
    :meth:`start` hands it the next task's protocol (one plugin object serves the whole stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Protocol | None = None
        self.result = None  # the TrainResult of the last task trained

    def start(self, protocol: Protocol) -> None:
        self.protocol = protocol

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.protocol.before_step()

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        clip = self.protocol.config.grad_clip
        if clip:
            torch.nn.utils.clip_grad_norm_(self.protocol.params, clip)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        record = self.protocol.after_step(strategy.loss, len(strategy.mb_y))
        if record is not None and "dev_accuracy" in record:
            strategy.model.train()  # the dev evaluation left the shared modules in eval mode
        if self.protocol.should_stop:
            strategy.stop_training()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.result = self.protocol.finish()

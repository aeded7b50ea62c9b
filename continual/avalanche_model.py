"""What Avalanche's strategies train: our backbone and task heads as an Avalanche multi-task module,
and a plugin that gives them our training protocol. Imports avalanche: load it through
:mod:`continual.avalanche_strategies`, which checks the extra is installed.

- :class:`AvalancheNet` shares its modules with a :class:`~adapters.DeltaModel` (nothing is
  copied), so what an Avalanche strategy trains is what our evaluation scores. Inputs are the
  packed ``[B, 3, L]`` tensors of :mod:`continual.avalanche_export`.
- :class:`Protocol` makes an Avalanche strategy train the way our own methods do: the same step
  budget, warm-up + linear-decay schedule, dev evaluation every ``eval_every`` steps, early
  stopping and the best-on-dev weights kept, so a comparison measures the continual-learning
  mechanism, not a different training recipe.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

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


def schedule(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of our own loop (continual.train): linear warm-up, linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Protocol(SupervisedPlugin):
    """Our training protocol inside an Avalanche strategy, for one experience at a time.

    ``dev()`` scores the current task on its dev split; ``callback(record)`` receives the same
    records as our loop's (step, loss, lr, dev scores). Must be the strategy's first
    plugin: the best weights are restored in ``after_training_exp`` before any other plugin
    (EWC's importances, LwF's teacher, replay buffers) looks at the model."""

    def __init__(self) -> None:
        super().__init__()
        self.start(None, [], lambda: {"accuracy": 0.0}, None)

    def start(self, config: Any, lrs: list[float], dev: Callable[[], dict[str, float]],
              callback: Callable[[dict[str, Any]], None] | None, progress: Any = None) -> None:
        """Reset for the next task (one plugin object serves the whole stream). ``lrs``: the peak
        learning rate of each optimizer group (the schedule scales them each step)."""
        self.config, self.dev, self.callback, self.progress = config, dev, callback, progress
        self._base_lrs = list(lrs)
        self.best: dict[str, float] = {"accuracy": -1.0}
        self.best_step = self.step = 0
        self.history: list[dict[str, Any]] = []
        self._bad = 0
        self._snapshot: list[torch.Tensor] = []
        self._loss = 0.0
        self._since = 0

    def _params(self, strategy: Any) -> list[torch.Tensor]:
        return [p for p in strategy.model.parameters() if p.requires_grad]

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._warmup = math.ceil(self.config.warmup_ratio * self.config.max_steps)
        self._snapshot = [p.detach().clone() for p in self._params(strategy)]

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        factor = schedule(self.step, self.config.max_steps, self._warmup)
        for g, lr in zip(strategy.optimizer.param_groups, self._base_lrs):
            g["lr"] = lr * factor

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params(strategy), self.config.grad_clip)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.step += 1
        self._loss += float(strategy.loss.detach())
        self._since += 1
        if self.progress is not None:
            self.progress.update(1)
        cfg, step = self.config, self.step
        evaluate_now = step % cfg.eval_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or evaluate_now:
            record = {"step": step, "loss": self._loss / self._since, "lr": strategy.optimizer.param_groups[0]["lr"]}
            if evaluate_now:
                score = self.dev()
                record.update({f"dev_{k}": v for k, v in score.items()})
                if score["accuracy"] > self.best["accuracy"]:
                    self.best, self.best_step, self._bad = score, step, 0
                    self._snapshot = [p.detach().clone() for p in self._params(strategy)]
                else:
                    self._bad += 1
                strategy.model.train()
            self.history.append(record)
            if self.callback is not None:
                self.callback(record)
            self._loss, self._since = 0.0, 0
        if step >= cfg.max_steps or (cfg.patience is not None and self._bad >= cfg.patience):
            strategy.stop_training()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            for p, b in zip(self._params(strategy), self._snapshot):
                p.copy_(b)

"""``ewc``: one shared delta whose parameters are anchored by their Fisher information.

Elastic weight consolidation, Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks" (PNAS 2017), in its online form (Schwarz et al., "Progress & Compress", ICML 2018): after
each task the diagonal Fisher information F of the trained parameters is estimated on that task's
training data and added to the running F; the parameters' values are the new anchor θ*. Training
the next task adds

    (λ / 2) · Σ_i F_i (θ_i − θ*_i)²

to its loss. Here θ is the shared **delta** (the frozen backbone never moves, and each task's head
is its own and frozen after its task), so the penalty costs a few element-wise products per step.
Defaults: ``ewc_lambda=1000`` (Avalanche's default for online EWC, which ``avalanche-ewc`` uses on
the whole backbone), ``fisher_samples=64`` training examples per task.

How we depart from the paper: F is the *empirical* Fisher (squared gradients of the loss of the
gold label, or of the gold answer's tokens for a generative task, one example at a time), where
the paper samples the label from the model's own prediction; most continual-learning code does the
same. The online sum keeps γ = 1 (no decay). F and θ* are part of the run's saved state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from adapters.precision import autocast, resolve_precision
from streams import Task

from ..training import TrainConfig, collate_rows, token_loss
from ..training.data import sample_rows
from .base import check_option, finite_at_least
from .shared_delta import _SharedDelta


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                strength: float) -> torch.Tensor:
    """(strength / 2) · Σ F (θ − θ*)²: zero at the anchor, growing with the squared move."""
    total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    for name, p in params.items():
        total = total + (fisher[name] * (p.float() - anchor[name]) ** 2).sum()
    return 0.5 * strength * total


def example_grads(model: DeltaModel, params: list[torch.Tensor], train: Any, rows: list[int], precision: str,
                  objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The gradient of ``objective(logits, labels)`` with respect to ``params`` for each of
    ``rows`` of ``train``, one example at a time, dropout off (the model's mode restored after);
    run inside ``model.acting(...)`` of the task's deltas. Under fp16 it runs in fp32: one
    example's gradients, unscaled, would underflow."""
    was_training = model.training
    model.eval()
    precision = resolve_precision(precision, model.device)
    precision = "fp32" if precision == "fp16" else precision
    try:
        for i in rows:
            batch = {k: v.to(model.device) for k, v in collate_rows(train, [i], model.tokenizer).items()}
            labels = batch.pop("labels")
            with autocast(precision, model.device):
                logits = model(**batch)
            yield torch.autograd.grad(objective(logits, labels), params, allow_unused=True)
    finally:
        model.train(was_training)


class EWC(_SharedDelta):
    name = "ewc"
    description = "one shared delta; online EWC: a Fisher-weighted pull of its parameters toward their last anchor"
    defaults = {"ewc_lambda": 1000.0, "fisher_samples": 64}
    data_parallel = False  # the penalty is added outside the data-parallel model
    # the importance costs a pass over data after each task: skipped after the stream's last,
    # whose importance no later task would use (SI's is read from training, so it is kept)
    importance_pass = True

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), ewc_lambda: float = 1000.0,
                 fisher_samples: int = 64) -> None:
        super().__init__(methods)
        check_option("ewc", "ewc_lambda", ewc_lambda, finite_at_least(0), "a finite number >= 0")
        check_option("ewc", "fisher_samples", fisher_samples, lambda v: v >= 1, "an integer >= 1", integer=True)
        self.ewc_lambda, self.fisher_samples = float(ewc_lambda), fisher_samples
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        if not self.fisher or self.ewc_lambda == 0:
            return None
        params = self.shared_params(model)
        return lambda batch, labels, logits: ewc_penalty(params, self.anchor, self.fisher, self.ewc_lambda)

    def train(self, model, tasks, config, data, callback):
        result = super().train(model, tasks, config, data, callback)
        for t in [] if self.importance_pass and self.ends_stream(tasks) else tasks:
            fisher = self.task_importance(model, t, data(t)["train"], config)
            self.fisher = {k: self.fisher.get(k, 0) + v for k, v in fisher.items()}
        self.anchor = {k: p.detach().float().clone() for k, p in self.shared_params(model).items()}
        return result

    def task_importance(self, model: DeltaModel, task: Task, train: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
        """Each shared-delta parameter's importance for ``task``, just trained, added to the running
        sum: EWC's Fisher (a subclass measures it otherwise, e.g. SI along the training path)."""
        return self.estimate_fisher(model, task, train, config)

    def estimate_fisher(self, model: DeltaModel, task: Task, train: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
        """Mean squared gradient of each shared-delta parameter over ``fisher_samples`` training
        examples of ``task`` (a seeded sample keeping the label proportions), one example at a time
        (dropout off). (The mean of :meth:`magnitude` of :meth:`objective`'s gradient: a subclass
        changes those two for another importance, e.g. MAS's.)"""
        params = self.shared_params(model)
        fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        rows = sample_rows(train, self.fisher_samples, config.seed)
        with model.acting(*self.active(task.name)):
            for grads in example_grads(model, list(params.values()), train, rows, config.precision, self.objective):
                for (k, _), g in zip(params.items(), grads):
                    if g is not None:
                        fisher[k] += self.magnitude(g.float()) / len(rows)
        return fisher

    @staticmethod
    def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The function of one example whose gradient measures a parameter's importance: EWC's
        loss of the gold label (or answer)."""
        return token_loss(logits, labels)

    @staticmethod
    def magnitude(grad: torch.Tensor) -> torch.Tensor:
        """What one example's gradient adds to the importance: EWC's squared gradient."""
        return grad ** 2

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        out.update({f"ewc.fisher.{k}": v for k, v in self.fisher.items()})
        out.update({f"ewc.anchor.{k}": v for k, v in self.anchor.items()})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        device = model.device
        self.fisher = {k[len("ewc.fisher."):]: v.to(device) for k, v in state.items() if k.startswith("ewc.fisher.")}
        self.anchor = {k[len("ewc.anchor."):]: v.to(device) for k, v in state.items() if k.startswith("ewc.anchor.")}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ewc_lambda": self.ewc_lambda, "fisher_samples": self.fisher_samples}

"""``agem``: one shared delta whose every step is kept from raising the loss on a memory of earlier tasks.

Averaged Gradient Episodic Memory, Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong
Learning with A-GEM" (ICLR 2019, arXiv:1812.00420), after GEM (Lopez-Paz & Ranzato 2017). At each
step, with g the gradient of the new task's batch loss and g_ref the gradient of the loss on a
batch drawn from the episodic memory of earlier tasks, the step follows

    g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref    when gᵀ g_ref < 0,    else g̃ = g,

the gradient nearest to g whose first-order change of the memory loss is not an increase (GEM
asks that of every earlier task; A-GEM of their average, one constraint in closed form). The
memory's examples are never trained on directly: they only veto directions.

How we depart from the paper:

- The memory is replay's (:mod:`.replay`): a seeded, task-balanced budget of ``memory_size``
  training examples, restored exactly on resume. ``sample_size`` examples are drawn from it per
  step (default: the batch size).
- The parameters are those one step trains: the shared delta and the new task's head. The
  memory loss runs each earlier task's rows through the shared delta and that task's own frozen
  head, so g_ref is zero on the new head and the projection moves only the delta.
- The paper trains one epoch per task with plain SGD; ours runs the shared training recipe
  (AdamW, early stopping on dev, gradient clipping after the projection), so the constraint holds
  for the gradient each step starts from, not for AdamW's rescaled step.
- g_ref is computed from the memory loss times ``REF_SCALE`` (a power of two, so exact), which
  the projection cancels: under fp16 autocast the memory's gradients would otherwise underflow.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import AdjustGrads, TrainConfig, distributed
from .base import check_option
from .replay import Replay


REF_SCALE = 2.0 ** 12


def project(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor | None]) -> bool:
    """A-GEM's projection of ``grads`` (in place) against ``refs`` (None: a zero reference), as
    one vector over all the tensors. Returns whether they conflicted (and so were projected)."""
    pairs = [(g, r) for g, r in zip(grads, refs) if r is not None]
    if not pairs:
        return False
    dot = sum((g.double() * r.double()).sum() for g, r in pairs)
    norm = sum((r.double() ** 2).sum() for _, r in pairs)
    if not bool((dot < 0) & (norm > 0) & torch.isfinite(norm)):  # (one host sync a step: the branch is the method)
        return False
    scale = dot / norm
    for g, r in pairs:
        g.sub_((scale * r.double()).to(g.dtype))
    return True


class AGEM(Replay):
    name = "agem"
    description = ("one shared delta; each step's gradient projected so the loss on a seeded, task-balanced memory "
                   "of earlier tasks' examples does not rise (A-GEM)")
    defaults = {"memory_size": 200, "sample_size": None}
    vetoed_by = "the memory's"  # for the per-task count of projected steps
    data_parallel_why = "its gradient projection runs outside the data-parallel model"

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), memory_size: int = 200,
                 sample_size: int | None = None) -> None:
        super().__init__(methods, memory_size)
        if sample_size is not None:
            check_option(self.name, "sample_size", sample_size, lambda n: n >= 1, "an integer >= 1", integer=True)
        self.sample_size = sample_size
        self.projected = self.steps = 0  # this task's steps, and those whose gradient was projected

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        return None  # the memory only vetoes directions; it adds no loss

    def batches(self, task: Task, config: TrainConfig):
        """A function giving one step's memory picks per call (None: the memory is empty)."""
        return self.memory_batches(task, config, self.sample_size)

    def correct(self, model: DeltaModel, data: Any, live: list[torch.Tensor], picks: Any) -> bool:
        """Project the ``.grad`` of ``live`` against the memory's gradient on ``picks``; returns
        whether they conflicted."""
        # scaled by a power of two (exact), which the projection cancels: under fp16 autocast
        # the memory's gradients would otherwise underflow (an overflow gives no projection)
        loss = self.memory_loss(model, data, picks) * REF_SCALE
        refs = torch.autograd.grad(loss, live, allow_unused=True)
        return project([p.grad for p in live], refs)

    def grad_change(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any) -> AdjustGrads | None:
        draw = self.batches(task, config)
        if draw is None:
            return None

        def adjust(params: Sequence[torch.Tensor]) -> None:
            live = [p for p in params if p.grad is not None]
            if not live:
                return
            self.projected += self.correct(model, data, live, draw())
            self.steps += 1

        return adjust

    def train(self, model, tasks, config, data, callback):
        self.projected = self.steps = 0
        result = super().train(model, tasks, config, data, callback)
        if self.steps and distributed.is_main():  # how often the memory vetoed: A-GEM's own diagnostic
            tqdm.write(f"task {tasks[0].name} ({self.name}): {self.projected} of {self.steps} steps' gradients conflicted "
                       f"with {self.vetoed_by} and were projected")
        return result

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in super().describe().items() if k != "replay_batch"}
        return {**out, "sample_size": self.sample_size}

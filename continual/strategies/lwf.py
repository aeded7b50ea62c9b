"""``lwf``: one shared delta, distilled from its own previous values on the new task's inputs.

Learning without Forgetting, Li & Hoiem (ECCV 2016; TPAMI 2018): before a new task is trained the
model's outputs for the *old* tasks are recorded on the new task's inputs, and training adds a
distillation loss that keeps those outputs, ``λ_o · T² · KL(softmax(old / T) ‖ softmax(new / T))``,
beside the new task's own loss. Paper defaults, used here: ``temperature=2``, ``alpha`` (λ_o) ``=1``.

On deltas the old model is the shared delta as it was before this task (kept as a frozen copy, the
reserved task ``shared_delta_old``):

- classification: each earlier classification task's head on the new inputs, through the copy
  (teacher) and through the delta being trained (student: the same forward pass as the new task's
  loss, its pooled states read at the head, so the student costs no second pass);
- generative: the LM's next-token distributions at the new task's answer positions, through the
  copy and through the delta being trained (all generative tasks share the LM head, so this one
  distribution stands for every earlier generative task).

How we depart from the paper: the teacher's outputs are computed in each step (one extra forward
pass without gradients) instead of once before training, so they follow the batches' shuffling and
padding exactly; earlier generative tasks are distilled only while a generative task trains (a
classifier's inputs give the LM nothing to answer), and earlier classifiers only while a classifier
trains. KL instead of the paper's soft cross-entropy: the same gradient, and 0 when nothing moved.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig
from .base import check_option, finite_at_least
from .shared_delta import SHARED, _SharedDelta

OLD = "shared_delta_old"  # the frozen copy of the shared delta before the task being trained


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over rows: 0 when equal."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (temperature ** 2) * F.kl_div(s, t, log_target=True, reduction="batchmean")


class LwF(_SharedDelta):
    name = "lwf"
    description = "one shared delta; distils its previous values' outputs (old heads, or the LM) on the new task's inputs"
    defaults = {"alpha": 1.0, "temperature": 2.0}
    data_parallel = False  # the teacher's pass runs outside the data-parallel model
    reserved = (SHARED, OLD)

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__(methods)
        for key, v, low in (("alpha", alpha, 0.0), ("temperature", temperature, 1e-6)):
            check_option("lwf", key, v, finite_at_least(low), f"a finite number >= {low:g}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.seen: list[Task] = []

    def prepare(self, model: DeltaModel, task: Task) -> None:
        super().prepare(model, task)
        if OLD not in model.tasks and self.seen:  # (after the head: the head's seeded start is seq-delta's)
            model.add_task(OLD, self.methods)  # never active in training, so it never trains (not frozen:
            # freezing folds some methods' parameters, and the copy must keep the shared delta's layout)

    def finish(self, model: DeltaModel, task: Task) -> None:
        super().finish(model, task)
        self.remember(task)

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        old = [t for t in self.seen if t.name != task.name and t.generative == task.generative]
        if not old or self.alpha == 0:
            return None
        model.task(OLD).deltas.load_state_dict(model.task(SHARED).deltas.state_dict())  # the teacher: the delta as it is now
        if task.generative:
            return self._generative_term(model, task)
        return self._classifier_term(model, task, [t.name for t in old])

    def _teacher(self, model: DeltaModel, names: Sequence[str], fn: Any) -> Any:
        was_training = model.training
        model.eval()  # the teacher's outputs without dropout
        try:
            with torch.no_grad(), model.acting(OLD, *names):
                return fn()
        finally:
            model.train(was_training)

    def _generative_term(self, model: DeltaModel, task: Task):
        def term(batch: dict[str, torch.Tensor], labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            teacher = self._teacher(model, [task.name], lambda: model(**batch))
            answer = labels != -100  # the answer's positions: what the LM is asked to produce
            return self.alpha * distillation(logits[answer], teacher[answer], self.temperature)

        return term

    def _classifier_term(self, model: DeltaModel, task: Task, old: list[str]):
        states: dict[str, Any] = {}
        # the new task's head receives the pooled-to-be token states of the delta being trained
        hook = model.task(task.name).head.register_forward_pre_hook(lambda m, args: states.update(args=args))
        self._hooks = getattr(self, "_hooks", []) + [hook]

        def term(batch: dict[str, torch.Tensor], labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            hidden, mask = states.pop("args")
            teacher_hidden = self._teacher(model, [task.name], lambda: model.encode(**batch))
            total = logits.new_zeros((), dtype=torch.float32)
            for name in old:
                head = model.task(name).head
                with torch.no_grad():
                    was = head.training
                    head.eval()
                    target = head(*teacher_hidden)
                    head.train(was)
                total = total + distillation(head(hidden, mask), target, self.temperature)
            return self.alpha * total

        return term

    def train(self, model, tasks, config, data, callback):
        try:
            return super().train(model, tasks, config, data, callback)
        finally:
            for hook in getattr(self, "_hooks", []):
                hook.remove()
            self._hooks = []

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "alpha": self.alpha, "temperature": self.temperature}

"""``mas``: one shared delta whose parameters are anchored by how much the delta's outputs depend on them.

Memory Aware Synapses, Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, "Memory Aware Synapses:
Learning what (not) to forget" (ECCV 2018). A parameter θ_i's importance is how sensitive the
learned function F is to it, measured without labels:

    Ω_i = mean over examples x of | ∂ ‖F(x)‖²₂ / ∂θ_i |

(F: the outputs before the softmax), accumulated over the tasks seen so far; training the next task
adds λ · Σ_i Ω_i (θ_i − θ*_i)² to its loss, θ* being the parameters as the last task left them.
Where EWC's Fisher weighs a parameter by the gradient of the gold label's loss, MAS needs no label
(the paper estimates Ω on unlabelled data too). Here θ is the shared delta, as for :mod:`.ewc`,
whose estimation, penalty and saved state this reuses (under the same keys). Defaults:
``mas_lambda=1`` (Avalanche's MAS default too) and
``importance_samples=64`` training examples per task, one at a time, dropout off.

How we depart from the paper:

- F of a classification task is its own head's logits (a task's head is frozen after its task,
  as under every shared-delta strategy); of a generative task, the language model's logits at the
  answer's tokens (the positions its loss is on), averaged over those positions so a long answer
  does not outweigh a short one.
- A generative answer token's ‖F‖² is divided by the vocabulary's size: the squared norm of a
  language model's 49k logits outweighs a classifier's by four orders of magnitude, and at λ = 1
  it froze the delta after the first task (SmolLM2, ``standard-5``: every later task kept the
  score it had before its own training). A classifier's is the paper's sum (dividing it by the
  number of labels too weakened MAS on MiniLM's default stream from 0.760 to 0.727 at λ = 1).
- The examples are a seeded sample of the task's training split (as for EWC), not all of it.
- Ω is summed over tasks, with no decay (Avalanche's MAS keeps a moving average instead).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DEFAULT_METHOD
from adapters.model import MethodSpec

from .base import check_option, finite_at_least
from .der import logit_rows
from .ewc import EWC


class MAS(EWC):
    name = "mas"
    description = ("one shared delta; MAS: parameters pulled toward their last anchor, weighted by how much the "
                   "delta's outputs depend on them (no labels needed)")
    defaults = {"mas_lambda": 1.0, "importance_samples": 64}

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), mas_lambda: float = 1.0,
                 importance_samples: int = 64) -> None:
        check_option("mas", "mas_lambda", mas_lambda, finite_at_least(0), "a finite number >= 0")
        check_option("mas", "importance_samples", importance_samples, lambda v: v >= 1, "an integer >= 1", integer=True)
        # EWC's penalty is (strength / 2) · Σ F Δ²; MAS's λ · Σ Ω Δ²
        super().__init__(methods, ewc_lambda=2.0 * float(mas_lambda), fisher_samples=importance_samples)
        self.mas_lambda = float(mas_lambda)

    @staticmethod
    def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """‖F(x)‖²₂ of one example: a classifier's logits; for a generative answer, its tokens'
        logit rows' squared norms over the vocabulary's size, averaged over the answer's tokens
        (the labels only say where the answer is)."""
        rows = logit_rows(logits, labels).float() ** 2
        return rows.sum(-1).mean() if logits.dim() == 2 else rows.mean()

    @staticmethod
    def magnitude(grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in super().describe().items() if k not in ("ewc_lambda", "fisher_samples")}
        return {**out, "mas_lambda": self.mas_lambda, "importance_samples": self.fisher_samples}

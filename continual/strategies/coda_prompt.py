"""``coda-prompt``: one pool of prompt components shared by every task, each task adding its own (CODA-Prompt).

CODA-Prompt (Smith et al., CVPR 2023; the method is :mod:`adapters.methods.coda_prompt`): each
input's prompt is a weighted sum of the pool's components, weighted by its query's similarity to
each component's key through that component's attention vector, so nothing selects and everything
learns from the task's loss. Task t trains only its own ``pool_size / tasks`` components, keys and
attention vectors, set up orthogonal to the earlier tasks' when it starts; the earlier tasks' are
held fixed, so a new task can change an old input's prompt only through the weight the old input
gives the new components. Nothing tells the model the task at test time.

Options: ``ortho_lambda`` (the paper's μ), the weight of the orthogonality penalty
``Σ_X ‖X̂ X̂ᵀ − I‖²_F`` over the components, keys and attention vectors in use (X̂: the rows
normalised; the paper's has unit rows by initialisation, ours are scaled, see the method), added to
each step's loss. Default 0.0: the authors' released scripts set μ = 0, the orthogonal
initialisation doing its work. The pool's sizes are the method's (``--method
coda_prompt:pool_size=100,prompt_length=8,tasks=10``, the paper's); ``tasks`` must cover the stream.

How we depart from the paper: each task keeps its own classifier head (the paper's is one head
over all classes, other tasks' logits masked in training); without a task id the run's router picks
the head, as for L2P (``prompt-pool``). See the method's docstring for the rest.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig
from .base import check_option, finite_at_least
from .query_prompts import TaskSlots


def ortho_penalty(rows: torch.Tensor) -> torch.Tensor:
    """‖X̂ X̂ᵀ − I‖²_F for ``rows`` (n, ...) flattened to (n, D) and each row normalised: the sum of
    the squared cosines between different rows (zero when they are orthogonal)."""
    x = F.normalize(rows.reshape(rows.shape[0], -1).float(), dim=1)
    return (x @ x.t() - torch.eye(x.shape[0], device=x.device)).pow(2).sum()


class CodaPrompt(TaskSlots):
    name = "coda-prompt"
    description = ("one pool of prompt components shared by all tasks, each task adding its own; each input weighs "
                   "them by learned keys and attention (CODA-Prompt; --method coda_prompt)")
    method, example = "coda_prompt", "pool_size=100,tasks=10"
    defaults = {"ortho_lambda": 0.0}

    def __init__(self, methods: Sequence[MethodSpec] = ("coda_prompt",), ortho_lambda: float = 0.0) -> None:
        super().__init__(methods)
        check_option("coda-prompt", "ortho_lambda", ortho_lambda, finite_at_least(0), "a finite number >= 0")
        self.ortho_lambda = float(ortho_lambda)

    def too_long(self, n: int) -> str:  # the suggestion keeps each task's share
        config = self.methods[0]
        return (f"coda-prompt gives each task pool_size / tasks components, but the pool is split for {config.tasks} "
                f"tasks and the stream has {n}; give --method coda_prompt:pool_size={config.per_task * n},tasks={n} "
                f"({config.per_task} components a task, as now)")

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        if not self.ortho_lambda:
            return None
        pool, used = self.delta(model), self.current + 1

        def penalty(batch, labels, logits):
            return self.ortho_lambda * sum(ortho_penalty(torch.cat(list(getattr(pool, kind))[:used]))
                                           for kind in ("components", "keys", "attention"))
        return penalty

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ortho_lambda": self.ortho_lambda}

"""``o-lora``: a new LoRA per task, kept orthogonal to every earlier task's; all of them act at once.

Orthogonal subspace learning, Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning" (Findings of EMNLP 2023). Each task t gets a LoRA ``ΔW_t = B_t A_t``; the rows
of ``A_t`` (our ``lora_A``, r × d_in) span the input subspace the task writes through. Training
task t adds, for every earlier task i and every LoRA site,

    λ1 · Σ_{j,k} (A_i A_tᵀ)[j, k]²        (the paper's L_orth, with O_{i,t} = A_iᵀ A_t in its layout)

plus ``λ2 · Σ ‖θ_t‖²`` over the new LoRA's parameters, so the new task learns in directions the
earlier tasks do not read, and their outputs change little when its LoRA is added. Earlier LoRAs
are frozen; inference runs the sum of all tasks' LoRAs, with no task id. Paper defaults:
λ1 = 0.5, λ2 = 0 (its released scripts; the paper tunes λ2 per order), rank 8 on query and value of
T5-large. Ours: ``orth_lambda=0.5``, ``l2_lambda=0.0``, the LoRA config given (``--method lora``).

How we depart from the paper: the paper trains T5/LLaMA generatively with instructions; here a
classification task keeps its own head (chosen by the router without a task id) and a generative
task answers through the model's LM head. The penalty is computed in fp32 once per step from the
parameters (it does not depend on the batch).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig
from .base import check_option, finite_at_least
from .summed_lora import SummedLoRA, lora_sites


def orthogonality(new: dict[str, torch.Tensor], old: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Σ over earlier tasks and sites of ‖A_old A_newᵀ‖²_F: zero when every row of the new ``A``
    is orthogonal to every row of the earlier ones."""
    total = next(iter(new.values())).new_zeros((), dtype=torch.float32)
    for earlier in old:
        for site, a in new.items():
            total = total + (earlier[site].float() @ a.float().t()).pow(2).sum()
    return total


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """How much two LoRA subspaces share: ‖Q_a Q_bᵀ‖²_F / min(r_a, r_b) for orthonormal bases
    Q of the rows of ``a`` and ``b``; 0 for orthogonal subspaces, 1 when one contains the other."""
    qa = torch.linalg.qr(a.detach().float().t()).Q.t()
    qb = torch.linalg.qr(b.detach().float().t()).Q.t()
    return float((qa @ qb.t()).pow(2).sum() / min(qa.shape[0], qb.shape[0]))


class OLoRA(SummedLoRA):
    name = "o-lora"
    description = "a new LoRA + head per task, orthogonal to the earlier tasks' LoRAs; all LoRAs act at once (no task id)"
    defaults = {"orth_lambda": 0.5, "l2_lambda": 0.0}
    data_parallel = False  # the penalty is added outside the data-parallel model

    def __init__(self, methods: Sequence[MethodSpec] = ("lora",), orth_lambda: float = 0.5, l2_lambda: float = 0.0) -> None:
        super().__init__(methods)
        for key, value in (("orth_lambda", orth_lambda), ("l2_lambda", l2_lambda)):
            check_option("o-lora", key, value, finite_at_least(0), "a finite number >= 0")
        self.orth_lambda, self.l2_lambda = float(orth_lambda), float(l2_lambda)

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        new = {k: m.lora_A for k, m in lora_sites(model, task.name).items()}
        old = [{k: m.lora_A for k, m in lora_sites(model, t).items()} for t in self.trained if t != task.name]
        params = [p for p in model.task(task.name).deltas.parameters()]
        if not (old and self.orth_lambda) and not self.l2_lambda:
            return None

        def term(batch, labels, logits) -> torch.Tensor:
            total = self.orth_lambda * orthogonality(new, old) if old and self.orth_lambda else 0.0
            if self.l2_lambda:
                total = total + self.l2_lambda * sum(p.float().pow(2).sum() for p in params)
            return total

        return term

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "orth_lambda": self.orth_lambda, "l2_lambda": self.l2_lambda}

"""``gem``: one shared delta whose every step is kept from raising the loss of *each* earlier task.

Gradient Episodic Memory, Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning"
(NeurIPS 2017, arXiv:1706.08840). With g the gradient of the new task's batch loss and g_k the
gradient of the loss on earlier task k's episodic memory, the step follows the z nearest to g that
raises no earlier task's memory loss to first order:

    minimise ½ ‖z − g‖²   subject to   ⟨z, g_k⟩ ≥ 0 for every earlier task k,

solved only when some ⟨g, g_k⟩ < 0. With G the matrix whose rows are the g_k, its dual is a
quadratic program in one variable per earlier task,

    minimise ½ vᵀ (G Gᵀ) v + (G g)ᵀ v   subject to   v ≥ 0,    then   z = g + Gᵀ v.

The paper adds a small constant γ to the dual solution to favour backward transfer; we ask
v ≥ γ (``memory_strength``). With γ = 0 it is the exact projection, and with one earlier task
too, A-GEM's (:mod:`.agem`: one constraint, on the average over the earlier tasks).

How we depart from the paper:

- The memory is replay's (:mod:`.replay`): a seeded, task-balanced budget of ``memory_size``
  training examples, restored exactly on resume. The paper takes g_k over all of task k's memory
  at every step; we draw ``sample_size`` of its examples per step (default: the batch size), so a
  step costs one extra forward and backward per earlier task whatever the budget.
- The dual is solved by cyclic coordinate descent on v − γ ≥ 0 in float64 (exact for this box
  constraint; one variable per earlier task, so it converges in a few sweeps) instead of a
  general QP solver: nothing to install, and it runs on the device the gradients are on.
- As in :mod:`.agem`: the parameters are the shared delta and the new task's head (g_k is zero on
  that head), the shared recipe (AdamW, early stopping, clipping after the projection) runs the
  step, and each memory loss is scaled by ``REF_SCALE`` against fp16 underflow (a power of two:
  dividing g_k by it again before the projection is exact, and the margin needs the true g_k). A task whose g_k overflowed is left out of that
  step's constraints, as A-GEM skips the step's projection.
- γ defaults to 0.5, Avalanche's default ``memory_strength`` (read from its installed source).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig
from .agem import REF_SCALE, AGEM
from .base import check_option, finite_at_least, flat

SWEEPS = 1000  # coordinate-descent sweeps at most; one variable per earlier task, so a few usually do
TOLERANCE = 1e-12  # stop when no variable moves by more than this, relative to the largest


def solve_dual(gram: torch.Tensor, linear: torch.Tensor, floor: float) -> torch.Tensor:
    """argmin over v >= floor of ½ vᵀ gram v + linearᵀ v (gram symmetric positive semi-definite),
    by cyclic coordinate descent, each coordinate minimised exactly in turn (float64)."""
    gram, linear = gram.double().cpu(), linear.double().cpu()
    v = torch.full_like(linear, floor)
    diag = gram.diagonal()
    for _ in range(SWEEPS):
        moved = 0.0
        for i in range(len(v)):
            if diag[i] <= 0:  # a zero gradient constrains nothing
                continue
            new = max(floor, float(v[i] - (gram[i] @ v + linear[i]) / diag[i]))
            moved = max(moved, abs(new - float(v[i])))
            v[i] = new
        if moved <= TOLERANCE * max(1.0, float(v.abs().max())):
            break
    return v


def project(grads: Sequence[torch.Tensor], refs: Sequence[Sequence[torch.Tensor | None]], memory_strength: float,
            ref_scale: float = 1.0) -> bool:
    """GEM's projection of ``grads`` (in place, as one vector over all the tensors) against one
    reference gradient per earlier task (``refs[k][j]``: task k's gradient of tensor j; None: zero),
    given times ``ref_scale``. Returns whether some task's reference conflicted (and so the
    gradients were projected). Without a margin the scale cancels; with one it does not (z adds
    γ g_k), so the references are divided by it first."""
    rows = [flat(r, grads, torch.float64) for r in refs if any(t is not None for t in r)]
    rows = [r for r in rows if bool(torch.isfinite(r).all())]  # an overflowed memory gradient: no constraint
    if not rows:
        return False
    G, g = torch.stack(rows) / ref_scale, flat(grads, grads, torch.float64)
    dots = G @ g
    if not bool((dots < 0).any()):  # (one host sync a step: the branch is the method)
        return False
    v = solve_dual(G @ G.T, dots, memory_strength).to(G.device)
    z = g + G.T @ v
    start = 0
    for t in grads:
        t.copy_(z[start:start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return True


class GEM(AGEM):
    name = "gem"
    description = ("one shared delta; each step's gradient projected so that no earlier task's loss on its part of a "
                   "seeded, task-balanced memory rises (GEM)")
    defaults = {"memory_size": 200, "sample_size": None, "memory_strength": 0.5}
    vetoed_by = "an earlier task's memory"

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), memory_size: int = 200,
                 sample_size: int | None = None, memory_strength: float = 0.5) -> None:
        super().__init__(methods, memory_size, sample_size)
        check_option(self.name, "memory_strength", memory_strength, finite_at_least(0), "a finite number >= 0")
        self.memory_strength = memory_strength

    def batches(self, task: Task, config: TrainConfig):
        return self.memory_batches(task, config, self.sample_size, per_task=True)  # one batch per earlier task

    def correct(self, model: DeltaModel, data: Any, live: list[torch.Tensor], picks: Any) -> bool:
        refs = [torch.autograd.grad(self.memory_loss(model, data, p) * REF_SCALE, live, allow_unused=True) for p in picks]
        return project([p.grad for p in live], refs, self.memory_strength, REF_SCALE)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "memory_strength": self.memory_strength}

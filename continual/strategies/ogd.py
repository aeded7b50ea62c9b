"""``ogd``: one shared delta whose steps keep out of the directions that earlier tasks' outputs depend on.

Orthogonal Gradient Descent, Farajtabar, Azizan, Mott & Li, "Orthogonal Gradient Descent for
Continual Learning" (AISTATS 2020, arXiv:1910.07104), in its ground-truth-logit form (OGD-GTL).
After each task, for a sample of its training examples x with gold label y, the gradient
∇_θ f_y(x; θ) of the gold logit is taken at the trained parameters, orthogonalised against the
directions kept so far (Gram-Schmidt) and, if anything is left, normalised and kept. Training a
later task then follows

    g̃ = g − Σ_v ⟨g, v⟩ v        (v over the kept orthonormal directions),

so to first order no step moves an earlier example's gold logit. Unlike A-GEM and GEM no example
is kept: only directions in parameter space (``samples`` per task), and no extra pass runs per step.

How we depart from the paper:

- θ is the shared **delta** (the backbone is frozen; each task's head is its own and frozen after
  its task), so a direction has the delta's size, not the network's; the new task's head is not
  projected (no earlier output depends on it).
- For a generative task the gold "logit" is the mean, over the answer's tokens, of the LM's logit
  of each gold token (the paper's tasks are classifiers).
- The paper trains with plain SGD; ours runs the shared recipe (AdamW, early stopping, gradient
  clipping after the projection), so the constraint holds for the gradient each step starts from,
  not for AdamW's rescaled step (as for :mod:`.agem`).
- A direction whose part outside the kept ones is below ``1e-6`` of its norm is dropped (it adds
  nothing numerically). Gram-Schmidt runs twice per direction in float64, and the directions are
  kept in float32, as part of the run's saved state (``samples`` × the delta's size per task).
- ``samples=32`` per task is ours, chosen for the state's size (32 × the delta's size per task).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import AdjustGrads, TrainConfig, distributed
from ..training.data import sample_rows
from .base import check_option, flat
from .der import logit_rows
from .ewc import example_grads
from .shared_delta import _SharedDelta

DROP = 1e-6  # a direction whose new part is below this share of its norm is not kept


def gold_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """f_y(x): the gold label's logit (a classifier), or the mean of the gold tokens' logits over
    the answer (a language model; the labels say where the answer is)."""
    rows = logit_rows(logits, labels).float()
    gold = labels if logits.dim() == 2 else labels[labels != -100]
    return rows.gather(-1, gold[:, None]).mean()


def new_part(basis: torch.Tensor, added: Sequence[torch.Tensor], g: torch.Tensor) -> torch.Tensor | None:
    """``g``'s part outside the orthonormal rows of ``basis`` (k, n) and the orthonormal vectors
    ``added`` since, normalised (float64); None when it is below ``DROP`` of ``g``'s norm."""
    norm = float(g.norm())
    if not norm or not torch.isfinite(g).all():
        return None
    v, b = g.double(), basis.double()
    for _ in range(2):  # twice: one Gram-Schmidt pass leaves rounding along the basis
        v = v - b.T @ (b @ v)
        for u in added:  # this task's directions one by one: stacking them anew per example copied them all
            v = v - (u @ v) * u
    left = float(v.norm())
    return None if left < DROP * norm else v / left


def add_direction(basis: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``basis`` with ``g``'s new part appended as a row (``basis`` itself when there is none)."""
    v = new_part(basis, (), g)
    return basis if v is None else torch.cat([basis, v.to(basis.dtype)[None]])


def project_out(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor], basis: torch.Tensor) -> None:
    """g ← g − Bᵀ(B g), in place, g the ``grads`` of ``params`` flattened in order, as the basis's
    rows were (a None gradient counts as zero and stays None: that parameter does not move)."""
    if not len(basis) or all(t is None for t in grads):
        return
    g = flat(grads, params, torch.float32)
    change = basis.T @ (basis @ g)
    start = 0
    for t, p in zip(grads, params):
        if t is not None:
            t.sub_(change[start:start + p.numel()].view_as(t).to(t.dtype))
        start += p.numel()


class OGD(_SharedDelta):
    name = "ogd"
    description = ("one shared delta; each step's gradient made orthogonal to the gradients of earlier tasks' "
                   "gold logits (OGD)")
    defaults = {"samples": 32}
    data_parallel = False
    data_parallel_why = "its gradient projection runs outside the data-parallel model"

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), samples: int = 32) -> None:
        super().__init__(methods)
        check_option(self.name, "samples", samples, lambda v: v >= 1, "an integer >= 1", integer=True)
        self.samples = samples
        self.basis = torch.zeros(0, 0)  # (directions, the shared delta's size); sized at the first task's end

    def grad_change(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any) -> AdjustGrads | None:
        if not len(self.basis):
            return None
        params = list(self.shared_params(model).values())
        basis = self.basis.to(model.device)
        return lambda _: project_out([p.grad for p in params], params, basis)

    def train(self, model, tasks, config, data, callback):
        result = super().train(model, tasks, config, data, callback)
        if self.ends_stream(tasks):  # no later step is projected off this task's directions
            return result
        params = list(self.shared_params(model).values())
        basis = self.basis if len(self.basis) else torch.zeros(0, sum(p.numel() for p in params))
        basis, added = basis.to(model.device, torch.float64), []  # grown in float64, kept in float32
        for t in tasks:
            train = data(t)["train"]
            with model.acting(*self.active(t.name)):
                for grads in example_grads(model, params, train, sample_rows(train, self.samples, config.seed),
                                           config.precision, gold_logit):
                    v = new_part(basis, added, flat(grads, params, torch.float32))
                    if v is not None:
                        added.append(v)
        self.basis = torch.cat([basis, *(v[None] for v in added)]).float().cpu()  # one copy per task
        if distributed.is_main():  # what the method holds: it grows with every task, in memory and in the state
            tqdm.write(f"task {tasks[-1].name} (ogd): {len(added)} new directions kept, {len(self.basis)} in all "
                       f"({self.basis.numel() * 4 / 1e6:.1f} MB)")
        return result

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        return {**super().state(model), "ogd.basis": self.basis.contiguous()}

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        self.basis = state.get("ogd.basis", torch.zeros(0, 0)).float().cpu()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "samples": self.samples}

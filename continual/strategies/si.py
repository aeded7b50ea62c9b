"""``si``: one shared delta whose parameters are anchored by what each did for the loss along its path.

Synaptic Intelligence, Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence"
(ICML 2017). While a task trains, each parameter θ_k collects its share of the drop of the task's
loss L along the path the optimiser takes,

    ω_k = − Σ_t g_k(t) · Δθ_k(t)        (g = ∂L/∂θ at step t, Δθ(t) the step's own move),

and when the task ends its importance is Ω_k += ω_k / ((Δ_k)² + ξ), Δ_k being how far the task
moved it in all and ξ a damping term for parameters that barely moved. Training the next task adds
c · Σ_k Ω_k (θ_k − θ*_k)² to its loss, θ* the values the last task left. Unlike EWC and MAS it
costs no extra pass over data: the path integral uses the gradients training computes anyway,
read through ``Strategy.grad_change`` after each backward pass. g is the gradient of the task's
own loss, as the paper's ω counts it; training differentiates the penalised loss, so the penalty's
gradient 2c · Ω · (θ − θ*) is subtracted from it exactly, and a step whose gradient was not finite
(an fp16 overflow, which the loss scaler skips) adds nothing. θ is the shared delta, as for
:mod:`.ewc`, whose penalty, anchor and saved state this reuses (under the same keys). Defaults are
ours (the paper tunes c per benchmark): ``si_lambda`` c = 1, ``xi`` ξ = 1e-3, on the scale of a
delta's squared move over one task (Avalanche's SI uses ξ = 1e-7); tune ``si_lambda`` per stream.

How we depart from the paper:

- The training recipe is the shared one: the path runs over every step taken, while the task's
  parameters end at their best-on-dev values, from which Δ is measured; the last step's move is
  not seen (the next gradient, which would see it, is never computed), one step of the task's.
- An ω below zero (a parameter whose moves raised the loss, on balance) gives no importance
  rather than a negative one, which would reward moving it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import AdjustGrads, TrainConfig
from .base import check_option, finite_at_least
from .ewc import EWC


class SI(EWC):
    name = "si"
    description = ("one shared delta; Synaptic Intelligence: parameters pulled toward their last anchor, weighted by "
                   "their part in each task's loss drop along its training path")
    defaults = {"si_lambda": 1.0, "xi": 1e-3}
    importance_pass = False  # read from training's own gradients: computed after every task

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), si_lambda: float = 1.0, xi: float = 1e-3) -> None:
        check_option("si", "si_lambda", si_lambda, finite_at_least(0), "a finite number >= 0")
        check_option("si", "xi", xi, lambda v: 0 < v < float("inf"), "a finite number > 0")
        super().__init__(methods, ewc_lambda=2.0 * float(si_lambda))  # EWC's (strength / 2) · Σ F Δ² is c · Σ Ω Δ²
        self.si_lambda, self.xi = float(si_lambda), float(xi)
        self.start: dict[str, torch.Tensor] = {}  # this task's: the delta where it started
        self.path: dict[str, torch.Tensor] = {}   # ω so far
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the last step's (g, θ before its move)

    def grad_change(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any) -> AdjustGrads:
        shared = self.shared_params(model)
        self.start = {k: p.detach().float().clone() for k, p in shared.items()}
        self.path = {k: torch.zeros_like(v) for k, v in self.start.items()}
        self.last = {}

        def track(params: Sequence[torch.Tensor]) -> None:
            self.walk(shared)
            for k, p in shared.items():
                if p.grad is None:
                    continue
                g = p.grad.detach().float()
                if self.anchor:  # the task's own gradient: the penalty's, 2c·Ω·(θ − θ*), taken out
                    g = g - self.ewc_lambda * self.fisher[k] * (p.detach().float() - self.anchor[k])
                g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                self.last[k] = (g, p.detach().float().clone())

        return track

    def walk(self, shared: dict[str, torch.Tensor]) -> None:
        """Add the last step's −g · Δθ to ω (Δθ: where the parameters are now, less where they were)."""
        for k, (g, before) in self.last.items():
            self.path[k] -= g * (shared[k].detach().float() - before)
        self.last = {}

    def task_importance(self, model: DeltaModel, task: Task, train: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
        shared = self.shared_params(model)
        if not self.start:  # nothing trained (no step ran)
            return {k: torch.zeros_like(p, dtype=torch.float32) for k, p in shared.items()}
        out = {k: (self.path[k] / ((p.detach().float() - self.start[k]) ** 2 + self.xi)).clamp_min(0)
               for k, p in shared.items()}
        self.start, self.path, self.last = {}, {}, {}
        return out

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in super().describe().items() if k not in ("ewc_lambda", "fisher_samples")}
        return {**out, "si_lambda": self.si_lambda, "xi": self.xi}

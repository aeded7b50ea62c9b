"""``magmax``: one delta fine-tuned on each task in turn, answered as the merge of its largest moves.

MagMax, Marczak, Twardowski, Trzciński & Cygert, "MagMax: Leveraging Model Merging for Seamless
Continual Learning" (ECCV 2024). Training is plain sequential fine-tuning: task t starts where
task t−1 ended and ends at θ_t. Its task vector is τ_t = θ_t − θ_0 (θ_0: the values before the
first task), and the model that answers after task t is

    θ_0 + λ · MaxMag(τ_1, …, τ_t),   MaxMag(τ_1, …, τ_t)[j] = τ_i[j] with i = argmax_i |τ_i[j]|,

each parameter taken from the task vector that moved it furthest (:func:`fusion.merge.magmax_merge`;
a tie goes to the later task). The chain of fine-tuning never sees the merge: task t+1 starts from
θ_t. The paper's argument: along a chain each τ_t already carries the earlier tasks' moves, so
the vectors agree in direction, and the entry that moved most holds the most important change of
some task; averaging would shrink it. MaxMag is associative, so
the strategy keeps the running merge, θ_0 and the chain's θ_t (three copies of the delta), not
every τ; all three are part of the run's saved state, and the delta's own values (what checkpoints
export and every score uses) are the merge.

Here θ is the shared delta (the backbone is frozen; ``seq-delta`` is the same chain without the
merge) and each task keeps its own head, trained with θ_t. ``scale`` is λ, 0.5 by default: the
value the authors' released scripts merge with. The paper selects λ on held-out data:
``scale="dev"`` does, after each task, trying each λ of :data:`SCALES` and keeping the one with
the best mean dev score over the tasks so far (the smaller λ on a tie); the run says which.

How we depart from the paper: it merges fully fine-tuned CLIP image encoders under frozen
zero-shot text heads; ours merges a delta under heads trained against the chain's θ_t, so a head
answers with a smaller move than it was trained with (λ < 1) — an effect ``scale`` trades off. A
delta's randomly initialised parts (LoRA's A, an adapter's down-projection) count their move from
their initial values, as the paper's τ counts every weight's move from the pre-trained one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from fusion.merge import MAGMAX_SCALE, magmax_merge
from streams import Task

from ..training import distributed, evaluate
from .base import check_option
from .shared_delta import _SharedDelta

PARTS = ("init", "chain", "merged")  # θ_0, the chain's θ_t, MaxMag(τ_1..τ_t): the saved state's keys
SCALES = (0.25, 0.5, 0.75, 1.0)  # the λ that scale="dev" tries after each task


class MagMax(_SharedDelta):
    name = "magmax"
    description = ("one shared delta fine-tuned on each task in turn; it answers as the merge taking each parameter "
                   "from the task that moved it most, scaled (MagMax)")
    defaults = {"scale": MAGMAX_SCALE}

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), scale: float | str = MAGMAX_SCALE) -> None:
        super().__init__(methods)
        if scale != "dev":
            check_option("magmax", "scale", scale, lambda v: 0 < v < float("inf"), "a finite number > 0 (or dev)")
        self.scale = scale if scale == "dev" else float(scale)
        self.seen: list[Task] = []  # the tasks trained so far, whose dev sets choose λ (scale="dev")
        self.init: dict[str, torch.Tensor] = {}
        self.chain: dict[str, torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}  # MaxMag of the task vectors so far (unscaled)

    def train(self, model, tasks, config, data, callback):
        shared = self.shared_params(model)
        with torch.no_grad():
            if not self.init:  # before the first task: θ_0
                self.init = {k: p.detach().float().clone() for k, p in shared.items()}
            else:  # the chain goes on from θ_{t-1}, not from the merge the last scores used
                for k, p in shared.items():
                    p.copy_(self.chain[k].to(p.dtype))
        result = super().train(model, tasks, config, data, callback)
        self.merge(shared)
        if self.scale == "dev":
            names = {t.name for t in tasks}
            self.choose_scale(model, [t for t in self.seen if t.name not in names] + list(tasks), data, config, shared)
        return result

    def merge(self, shared: dict[str, torch.nn.Parameter]) -> None:
        """Take the delta's trained values as the chain's θ_t, add τ_t to the running MaxMag, and
        put θ_0 + λ · MaxMag into the delta."""
        with torch.no_grad():
            self.chain = {k: p.detach().float().clone() for k, p in shared.items()}
            for k, p in shared.items():
                tau = self.chain[k] - self.init[k]
                before = self.merged.get(k)
                self.merged[k] = tau if before is None else magmax_merge(torch.stack([before, tau]), torch.ones(2))
        self.apply(shared, MAGMAX_SCALE if self.scale == "dev" else self.scale)

    def apply(self, shared: dict[str, torch.nn.Parameter], scale: float) -> None:
        """Put θ_0 + λ · MaxMag into the delta."""
        with torch.no_grad():
            for k, p in shared.items():
                p.copy_((self.init[k] + scale * self.merged[k]).to(p.dtype))

    def choose_scale(self, model: DeltaModel, tasks: list[Task], data: Any, config: Any,
                     shared: dict[str, torch.nn.Parameter]) -> float:
        """λ of :data:`SCALES` with the best mean dev score over ``tasks`` (the first, the smaller, on
        a tie), left in the delta."""
        means = {}
        for scale in SCALES:
            self.apply(shared, scale)
            scores = [evaluate(model, t.name, data.loader(t, "dev"), self.active(t.name), config.precision)["accuracy"]
                      for t in tasks]
            means[scale] = sum(scores) / len(scores)
        best = max(SCALES, key=lambda v: (means[v], -v))
        self.apply(shared, best)
        if distributed.is_main():  # every process scored the whole dev sets (gathered), so all chose the same
            tqdm.write(f"task {tasks[-1].name} (magmax): λ = {best} chosen on the dev sets of the {len(tasks)} task(s) so far ("
                       + ", ".join(f"{v}: {means[v]:.3f}" for v in SCALES) + ")")
        return best

    def finish(self, model: DeltaModel, task: Task) -> None:
        super().finish(model, task)
        self.remember(task)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        for part in PARTS:
            out.update({f"magmax.{part}.{k}": v for k, v in getattr(self, part).items()})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        for part in PARTS:
            prefix = f"magmax.{part}."
            setattr(self, part, {k[len(prefix):]: v.to(model.device) for k, v in state.items() if k.startswith(prefix)})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scale": self.scale}

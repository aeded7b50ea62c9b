"""``inflora``: each new task's LoRA reads only input directions the earlier tasks do not use.

Interference-free low-rank adaptation, Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation
for Continual Learning" (CVPR 2024). A LoRA ``ΔW_t = B_t A_t`` changes the layer's output for an
input x only through ``A_t x``. InfLoRA keeps, per layer, an orthonormal basis M of the subspace the
earlier tasks' inputs occupy (gradient projection memory, Saha et al. 2021), and *designs* the new
task's down-projection before training it:

    H_t = Σ x xᵀ over the new task's inputs at the layer,
    Ĥ_t = (I − M Mᵀ) H_t (I − M Mᵀ),          A_t = the top-r eigenvectors of Ĥ_t (as rows),

so ``A_t x ≈ 0`` for every earlier input (they lie in M) while ``A_t`` points where the new task's
inputs (its gradients' span, in the paper's argument) have the most energy outside M. Only ``B_t``
(zero-initialised) is trained, so the old tasks' outputs cannot change beyond the input energy M
leaves out. After the task, M grows by the fewest eigenvectors of the task's projected input
covariance that bring the share of its input energy inside M to ``threshold``. Paper defaults:
rank 10 on the attention's key and value of a ViT, threshold ε from 0.95 (first task) to 0.99,
DualGPM to keep M small. Ours: ``threshold=0.95`` for every task, ``design_samples=64`` training
examples to estimate H_t, the LoRA config given (``--method lora``).

How we depart from the paper: plain GPM (M only grows; no DualGPM switch to the complement when
M is large); one threshold for all tasks; the trained LoRAs are kept and all act at once instead
of being merged into the weights (the same function, up to float rounding). When M leaves fewer
than r free directions at a layer, the rows beyond them are zero (that layer cannot change for the
new task; a site left no direction at all is said when the task starts). ``threshold`` is in
(0, 1): at 1 the first task's basis takes the whole space. A classification task keeps its own head (the router picks it without a task id).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig, collate_rows, distributed
from ..training.data import sample_rows
from .base import check_option
from .summed_lora import SummedLoRA, lora_sites


def design(cov: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """``rank`` orthonormal rows spanning the top of ``cov`` outside the span of ``basis``
    (d_in × k, orthonormal columns); zero rows where fewer free directions remain."""
    values, vectors = _outside(cov, basis)
    free = cov.shape[0] - (basis.shape[1] if basis is not None else 0)
    rows = vectors.t()[:rank].clone()
    rows[min(free, rank):] = 0
    rows[values[:rank] <= values.abs().max() * 1e-10] = 0  # no energy there: not a direction
    return rows


def _outside(cov: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of ``cov`` projected off the span of ``basis``."""
    proj = torch.eye(cov.shape[0], dtype=cov.dtype) - (basis @ basis.t() if basis is not None else 0)
    values, vectors = torch.linalg.eigh(proj @ cov @ proj)  # ascending
    return values.flip(0), vectors.flip(1)


def grow(cov: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor | None:
    """``basis`` extended by the fewest eigenvectors of the projected ``cov`` that bring the share
    of ``cov``'s energy (its trace) inside the span to ``threshold`` (GPM's rule)."""
    d, total = cov.shape[0], float(torch.trace(cov))
    if total <= 0:
        return basis
    inside = float(torch.trace(basis.t() @ cov @ basis)) if basis is not None else 0.0
    values, vectors = _outside(cov, basis)
    values = values.clamp_min(0)
    need = threshold * total - inside
    k = int((torch.cumsum(values, 0) < need).sum()) + 1 if need > 0 else 0
    k = min(k, d - (basis.shape[1] if basis is not None else 0))
    if k == 0:
        return basis
    new = vectors[:, :k]
    return new if basis is None else torch.linalg.qr(torch.cat([basis, new], 1)).Q  # re-orthonormalised


class InfLoRA(SummedLoRA):
    name = "inflora"
    description = "a new LoRA + head per task whose down-projection avoids the earlier tasks' input subspace; only its up-projection trains"
    defaults = {"threshold": 0.95, "design_samples": 64}

    def __init__(self, methods: Sequence[MethodSpec] = ("lora",), threshold: float = 0.95, design_samples: int = 64) -> None:
        super().__init__(methods)
        # 1 is refused: GPM at 100% of the energy takes the whole numerical span of the first task's
        # inputs (the full space, for a few thousand tokens), and every later LoRA is left no direction
        check_option("inflora", "threshold", threshold, lambda v: 0 < v < 1, "in (0, 1)")
        check_option("inflora", "design_samples", design_samples, lambda v: v >= 1, "an integer >= 1", integer=True)
        self.threshold, self.design_samples = float(threshold), design_samples
        self.basis: dict[str, torch.Tensor] = {}  # site -> d_in x k orthonormal columns (float64, CPU)

    def prepare(self, model: DeltaModel, task: Task) -> None:
        super().prepare(model, task)
        t = model.task(task.name)
        model.hold(task.name, [n for n, _ in t.named_parameters() if n.endswith(".lora_A")])

    def input_covariances(self, model: DeltaModel, task: Task, train: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
        """Σ x xᵀ of the inputs at each of ``task``'s LoRA sites over ``design_samples`` training
        examples (a seeded sample keeping the label proportions; padding left out), run with every
        trained LoRA and the task's own."""
        sites = lora_sites(model, task.name)
        covs = {k: torch.zeros(m.lora_A.shape[1], m.lora_A.shape[1], dtype=torch.float64) for k, m in sites.items()}
        mask: list[torch.Tensor] = []

        def capture(key):
            def hook(module, args, output):
                x = args[0].detach()
                if x.dim() == 3 and x.shape[:2] == mask[0].shape:
                    x = x[mask[0].bool()]
                x = x.reshape(-1, x.shape[-1]).double().cpu()
                covs[key] += x.t() @ x
            return hook

        handles = [m.register_forward_hook(capture(k)) for k, m in sites.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.acting(*self.active(task.name)):
                rows = sample_rows(train, self.design_samples, config.seed)
                for start in range(0, len(rows), config.batch_size):
                    batch = collate_rows(train, rows[start:start + config.batch_size], model.tokenizer)
                    batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
                    mask[:] = [batch["attention_mask"]]
                    model(**batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return covs

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        covs = self.input_covariances(model, task, data(task)["train"], config)
        sites, blocked = lora_sites(model, task.name), 0
        with torch.no_grad():
            for key, module in sites.items():
                rows = design(covs[key], self.basis.get(key), module.lora_A.shape[0])
                module.lora_A.copy_(rows.to(module.lora_A.dtype))
                blocked += not rows.any()
        if blocked and distributed.is_main():  # said, never silent: such layers cannot learn this task
            tqdm.write(f"task {task.name} (inflora): the earlier tasks' input subspace leaves no free direction at "
                       f"{blocked} of {len(sites)} LoRA sites; their LoRA cannot change for this task "
                       f"(a lower threshold than {self.threshold} keeps more room)")
        result = super().train(model, tasks, config, data, callback)
        for key, cov in self.input_covariances(model, task, data(task)["train"], config).items():
            grown = grow(cov, self.basis.get(key), self.threshold)
            if grown is not None:
                self.basis[key] = grown
        return result

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        t = model.task(task.name)
        held = sum(p.numel() for n, p in t.named_parameters() if n in t.held)
        return super().trainable_parameters(model, task) - held

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        return {**super().state(model), **{f"inflora.basis.{k}": v for k, v in self.basis.items()}}

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        prefix = "inflora.basis."
        self.basis = {k[len(prefix):]: v.detach().cpu().double() for k, v in state.items() if k.startswith(prefix)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold, "design_samples": self.design_samples}

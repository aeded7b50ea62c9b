"""``migu``: one shared delta whose steps, after the first task, update only the output units of its
linear maps that answered the batch most strongly (MIGU).

Magnitude-based Gradient Updating, Du et al., "Unlocking Continual Learning Abilities in Language
Models" (Findings of EMNLP 2024, arXiv:2406.17245; code: github.com/wenyudu/MIGU). The paper
observes that the L1-normalised magnitudes of a linear layer's outputs, ``|W x|`` unit by unit,
are distributed differently on different tasks, and uses them as the task's own choice of units:
in each step, for every linear map ``y = W x (+ b)``, the magnitude of output unit j is summed
over the batch's positions,

    m_j = Σ_t |y_{t, j}|,

and only the rows of ``W`` (and entries of ``b``) whose ``m_j`` is at or above the ``threshold``
quantile T of ``m`` keep their gradient; the rest are zeroed before the optimizer step. Units a
new task does not use stay as earlier tasks left them, with no memory of old examples and no task
id (rehearsal-free and task-label-free). The first task trains every unit.

Which maps: every linear map of the shared delta, as its method names them
(``capabilities.linear_units``: LoRA's A, whose units are the rank's, and B, whose units are the
layer's outputs; an adapter's down- and up-projection). A method without linear maps (BitFit,
(IA)^3, prompts, prefixes) is refused when the strategy is made.

How we depart from the paper and its released code:

- The paper applies MIGU to full fine-tuning and to LoRA; here it acts on the shared delta of
  any method that names its maps. The per-task head (a classifier; generative tasks share the
  frozen LM head) is not masked.
- B's magnitudes are those of B's own output, the LoRA term ``s B A x`` (``magnitudes="term"``, the
  default); the released LoRA code can instead take them from the whole layer's output, the frozen
  layer plus the term, ``h + s B A x``: ``magnitudes="layer"`` (for an adapter's up-projection too:
  the sub-layer's output plus the adapter's term). Only each site's last map changes; LoRA's A and
  an adapter's down-projection have no layer output of their own.
- Ties at the threshold keep their gradient (``>=``); the released code's strict ``>`` zeroes every
  unit of a map whose outputs are all equal (all zero, say), which would stop it training.
- The magnitudes are recomputed from the map's input after the forward pass (without dropout),
  over every position of the batch, padding included, as the released code sums them.
- The masked gradient goes to the shared recipe's AdamW, as in the released code (HuggingFace's
  Trainer): a row masked in this step still moves by the momentum of steps where it was not.
  Gradient clipping runs after the mask.
- The released code offers clustered variants (units grouped before the threshold); this is the
  paper's plain per-unit rule. T = 0.7 (the top 30% of each map's units update) is our default;
  the paper and its scripts take T as a hyper-parameter.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DeltaModel, get_method
from adapters.model import MethodSpec
from streams import Task

from ..training import AdjustGrads, TrainConfig
from .base import check_choice, check_option
from .shared_delta import SHARED, _SharedDelta


class UnitMagnitudes:
    """While open, sums each linear map's output magnitudes per unit over the forward passes that
    build a gradient (evaluation under ``no_grad`` is not counted); :meth:`mask` zeroes the gradient
    rows below the threshold quantile and starts the next step's sums."""

    def __init__(self, sites: Sequence[torch.nn.Module], threshold: float, layer: bool = False) -> None:
        self.sites, self.threshold, self.layer = list(sites), threshold, layer
        self.sums: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter | None, torch.Tensor]] = {}
        self.kept: list[float] = []  # the share of units kept, per step (what the mask did)
        self._handles: list[Any] = []

    def __enter__(self) -> "UnitMagnitudes":
        self._handles = [s.register_forward_hook(self._count) for s in self.sites]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.sums = [], {}

    def _count(self, site: torch.nn.Module, args: tuple, _out: Any) -> None:
        if not torch.is_grad_enabled():
            return
        with torch.no_grad():
            maps = site.linear_outputs(*args)
            for i, (weight, bias, out) in enumerate(maps):
                if self.layer and i == len(maps) - 1:  # the site's term: the whole layer's output, h + term
                    out = args[1].detach().float() + out.float()
                m = out.detach().abs().float().reshape(-1, out.shape[-1]).sum(0)
                key = id(weight)
                self.sums[key] = (weight, bias, self.sums[key][2] + m if key in self.sums else m)

    def mask(self, _params: Sequence[torch.Tensor]) -> None:
        if not self.sums:  # a step with no output of the delta's maps counted would train every unit
            raise RuntimeError("migu: no output of the shared delta's linear maps was seen in this step")
        kept = total = 0
        for weight, bias, m in self.sums.values():
            keep = m >= torch.quantile(m, self.threshold)
            for p in (weight, bias):
                if p is not None and p.grad is not None:
                    p.grad.mul_(keep.view(-1, *[1] * (p.grad.dim() - 1)).to(p.grad.dtype))
            kept, total = kept + int(keep.sum()), total + keep.numel()
        self.kept.append(kept / total)
        self.sums = {}


class MIGU(_SharedDelta):
    name = "migu"
    description = ("one shared delta; after the first task each step updates only the output units of its linear "
                   "maps with the largest outputs on the batch (MIGU)")
    defaults = {"threshold": 0.7, "magnitudes": "term"}
    data_parallel = False
    data_parallel_why = "its gradient mask is chosen from one process's batch, outside the data-parallel model"

    def __init__(self, methods: Sequence[MethodSpec] = ("lora",), threshold: float = 0.7, magnitudes: str = "term") -> None:
        super().__init__(methods)
        check_option(self.name, "threshold", threshold, lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_choice("migu", "magnitudes", magnitudes, ("term", "layer"))
        self.magnitudes = magnitudes
        bad = [m.method for m in self.methods if not get_method(m.method).capabilities.linear_units]
        if bad:
            raise ValueError(f"migu masks the output units of a delta's linear maps; {', '.join(bad)} has none it "
                             "names (use lora, bottleneck or parallel)")
        self.threshold = threshold
        self._units: UnitMagnitudes | None = None

    def masks(self, model: DeltaModel, task: Task) -> bool:
        """True after the first task: an earlier task's head is in the model (so a resumed run knows too)."""
        return bool(self.earlier_tasks(model, task))

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        if not self.masks(model, task):
            return super().train(model, tasks, config, data, callback)
        sites = [s for d in model.task(SHARED).deltas.values() for s in d.site_modules.values()]
        units = self._units = UnitMagnitudes(sites, self.threshold, layer=self.magnitudes == "layer")
        try:
            with units:
                result = super().train(model, tasks, config, data, callback)
        finally:
            self._units = None
        if units.kept:  # what the mask did: about 1 - threshold, more where outputs tie
            tqdm.write(f"task {task.name} (migu): {100 * sum(units.kept) / len(units.kept):.0f}% of the shared "
                       f"delta's units updated per step, over {len(units.kept)} steps")
        return result

    def grad_change(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any) -> AdjustGrads | None:
        return None if self._units is None else self._units.mask

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold, "magnitudes": self.magnitudes}

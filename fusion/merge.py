"""Merging deltas of one type: a cheap alternative to fusion (no attention, no extra inference cost).

A merged task's delta has the same configs as its sources (``cat``: the summed rank). Each
source's parameters, taken as one vector (its *task vector*: what the delta adds to the frozen
backbone, whose own delta is zero), are combined by one of these rules (``how``):

- ``linear``: ``sum_i w_i theta_i``. ``weights=None`` is the plain average (a "model soup" of
  deltas); weights that do not sum to 1 are task arithmetic (Ilharco et al. 2023).
- ``ties``: TIES-Merging (Yadav et al., NeurIPS 2023): each task vector keeps its ``density``
  fraction of largest-magnitude entries (trim), each entry's sign is elected as the sign of the
  trimmed vectors' sum (elect), and the entry is the mean of the trimmed values that agree with
  it (disjoint merge). Paper default: density 0.2, weights 1 (its lambda = 1).
- ``dare``: DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): each task vector's
  entries are dropped with probability ``1 - density`` and the rest rescaled by ``1 / density``
  (seeded), then merged linearly with the weights (default: the average).
- ``magmax``: MagMax's merge (Marczak et al., ECCV 2024): each entry is taken whole from the task
  vector that moved it most, ``v[j] = w_i v_i[j]`` with ``i = argmax_i |w_i v_i[j]|`` (a tie goes to
  the later source, as the authors' released code breaks it). Default weights 0.5: the
  paper's lambda, which scales the selected vector, as the authors' released scripts set it. The
  ``magmax`` strategy (:mod:`continual.strategies.magmax`) applies it along a stream.
- ``cat``: the exact weighted sum of the deltas' *functions*, where a method has one form for it
  (:meth:`adapters.base.Delta.summed_config`): LoRA's ``sum_i w_i s_i B_i A_i`` is one LoRA of the
  summed rank, B and A concatenated (HuggingFace PEFT's "cat"). Averaging LoRA's A and B apart
  (``linear``) gives ``(sum w_i B_i)(sum w_i A_i)``, cross terms included; ``cat`` does not.

Where we depart from the papers: they merge task vectors of full fine-tuning, ``theta_ft -
theta_pre``; a delta's parameters are its task vector only where they start at zero (LoRA's B,
BitFit's shifts, an adapter's up-projection). A randomly initialised part (LoRA's A, an adapter's
down-projection) is trimmed and elected like the rest, as HuggingFace PEFT's TIES and DARE do for
LoRA's two factors; unlike PEFT, which trims each tensor alone, TIES here trims each task's whole
delta (the paper's "top-k% of the task vector"). Each weight scales its task vector before the
sign election (the paper has one lambda for all).

The merged delta is frozen; the task's head is either copied from a source (same labels; a
generative source's is the LM's own) or new, and then training the task fits the head alone.

Parameter averaging is exact for methods whose term is linear in each parameter tensor (BitFit,
prompt tuning) and an approximation otherwise (LoRA's ``B A``, an adapter's non-linearity), as
in every merging paper; fusion is the learned alternative.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from adapters import DeltaModel, TaskDelta, get_method
from adapters.config import DeltaConfig
from adapters.errors import ConfigError


def merge_tasks(
    model: DeltaModel,
    name: str,
    sources: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    how: str = "linear",
    density: float | None = None,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    head_from: str | None = None,
) -> TaskDelta:
    """Add task ``name`` whose delta merges the sources' deltas by rule ``how`` (``linear``,
    ``ties``, ``dare``, ``magmax`` or ``cat``, module docstring). ``density``: the fraction of each task
    vector TIES keeps (default 0.2) or DARE keeps in expectation (default 0.5); ``seed``: DARE's
    draw.

    All sources must use the same method configs (same shapes). Give ``head_from`` (a task whose
    head is copied) or ``label_names`` (a new head, to be trained with ``train_task``)."""
    if isinstance(sources, str):  # a string is a sequence too: of one-letter task names
        raise ConfigError(f"give the sources as a list of task names, e.g. [{sources!r}]")
    sources = list(sources)
    if not sources:
        raise ConfigError("merge_tasks needs at least one source task")
    combine = merge_rule(how, density, seed)
    tasks = [model.task(s) for s in sources]
    default = {"ties": 1.0, "magmax": MAGMAX_SCALE}.get(how, 1.0 / len(tasks))
    w = [default] * len(tasks) if weights is None else [float(x) for x in weights]
    if len(w) != len(tasks):
        raise ConfigError(f"{len(w)} weights for {len(tasks)} sources")
    if not all(math.isfinite(x) for x in w):  # one NaN weight makes every merged parameter NaN
        raise ConfigError(f"merge weights must be finite numbers, got {w}")
    first = tasks[0]
    for t in tasks[1:]:
        if t.configs != first.configs:
            raise ConfigError(f"cannot merge {first.name!r} and {t.name!r}: their delta configs differ "
                              f"({[c.to_dict() for c in first.configs]} vs {[c.to_dict() for c in t.configs]}); "
                              "merging averages parameters, which needs one method with one shape")
    if not first.configs:
        raise ConfigError(f"task {first.name!r} has no delta to merge")
    if (head_from is None) == (label_names is None):
        raise ConfigError("give exactly one of head_from (copy that task's head) or label_names (a new head)")
    donor = model.task(head_from) if head_from is not None else None
    if donor is not None and donor.head is None:
        raise ConfigError(f"task {head_from!r} has no head to copy")
    configs = _summed_configs(first.configs, len(tasks)) if how == "cat" else list(first.configs)
    states = None if how == "cat" else _checked_states(tasks)
    labels = donor.label_names if donor is not None else list(label_names)
    generative = bool(getattr(donor.head, "generative", False)) if donor is not None else False  # the LM's own head
    try:
        merged = model.add_task(name, configs, num_labels=donor.head.num_labels if donor is not None and labels is None
                                else None, label_names=labels, pooling=donor.head.pooling if donor is not None else None,
                                generative=generative)
    except ConfigError as e:  # e.g. a cat merge's summed rank above a layer's width
        raise ConfigError(f"the {how} merge of {len(tasks)} sources: {e}") from None
    if how == "cat":
        for key, delta in merged.deltas.items():
            delta.load_sum([t.deltas[key] for t in tasks], w)
    else:
        if any(t.frozen for t in tasks):
            for d in merged.deltas.values():
                d.fold()  # frozen sources hold folded parameters (prefix tuning): match their shapes
        _merge_vectors(merged, states, lambda v: combine(v, torch.tensor(w)))
    if donor is not None:
        merged.head.load_state_dict(donor.head.state_dict())
    model.freeze_delta(name)
    return merged


def _summed_configs(configs: Sequence[DeltaConfig], n: int) -> list[DeltaConfig]:
    """Each config's exact-sum form (:meth:`adapters.base.Delta.summed_config`), or a refusal."""
    out = []
    for c in configs:
        summed = get_method(c.method).summed_config(c, n)
        if summed is None:
            raise ConfigError(f"a cat merge sums the sources' deltas exactly, which {c.method} has no form for "
                              "(lora has: its ranks are concatenated); use linear, ties or dare")
        out.append(summed)
    return out


def _checked_states(tasks: Sequence[TaskDelta]) -> list[dict[str, torch.Tensor]]:
    """The sources' delta states, checked to hold their parameters in one layout (before the task
    is added, so a refusal leaves the model as it was)."""
    states = [t.deltas.state_dict() for t in tasks]
    layout = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    odd = [t.name for t, state in zip(tasks, states) if layout(state) != layout(states[0])]
    if odd:
        raise ConfigError(f"cannot merge {tasks[0].name!r} with {odd}: their parameters are held in different forms (a "
                          "frozen delta is folded, e.g. a prefix's reparameterisation, a trained one is not); "
                          "freeze every source first (model.freeze(name))")
    return states


def _merge_vectors(merged: TaskDelta, states: list[dict[str, torch.Tensor]], combine) -> None:
    """One task vector per source (its floating parameters in one vector: TIES trims and DARE
    drops over the whole delta), combined into the merged task's parameters."""
    mine = merged.deltas.state_dict()
    floats = [k for k, v in mine.items() if torch.is_floating_point(v)]
    with torch.no_grad():
        for key, value in mine.items():
            if not torch.is_floating_point(value):
                value.copy_(states[0][key])
        if floats:
            vectors = torch.stack([torch.cat([s[k].detach().float().cpu().flatten() for k in floats]) for s in states])
            out = combine(vectors)
            for key, part in zip(floats, out.split([mine[k].numel() for k in floats])):
                mine[key].copy_(part.view_as(mine[key]).to(mine[key].device, mine[key].dtype))
    merged.deltas.load_state_dict(mine)


MERGES = {"linear": None, "ties": 0.2, "dare": 0.5, "magmax": None, "cat": None}  # each rule's default density (None: none)
MAGMAX_SCALE = 0.5  # MagMax's lambda: the authors' released scripts merge with 0.5


def merge_rule(how: str, density: float | None = None, seed: int = 0):
    """The function ``(vectors (n, P), weights (n,)) -> merged (P,)`` of rule ``how``, its settings
    checked (a refusal before any task is added)."""
    if how not in MERGES:
        raise ConfigError(f"unknown merge {how!r}; one of {list(MERGES)}")
    if MERGES[how] is None:
        if density is not None:
            raise ConfigError(f"a {how} merge has no density (ties and dare do)")
        return magmax_merge if how == "magmax" else linear_merge  # cat: the weights are used by each method's load_sum
    density = MERGES[how] if density is None else density
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):  # NaN fails here too
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if how == "ties":
        return lambda vectors, weights: ties_merge(vectors, weights, float(density))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return lambda vectors, weights: dare_merge(vectors, weights, float(density), seed)


def linear_merge(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i v_i``."""
    return weights @ vectors


def ties_merge(vectors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging of the rows of ``vectors`` (Yadav et al. 2023): trim each row to its
    ``ceil(density * P)`` largest magnitudes, scale it by its weight, elect each entry's sign as
    that of the rows' sum, and average the entries that agree with it (0 where none does)."""
    n, P = vectors.shape
    k = max(1, math.ceil(density * P))
    trimmed = torch.zeros_like(vectors)
    top = vectors.abs().topk(k, dim=1).indices  # exactly k per row, whatever ties in magnitude
    trimmed.scatter_(1, top, vectors.gather(1, top))
    trimmed *= weights[:, None]
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def magmax_merge(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MagMax (Marczak et al. 2024): each entry of the result is the entry of largest magnitude
    among the rows of ``vectors`` (any shape ``(n, ...)``), each row scaled by its weight first; a tie
    goes to the later row."""
    scaled = vectors * weights.to(vectors.device, vectors.dtype).reshape(-1, *([1] * (vectors.dim() - 1)))
    # argmax returns the first of equal maxima: searched in reverse, the last row wins a tie
    last = scaled.shape[0] - 1 - scaled.abs().flip(0).argmax(0, keepdim=True)
    return scaled.gather(0, last).squeeze(0)


def dare_merge(vectors: torch.Tensor, weights: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024): keep each entry of each row with probability ``density`` (a seeded
    draw), rescale the kept ones by ``1 / density``, then ``sum_i w_i v_i``."""
    keep = torch.rand(vectors.shape, generator=torch.Generator().manual_seed(seed)) < density
    return linear_merge(vectors * keep / density, weights)

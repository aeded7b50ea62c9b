"""Merging deltas of one type: a cheap alternative to fusion (no attention, no extra inference cost).

A merged task's delta has the same configs as its sources and parameters ``sum_i w_i theta_i``:
``weights=None`` is the plain average (a linear merge, "model soup" of deltas); other weights give
a weighted merge, or task arithmetic when they do not sum to 1. The merged delta is frozen; the
task's head is either copied from a source (same labels) or new, and then training the task fits
the head alone.

Parameter averaging is exact for methods whose term is linear in each parameter tensor (BitFit,
prompt tuning) and an approximation otherwise (LoRA's ``B A``, an adapter's non-linearity), as
in every merging paper; fusion is the learned alternative.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from adapters import DeltaModel, TaskDelta
from adapters.errors import ConfigError


def merge_tasks(
    model: DeltaModel,
    name: str,
    sources: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    label_names: Sequence[str] | None = None,
    head_from: str | None = None,
) -> TaskDelta:
    """Add task ``name`` whose delta is the weighted merge of the sources' deltas.

    All sources must use the same method configs (same shapes). Give ``head_from`` (a task whose
    head is copied) or ``label_names`` (a new head, to be trained with ``train_task``)."""
    if isinstance(sources, str):  # a string is a sequence too: of one-letter task names
        raise ConfigError(f"give the sources as a list of task names, e.g. [{sources!r}]")
    sources = list(sources)
    if not sources:
        raise ConfigError("merge_tasks needs at least one source task")
    tasks = [model.task(s) for s in sources]
    w = [1.0 / len(tasks)] * len(tasks) if weights is None else [float(x) for x in weights]
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
    states = [t.deltas.state_dict() for t in tasks]
    layout = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    odd = [t.name for t, state in zip(tasks, states) if layout(state) != layout(states[0])]
    if odd:  # checked before the task is added, so a refusal leaves the model as it was
        raise ConfigError(f"cannot merge {first.name!r} with {odd}: their parameters are held in different forms (a "
                          "frozen delta is folded, e.g. a prefix's reparameterisation, a trained one is not); "
                          "freeze every source first (model.freeze(name))")
    labels = donor.label_names if donor is not None else list(label_names)
    n_labels = donor.head.num_labels if donor is not None else None
    pooling = donor.head.pooling if donor is not None else None
    merged = model.add_task(name, list(first.configs), num_labels=n_labels if labels is None else None,
                            label_names=labels, pooling=pooling)
    if any(t.frozen for t in tasks):
        for d in merged.deltas.values():
            d.fold()  # frozen sources hold folded parameters (prefix tuning): match their shapes
    mine = merged.deltas.state_dict()
    with torch.no_grad():
        for key, value in mine.items():
            if not torch.is_floating_point(value):
                value.copy_(states[0][key])
                continue
            value.copy_(sum(wi * s[key].to(value.device, torch.float32) for wi, s in zip(w, states)).to(value.dtype))
        if donor is not None:
            merged.head.load_state_dict(donor.head.state_dict())
    merged.deltas.load_state_dict(mine)
    model.freeze_delta(name)
    return merged

"""Combining frozen task deltas: AdapterFusion over any layer-wise delta, merges, inspection.

  FusionConfig, AdapterFusion   the fusion delta (registered as method "fusion")
  add_fusion                    add a task that fuses frozen source tasks (+ its own head)
  merge_tasks                   linear, weighted, TIES and DARE merges of deltas of one type
  fusion_weights                attention weights per module x source, as table / heatmap / MLflow

Mixed-task batches (one forward pass, each example through its own task) live in
:mod:`adapters.mixed` (``model.mixed(tasks)``); task-free routing in :mod:`fusion.routing`.
"""

from __future__ import annotations

from typing import Any, Sequence

from adapters import ConfigError, DeltaModel, TaskDelta

from .inspect import FusionWeights, fusion_delta, fusion_weights
from .layer import AdapterFusion, FusionConfig, FusionLayer
from .merge import merge_tasks


def add_fusion(
    model: DeltaModel,
    name: str,
    sources: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    *,
    head_from: str | None = None,
    **config: Any,
) -> TaskDelta:
    """Add task ``name``: a fusion over ``sources`` (default: every task with a delta of its own,
    i.e. not another fusion) and a head (new, for ``label_names``; or a copy of task
    ``head_from``'s). The sources are frozen (stage 2 trains only the fusion and the head) once
    the fusion is built. ``config``: :class:`FusionConfig` fields (``attn_dim``, ``temperature``, ...)."""
    if isinstance(sources, str):  # a string is a sequence too: of one-letter task names
        raise ConfigError(f"give the sources as a list of task names, e.g. [{sources!r}]")
    if sources is None:
        sources = [n for n, t in model.tasks.items() if t.deltas and not any(d.sources() for d in t.deltas.values())]
    if not sources:
        raise ValueError("no source tasks to fuse: train and freeze some tasks first, or name them")
    donor = model.task(head_from) if head_from is not None else None
    if donor is not None and label_names is None:
        label_names = donor.label_names
    task = model.add_task(name, [{"method": "fusion", "sources": list(sources), **config}], label_names=label_names,
                          num_labels=None if label_names is not None or donor is None else donor.head.num_labels)
    # frozen once the fusion exists: a refused one (a taken name, a bad setting, a source that cannot
    # be fused) leaves its sources as they were; freezing folds nothing a fusion can hold
    for s in sources:
        if not model.task(s).frozen:
            model.freeze(s)
    if donor is not None:
        task.head.load_state_dict(donor.head.state_dict())
    return task


__all__ = ["AdapterFusion", "FusionConfig", "FusionLayer", "FusionWeights", "add_fusion", "fusion_delta",
           "fusion_weights", "merge_tasks"]

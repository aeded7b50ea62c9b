"""Which deltas does a fusion listen to? Attention weights averaged over a data set.

    w = fusion_weights(model, "target", loader)   # FusionWeights: modules x sources
    print(w.table())                               # Markdown table
    w.to_csv("fusion.csv")

This module computes; drawing (``continual.plots.fusion_heatmap``) and logging
(``continual.tracking``) belong to the caller.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from adapters import DeltaModel
from adapters.errors import TaskError
from adapters.precision import autocast, resolve_precision

from .layer import AdapterFusion


@dataclasses.dataclass
class FusionWeights:
    """Mean attention weight of each source (columns) at each fused module (rows), over the
    attended tokens of a data set. Each row sums to 1 over the sources present there."""

    task: str
    sources: list[str]
    modules: list[str]
    weights: np.ndarray
    tokens: int

    @property
    def rows(self) -> list[str]:
        """Short row labels: ``L3 output.dense`` for ``encoder.layer.3.output.dense``."""
        out = []
        for m in self.modules:
            hit = re.search(r"(?:^|\.)(\d+)\.(.+)$", m)
            out.append(f"L{hit.group(1)} {hit.group(2)}" if hit else m)
        return out

    def mean(self) -> dict[str, float]:
        """Each source's weight averaged over modules."""
        return {s: float(v) for s, v in zip(self.sources, self.weights.mean(axis=0))}

    def table(self) -> str:
        head = "| module | " + " | ".join(self.sources) + " |"
        lines = [head, "|---|" + "---|" * len(self.sources)]
        for r, row in zip(self.rows, self.weights):
            lines.append(f"| {r} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in self.mean().values()) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["module," + ",".join(self.sources)]
        lines += [f"{m}," + ",".join(f"{v:.6f}" for v in row) for m, row in zip(self.modules, self.weights)]
        path.write_text("\n".join(lines) + "\n")
        return path


def _layer_order(modules: list[str]):
    """Sort key: block index first (where a path has one), then the fusion's own order."""
    def key(m: str) -> tuple[int, int]:
        hit = re.search(r"(?:^|\.)(\d+)\.", m)
        return (int(hit.group(1)) if hit else -1, modules.index(m))
    return key


def fusion_delta(model: DeltaModel, task: str) -> AdapterFusion:
    """The fusion delta of ``task`` (error if the task has none)."""
    found = [d for d in model.task(task).deltas.values() if isinstance(d, AdapterFusion)]
    if not found:
        raise TaskError(f"task {task!r} has no fusion delta")
    return found[0]


@torch.no_grad()
def fusion_weights(model: DeltaModel, task: str, batches: Iterable[dict[str, torch.Tensor]],
                   precision: str = "fp32") -> FusionWeights:
    """Run ``task`` over ``batches`` (dicts with input_ids / attention_mask, e.g. an eval loader)
    and average its fusion's attention weights per module and source."""
    fusion = fusion_delta(model, task)
    device = model.device
    was_training = model.training
    model.eval()
    try:
        with model.using(task), fusion.recording() as rec, autocast(resolve_precision(precision, device), device):
            for batch in batches:
                # (a generative task's evaluation batches also hold the reference texts)
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
                if model.seq2seq and "decoder_input_ids" not in batch:  # T5: the weights over its prompt
                    start = torch.full((batch["input_ids"].shape[0], 1), model.decoder_start_id, device=device)
                    batch["decoder_input_ids"] = start
                rec.mask = batch.get("attention_mask")
                model(**batch)
    finally:
        model.train(was_training)
    means = rec.means()
    if not means:
        raise ValueError("no batches were given, so there are no fusion weights to average")
    modules = sorted(fusion.modules_fused, key=_layer_order(fusion.modules_fused))  # rows layer by layer
    tokens = int(sum(float(v) for v in rec.tokens.values()) / len(rec.tokens))
    return FusionWeights(task, list(fusion.sources()), modules, np.stack([means[m].numpy() for m in modules]), tokens)

"""Which deltas does a fusion listen to? Attention weights averaged over a data set.

    w = fusion_weights(model, "target", loader)   # FusionWeights: modules x sources
    print(w.table())                               # Markdown table
    w.heatmap("fusion.png"); w.log_mlflow(client, run_id)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from adapters import DeltaModel
from adapters.errors import TaskError
from adapters.speed import autocast, resolve_precision

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

    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Modules x sources heatmap PNG."""
        from continual.plots import annotated_heatmap

        M, N = self.weights.shape
        return annotated_heatmap(self.weights, path, self.sources, self.rows,
                                 title or f"fusion attention for {self.task} (mean over {self.tokens} tokens)",
                                 xlabel="fused delta (source task)", cmap="magma", white_text=lambda v: v < 0.55,
                                 figsize=(1.0 * N + 3, 0.38 * M + 1.8), fontsize=8, aspect="auto")

    def save(self, directory: str | Path) -> list[Path]:
        """CSV, Markdown and PNG into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        md = d / f"fusion-{self.task}.md"
        md.write_text(self.table() + "\n")
        return [self.to_csv(d / f"fusion-{self.task}.csv"), md, self.heatmap(d / f"fusion-{self.task}.png")]

    def log_mlflow(self, client: Any, run_id: str, directory: str | Path) -> list[Path]:
        """Save the files to ``directory`` and log them (under ``fusion/``) and each source's mean
        weight (``fusion_weight/<task>/<source>``) to an MLflow run."""
        from mlflow.entities import Metric
        import time

        paths = self.save(directory)
        for p in paths:
            client.log_artifact(run_id, str(p), "fusion")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"fusion_weight/{self.task}/{s}", v, now, 0) for s, v in self.mean().items()])
        return paths


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
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
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

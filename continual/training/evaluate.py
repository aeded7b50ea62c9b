"""Scoring a task's head on a data set: accuracy, macro-F1, mean loss."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from adapters import DeltaModel
from adapters.precision import autocast, resolve_precision


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Mean F1 over the labels present in gold or pred."""
    scores = []
    for c in range(num_labels):
        tp = np.sum((pred == c) & (gold == c))
        fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate(
    model: DeltaModel, task: str, loader: DataLoader, active: Sequence[str] | None = None, precision: str = "fp32"
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``task``'s head on a loader.

    ``active``: the tasks whose deltas act, ``task`` last; default ``task`` alone.
    ``precision``: as in :class:`~continual.training.TrainConfig` (autocast for bf16 / fp16)."""
    device = model.device
    was_training = model.training
    model.eval()
    preds, golds, losses = [], [], []
    with model.using(*(active or (task,))), autocast(resolve_precision(precision, device), device):
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            preds.append(logits.argmax(-1))
            golds.append(labels)
    model.train(was_training)
    # one read-back at the end, not one per batch
    pred, gold = torch.cat(preds).cpu().numpy(), torch.cat(golds).cpu().numpy()
    loss_sum = float(torch.stack(losses).sum())
    n_labels = model.task(task).head.num_labels
    return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, n_labels), "loss": loss_sum / len(gold)}

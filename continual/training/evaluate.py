"""Scoring a task on a data set: a classifier's accuracy, macro-F1 and mean loss, or a generative
task's answers, generated greedily and scored against the references (:mod:`.textscore`)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from adapters import DeltaModel
from adapters.errors import NonFiniteError, non_finite_rows, refuse_non_finite
from adapters.generation import answer_batches
from adapters.precision import autocast, inference_linears, resolve_precision

from . import distributed
from .textscore import score_each, score_texts


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
    model: DeltaModel, task: str, loader: DataLoader, active: Sequence[str] | None = None, precision: str = "fp32",
    per_example: list[float] | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``task``'s head on a loader; for a generative task (a
    :class:`~continual.training.data.GenerationLoader`) the text scores of its generated answers,
    ``accuracy`` being the task's own metric.

    ``active``: the tasks whose deltas act, ``task`` last; default ``task`` alone.
    ``precision``: as in :class:`~continual.training.TrainConfig` (autocast for bf16 / fp16).
    ``per_example``: a list to extend with each example's score, in the split's order (1 or 0 for
    a classifier; the task's metric for a generative task): the accuracy is their mean."""
    loader = distributed.shard_loader(loader, model)  # with several processes, each scores its shard
    if getattr(loader, "generative", False):
        return evaluate_generation(model, task, loader, active, precision, per_example)
    preds, golds, losses, bad = [], [], [], []
    for logits, labels in batch_logits(model, loader, active or (task,), precision):
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(-1))
        golds.append(labels)
        bad.append(non_finite_rows(logits))  # NaN / +inf rows; -inf passes
    # every process's count, so all of them refuse together (one raising alone leaves the others waiting)
    failed = sum(distributed.gather_lists([int(torch.stack(bad).sum()) if bad else 0], loader))
    refuse_non_finite(failed, f"scoring task {task!r}")
    # one read-back at the end, not one per batch; the metrics are computed on the whole split
    pairs = list(zip(torch.cat(preds).tolist(), torch.cat(golds).tolist())) if preds else []
    pred, gold = (np.asarray(c) for c in zip(*distributed.gather_lists(pairs, loader)))
    loss_sum = sum(distributed.gather_lists([float(torch.stack(losses).sum()) if losses else 0.0], loader))
    n_labels = model.task(task).head.num_labels
    if per_example is not None:
        per_example.extend((pred == gold).astype(float).tolist())
    return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, n_labels), "loss": loss_sum / len(gold)}


def batch_logits(model: DeltaModel, loader, active: Sequence[str], precision: str = "fp32") -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per batch of a loader (any iterable of tokenised batches): the last of ``active``'s heads'
    fp32 logits (a classifier's; a language model's at every position), the ``active`` tasks
    acting, dropout off, and the batch's labels (None when it has none). Call it
    under ``torch.no_grad`` and read it to the end (the model is back in its mode after)."""
    device = model.device
    was_training = model.training
    model.eval()
    try:
        with model.using(*active), autocast(resolve_precision(precision, device), device), inference_linears(model):
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                labels = batch.pop("labels", None)
                yield model(**batch).float(), labels
    finally:
        model.train(was_training)


@torch.no_grad()
def answers(model: DeltaModel, loader, active: Sequence[str], precision: str = "fp32") -> tuple[list[str], list[str]]:
    """(generated answers, references) of a generative loader, in its order, the ``active`` tasks
    acting. The prompts are answered in order of length (batches of similar lengths pad little)."""
    device = model.device
    ordered, order = loader.by_length()
    with model.using(*active), autocast(resolve_precision(precision, device), device):
        answered = answer_batches(model, ordered, loader.max_new_tokens)
    preds = [""] * len(order)
    for at, answer in zip(order, answered):
        preds[at] = answer
    return preds, loader.references()


def evaluate_generation(model: DeltaModel, task: str, loader, active: Sequence[str] | None = None,
                        precision: str = "fp32", per_example: list[float] | None = None) -> dict[str, float]:
    """Greedy answers of ``task`` (its deltas, the model's LM head) scored by the loader's metric."""
    loader = distributed.shard_loader(loader, model)
    try:
        preds, refs, failed = *answers(model, loader, active or (task,), precision), 0
    except NonFiniteError as e:  # raised below on every process at once, not on this one alone
        preds, refs, failed = [], [], e.count if e.count is not None else len(loader.references())
    refuse_non_finite(sum(distributed.gather_lists([failed], loader)), f"answering task {task!r}")
    # several processes: each answered its shard (shard_loader); the metric is the whole split's
    sources = loader.metric_sources() or [""] * len(refs)  # (gathered beside the answers)
    rows = distributed.gather_lists(list(zip(preds, refs, sources)), loader)
    preds, refs, sources = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    if per_example is not None:
        per_example.extend(score_each(loader.metric, preds, refs, sources))
    return score_texts(preds, refs, loader.metric, sources)

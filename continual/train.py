"""The one training loop: train the active task's delta and head, early-stop on dev.

Everything that trains a delta (examples, tests, the stream scheduler) calls :func:`train_task`.
Loop state lives in local variables, not on an object; progress goes to a tqdm bar and, step by
step, to an optional ``callback(record)`` (a logger plugs in there).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adapters import DeltaModel


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """lr=None uses each method's own default learning rate (see ``DeltaConfig.default_lr``)."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float | None = None
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    eval_every: int = 100
    patience: int | None = 3
    max_length: int = 128
    grad_clip: float = 1.0
    seed: int = 0
    device: str | None = None
    progress: bool = True


@dataclasses.dataclass
class TrainResult:
    best_dev: dict[str, float]
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, Any]]


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when there is a GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tokenize(dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """Token ids for a dataset with ``text`` (and optional ``text_pair``) and ``label`` columns."""
    pair = "text_pair" in dataset.column_names

    def enc(batch: dict[str, list]) -> dict[str, list]:
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    keep = {"label"}
    # datasets' own per-map progress bar is noise next to the training bar
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return dataset.map(enc, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep])
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def make_loader(dataset: Dataset, tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Dynamically padded batches; shuffling is seeded."""
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad([{c: r[c] for c in columns} for r in rows], return_tensors="pt")
        padded["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(padded)

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen)


def eval_loader(dataset: Dataset, tokenizer: Any, max_length: int, batch_size: int = 64) -> DataLoader:
    """Tokenised, unshuffled batches for evaluation."""
    return make_loader(tokenize(dataset, tokenizer, max_length), tokenizer, batch_size, False)


def majority_rate(dataset: Dataset) -> float:
    """Accuracy of always predicting the most frequent label: the baseline to beat."""
    labels = np.asarray(dataset["label"])
    return float(np.bincount(labels).max() / len(labels))


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
def evaluate(model: DeltaModel, task: str, loader: DataLoader) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``task`` (its delta active) on a loader."""
    device = model.device
    was_training = model.training
    model.eval()
    preds, golds, loss_sum = [], [], 0.0
    with model.using(task):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            preds.append(logits.argmax(-1).cpu().numpy())
            golds.append(labels.cpu().numpy())
    model.train(was_training)
    pred, gold = np.concatenate(preds), np.concatenate(golds)
    n_labels = model.task(task).head.num_labels
    return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, n_labels), "loss": loss_sum / len(gold)}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_task(
    model: DeltaModel,
    task: str,
    data: DatasetDict,
    config: TrainConfig = TrainConfig(),
    tokenizer: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train task ``task``'s delta + head on ``data["train"]``, early-stopping on ``data["dev"]``.

    At the end the task holds its best-on-dev parameters. Nothing else in the model changes."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError("train_task needs a tokenizer (the model has none)")
    for split in ("train", "dev"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"task {task!r}: the {split} split is missing or empty")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    train_ds = tokenize(data["train"], tokenizer, config.max_length)
    dev_loader = eval_loader(data["dev"], tokenizer, config.max_length, config.batch_size * 2)

    model.activate(task)
    groups = model.task(task).param_groups(config.lr, config.head_lr)
    if not groups:
        raise ValueError(f"task {task!r} has no trainable parameters (is it frozen?)")
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    warmup = math.ceil(config.warmup_ratio * config.max_steps)

    params = [p for g in groups for p in g["params"]]
    best = {"accuracy": -1.0}
    best_state = {k: v.detach().clone() for k, v in model.task(task).state_dict().items()}
    best_step, bad_evals, history, step = 0, 0, [], 0
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.max_steps, desc=f"train {task}", disable=not config.progress, leave=False)
    epoch = 0
    while step < config.max_steps:
        for batch in make_loader(train_ds, tokenizer, config.batch_size, True, config.seed + epoch):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * _schedule(step, config.max_steps, warmup)
            loss = torch.nn.functional.cross_entropy(model(**batch).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": len(labels) / (time.perf_counter() - t0)}
            if step % config.eval_every == 0 or step == config.max_steps:
                dev = evaluate(model, task, dev_loader)
                record.update({f"dev_{k}": v for k, v in dev.items()})
                if dev["accuracy"] > best["accuracy"]:
                    best, best_step, bad_evals = dev, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.task(task).state_dict().items()}
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{record['loss']:.3f}", dev_acc=f"{dev['accuracy']:.3f}")
            history.append(record)
            if callback is not None:
                callback(record)
            bar.update(1)
            if step >= config.max_steps or (config.patience is not None and bad_evals >= config.patience):
                break
        else:
            epoch += 1
            continue
        break
    bar.close()
    model.task(task).load_state_dict(best_state)
    model.eval()
    return TrainResult(best, best_step, step, time.perf_counter() - start, history)

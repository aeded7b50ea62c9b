"""The one training loop: train the active task's delta and head, early-stop on dev.

Everything that trains a delta (examples, tests, the stream scheduler) calls :func:`train_task`.
Loop state lives in local variables, not on an object; progress goes to a tqdm bar and, step by
step, to an optional ``callback(record)`` (a logger plugs in there).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Sequence

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
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def tokenize(dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """Token ids for a dataset with ``text`` (and optional ``text_pair``) and ``label`` columns."""
    if "input_ids" in dataset.column_names:  # already tokenised (a stream tokenises each split once)
        return dataset
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
def evaluate(model: DeltaModel, task: str, loader: DataLoader, active: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``task``'s head on a loader.

    ``active``: the tasks whose deltas act, ``task`` last; default ``task`` alone."""
    device = model.device
    was_training = model.training
    model.eval()
    preds, golds, loss_sum = [], [], 0.0
    with model.using(*(active or (task,))):
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


def _batches(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffled batches: epoch e is shuffled with seed + e."""
    epoch = 0
    while True:
        yield from make_loader(dataset, tokenizer, batch_size, True, seed + epoch)
        epoch += 1


def _groups(model: DeltaModel, active: Sequence[str], config: TrainConfig, extra: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = [g for name in active if not model.task(name).frozen for g in model.task(name).param_groups(config.lr, config.head_lr)]
    groups += [dict(g) for g in extra]
    if not groups:
        raise ValueError(f"nothing to train: tasks {list(active)} are frozen and no other parameters were given")
    return groups


def _fit(
    model: DeltaModel,
    groups: list[dict[str, Any]],
    next_batch: Callable[[], tuple[Sequence[str], dict[str, torch.Tensor]]],
    dev: Callable[[], dict[str, float]],
    config: TrainConfig,
    callback: Callable[[dict[str, Any]], None] | None,
    desc: str,
) -> TrainResult:
    """The step loop shared by single-task and joint training.

    ``next_batch`` gives (tasks to activate, batch); ``dev`` scores the model on held-out data.
    Keeps a copy of the best-on-dev parameters of ``groups`` and restores it at the end."""
    device = model.device
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    params = [p for g in groups for p in g["params"]]
    snapshot = lambda: [p.detach().clone() for p in params]  # noqa: E731
    best, best_state, best_step, bad_evals, history = {"accuracy": -1.0}, snapshot(), 0, 0, []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.max_steps, desc=desc, disable=not config.progress, leave=False)
    for step in range(1, config.max_steps + 1):
        t0 = time.perf_counter()
        active, batch = next_batch()
        model.activate(*active)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _schedule(step - 1, config.max_steps, warmup)
        loss = torch.nn.functional.cross_entropy(model(**batch).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                  "samples_per_s": len(labels) / (time.perf_counter() - t0)}
        if step % config.eval_every == 0 or step == config.max_steps:
            score = dev()
            record.update({f"dev_{k}": v for k, v in score.items()})
            if score["accuracy"] > best["accuracy"]:
                best, best_step, bad_evals, best_state = score, step, 0, snapshot()
            else:
                bad_evals += 1
            bar.set_postfix(loss=f"{record['loss']:.3f}", dev_acc=f"{score['accuracy']:.3f}")
        history.append(record)
        if callback is not None:
            callback(record)
        bar.update(1)
        if config.patience is not None and bad_evals >= config.patience:
            break
    bar.close()
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    model.eval()
    return TrainResult(best, best_step, step, time.perf_counter() - start, history)


def _check_splits(task: str, data: DatasetDict) -> None:
    for split in ("train", "dev"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"task {task!r}: the {split} split is missing or empty")


def train_task(
    model: DeltaModel,
    task: str,
    data: DatasetDict,
    config: TrainConfig = TrainConfig(),
    tokenizer: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    *,
    active: Sequence[str] | None = None,
    extra_groups: Sequence[dict[str, Any]] = (),
) -> TrainResult:
    """Train task ``task``'s delta + head on ``data["train"]``, early-stopping on ``data["dev"]``.

    ``active``: the tasks whose deltas act during training, ``task`` last (its head gives the
    logits); every unfrozen one among them trains. Default: ``task`` alone. ``extra_groups``:
    further optimizer groups (e.g. backbone weights for full fine-tuning).
    At the end the trained parameters hold their best-on-dev values. Nothing else changes."""
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError("train_task needs a tokenizer (the model has none)")
    _check_splits(task, data)
    active = tuple(active or (task,))
    torch.manual_seed(config.seed)
    model.to(resolve_device(config.device))
    train_ds = tokenize(data["train"], tokenizer, config.max_length)
    dev_loader = eval_loader(data["dev"], tokenizer, config.max_length, config.batch_size * 2)
    model.activate(*active)
    groups = _groups(model, active, config, extra_groups)
    batches = _batches(train_ds, tokenizer, config.batch_size, config.seed)
    return _fit(model, groups, lambda: (active, next(batches)), lambda: evaluate(model, task, dev_loader, active),
                config, callback, f"train {task}")


def train_joint(
    model: DeltaModel,
    tasks: dict[str, tuple[Sequence[str], DatasetDict]],
    config: TrainConfig = TrainConfig(),
    tokenizer: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Multi-task training: each step takes a one-task batch, the task drawn in proportion to its
    training-set size (seeded). ``tasks``: name -> (tasks to activate, data). Early stopping and
    the best checkpoint use the mean dev accuracy over tasks."""
    tokenizer = tokenizer or model.tokenizer
    if not tasks:
        raise ValueError("train_joint needs at least one task")
    torch.manual_seed(config.seed)
    model.to(resolve_device(config.device))
    names = list(tasks)
    streams, devs, sizes = {}, {}, []
    for i, (name, (active, data)) in enumerate(tasks.items()):
        _check_splits(name, data)
        ds = tokenize(data["train"], tokenizer, config.max_length)
        streams[name] = _batches(ds, tokenizer, config.batch_size, config.seed + 7919 * i)
        devs[name] = eval_loader(data["dev"], tokenizer, config.max_length, config.batch_size * 2)
        sizes.append(len(ds))
    rng = np.random.default_rng(config.seed)
    probs = np.asarray(sizes, dtype=float) / sum(sizes)
    # Everything any task trains, trainable at once while the groups are collected; each step then
    # activates one task's set, and AdamW skips the parameters that got no gradient.
    # (a shared delta appears in several tasks' lists: de-duplicated, it gets one group)
    involved = tuple(dict.fromkeys(n for active, _ in tasks.values() for n in active))
    model.activate(*involved)
    groups = _groups(model, involved, config, ())

    def next_batch() -> tuple[Sequence[str], dict[str, torch.Tensor]]:
        name = names[rng.choice(len(names), p=probs)]
        return tuple(tasks[name][0]), next(streams[name])

    def dev() -> dict[str, float]:
        scores = [evaluate(model, n, devs[n], tasks[n][0]) for n in names]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}

    return _fit(model, groups, next_batch, dev, config, callback, "train joint")

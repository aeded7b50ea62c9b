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
from adapters.speed import (
    COMPILE_MODES, PRECISIONS, TrainStep, autocast, frozen_linears_in, make_optimizer, resolve_precision,
)


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
    # -- speed (see adapters.speed); the defaults reproduce the plain fp32 loop -------------------
    precision: str = "fp32"      # fp32 | bf16 | fp16 | auto (bf16 on a GPU that has it, else fp32)
    compile: str | None = None   # None, or a torch.compile mode (adapters.speed.COMPILE_MODES)
    bucket: bool = False         # length-bucketed batches (less padding); pads to a multiple of 8
    log_every: int = 10          # steps between records; the loss is read back (a host sync) only then

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or a torch.compile mode, got {self.compile!r}")
        if self.log_every < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("log_every, max_steps and batch_size must be >= 1")

    @classmethod
    def fast(cls, **overrides: Any) -> "TrainConfig":
        """The fast path: bf16 and torch.compile on a GPU, length buckets everywhere.

        ``compile="reduce-overhead"`` (CUDA graphs) is much faster again at moderate batch sizes
        in benchmarks/speed.py, but is not yet the default: its use inside this loop (varying
        bucket shapes, dev evaluation between steps) has not been verified on a GPU."""
        device = overrides.get("device")
        gpu = (device is None and torch.cuda.is_available()) or str(device).startswith("cuda")
        opts = {"precision": "auto", "compile": "default" if gpu else None, "bucket": True}
        return cls(**{**opts, **overrides})


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


def _collate(dataset: Dataset, tokenizer: Any, pad_multiple: int | None) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad([{c: r[c] for c in columns} for r in rows], return_tensors="pt", pad_to_multiple_of=pad_multiple)
        padded["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(padded)

    return collate


def make_loader(dataset: Dataset, tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Dynamically padded batches; shuffling is seeded."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_collate(dataset, tokenizer, None),
                      generator=gen, pin_memory=torch.cuda.is_available())


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Seeded batches of similar lengths: shuffle, sort each pool of ``pool`` batches by length,
    cut it into batches, shuffle the batch order. Every example appears once; padding (and so
    wasted compute) drops to what the length spread inside a batch needs."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def bucketed_loader(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int) -> DataLoader:
    """Length-bucketed, seeded batches padded to a multiple of 8 (tensor-core friendly shapes)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return DataLoader(dataset, batch_sampler=bucket_batches(lengths, batch_size, seed),
                      collate_fn=_collate(dataset, tokenizer, 8), pin_memory=torch.cuda.is_available())


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
def evaluate(
    model: DeltaModel, task: str, loader: DataLoader, active: Sequence[str] | None = None, precision: str = "fp32"
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``task``'s head on a loader.

    ``active``: the tasks whose deltas act, ``task`` last; default ``task`` alone.
    ``precision``: as in :class:`TrainConfig` (autocast for bf16 / fp16)."""
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


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _batches(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int, bucket: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffled batches: epoch e is shuffled with seed + e."""
    epoch = 0
    while True:
        if bucket:
            yield from bucketed_loader(dataset, tokenizer, batch_size, seed + epoch)
        else:
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
    Keeps a copy of the best-on-dev parameters of ``groups`` and restores it at the end.

    No host syncs between records: the loss is summed on the device and read back every
    ``config.log_every`` steps (and at dev evaluations), gradient clipping returns a tensor."""
    config.validate()
    device = model.device
    optimizer = make_optimizer(groups, device, config.weight_decay)
    train_step = TrainStep(model, optimizer, config.precision, config.compile, config.grad_clip)
    precision = train_step.precision
    base_lrs = [g["lr"] for g in groups]
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    params = train_step.params
    snapshot = lambda: [p.detach().clone() for p in params]  # noqa: E731
    best, best_state, best_step, bad_evals, history = {"accuracy": -1.0}, snapshot(), 0, 0, []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.max_steps, desc=desc, disable=not config.progress, leave=False)
    loss_sum, seen, t_log, since = torch.zeros((), device=device), 0, time.perf_counter(), 0
    with frozen_linears_in(model.backbone, precision):
        for step in range(1, config.max_steps + 1):
            active, batch = next_batch()
            model.activate(*active)
            for d in model.active_deltas():
                d.on_train_step(step - 1, config.max_steps)  # e.g. a fusion's temperature schedule
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * _schedule(step - 1, config.max_steps, warmup)
            loss = train_step(batch, labels)
            loss_sum += loss
            seen, since = seen + len(labels), since + 1
            evaluate_now = step % config.eval_every == 0 or step == config.max_steps
            if step % config.log_every == 0 or evaluate_now:
                now = time.perf_counter()
                record = {"step": step, "loss": float(loss_sum) / since, "lr": optimizer.param_groups[0]["lr"],
                          "samples_per_s": seen / (now - t_log)}
                if evaluate_now:
                    with autocast(precision, device):
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
                loss_sum, seen, since, t_log = torch.zeros((), device=device), 0, 0, time.perf_counter()
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
    batches = _batches(train_ds, tokenizer, config.batch_size, config.seed, config.bucket)
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
        streams[name] = _batches(ds, tokenizer, config.batch_size, config.seed + 7919 * i, config.bucket)
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

"""The one training loop: train the active task's delta and head, early-stop on dev.

Everything that trains a delta (examples, tests, the stream scheduler, joint training) calls
:func:`train_task` or :func:`train_joint`, which share :func:`fit`; the protocol itself (schedule,
evaluation, early stopping, best weights) is :class:`~continual.training.protocol.Protocol`.
Loop state lives in local variables, not on an object; progress goes to a tqdm bar and, record by
record, to an optional ``callback(record)`` (a logger plugs in there).
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Sequence

import numpy as np
import torch
from datasets import DatasetDict

from adapters import DeltaModel
from .dropout import fast_dropout
from adapters.precision import autocast, frozen_linears_in

from . import distributed
from .config import TrainConfig, TrainResult, check_lengths
from .data import endless_batches, eval_loader, tokenize
from .evaluate import evaluate
from . import malloc
from .protocol import Protocol, Record
from .step import AdjustGrads, ExtraLoss, TrainStep, make_optimizer

Batch = dict[str, torch.Tensor]

# Joint training gives task i's batch stream the seed ``seed + JOINT_SEED_STRIDE * i``: a prime
# stride, so the streams of different tasks (and of neighbouring seeds) never share a shuffle.
JOINT_SEED_STRIDE = 7919


def param_groups(model: DeltaModel, active: Sequence[str], config: TrainConfig,
                 extra: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Optimizer groups of the unfrozen tasks among ``active``, plus ``extra`` groups."""
    groups = [g for name in active if not model.task(name).frozen for g in model.task(name).param_groups(config.lr, config.head_lr)]
    groups += [dict(g) for g in extra]
    if not groups:
        raise ValueError(f"nothing to train: tasks {list(active)} are frozen and no other parameters were given")
    return groups


def fit(
    model: DeltaModel,
    groups: list[dict[str, Any]],
    next_batch: Callable[[], tuple[Sequence[str], Batch]],
    dev: Callable[[], dict[str, float]],
    config: TrainConfig,
    callback: Callable[[Record], None] | None,
    desc: str,
    tasks_vary: bool = False,
    extra_loss: ExtraLoss | None = None,
    adjust_grads: AdjustGrads | None = None,
) -> TrainResult:
    """The step loop shared by single-task and joint training.

    ``next_batch`` gives (tasks to activate, batch); ``dev`` scores the model on held-out data;
    ``tasks_vary``: steps activate different tasks, so some trained parameters get no gradient in
    a step (matters to DDP); ``extra_loss``: a strategy's term added to each step's loss, and
    ``adjust_grads`` its change to each step's gradients (one process only: they run outside DDP). The parameters of ``groups`` end with their best-on-dev values."""
    distributed.check_batch(config.batch_size)
    device = model.device
    malloc.apply(config.malloc, device.type)
    optimizer = make_optimizer(groups, device, config.weight_decay)
    net = distributed.wrap(model, find_unused=tasks_vary)  # DDP over what trains now, when there are several processes
    if (extra_loss is not None or adjust_grads is not None) and net is not model:
        raise ValueError("a loss term or gradient change outside the model (replay, EWC, LwF, A-GEM) cannot train "
                         "data-parallel; run one process")
    train_step = TrainStep(net, optimizer, config.precision, config.compile, config.grad_clip, extra_loss, adjust_grads)
    precision = train_step.precision

    def scored() -> dict[str, float]:
        with autocast(precision, device):
            return dev()

    protocol = Protocol(config, train_step.params, optimizer, scored, callback, desc)
    model.train(config.dropout)
    with frozen_linears_in(model.backbone, precision, model.lm_head), fast_dropout(model.backbone, config.dropout_masks):
        while not protocol.should_stop:
            active, batch = next_batch()
            model.activate(*active)
            for d in model.active_deltas():
                d.on_train_step(protocol.step, config.max_steps)  # e.g. a fusion's temperature schedule
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            protocol.before_step()
            if net is model:
                loss = train_step(batch, labels)
            else:  # this rank's slice of the global batch; the loss logged is the global batch's
                loss = distributed.mean(train_step(*distributed.local_slice(batch, labels)))
            protocol.after_step(loss, len(labels))
    result = protocol.finish()
    model.eval()
    if net is not model:  # DDP's gradient hooks go with it, before the next task wraps the model
        del train_step, net
        gc.collect()
    return result


def _check_splits(task: str, data: DatasetDict) -> None:
    for split in ("train", "dev"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"task {task!r}: the {split} split is missing or empty")


def _prepare(model: DeltaModel, config: TrainConfig, tokenizer: Any) -> Any:
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError("training needs a tokenizer (the model has none)")
    torch.manual_seed(config.seed)
    model.to(config.torch_device())
    return tokenizer


def train_task(
    model: DeltaModel,
    task: str,
    data: DatasetDict,
    config: TrainConfig = TrainConfig(),
    tokenizer: Any = None,
    callback: Callable[[Record], None] | None = None,
    *,
    active: Sequence[str] | None = None,
    extra_groups: Sequence[dict[str, Any]] = (),
    extra_loss: ExtraLoss | None = None,
    adjust_grads: AdjustGrads | None = None,
) -> TrainResult:
    """Train task ``task``'s delta + head on ``data["train"]``, early-stopping on ``data["dev"]``.

    ``active``: the tasks whose deltas act during training, ``task`` last (its head gives the
    logits); every unfrozen one among them trains. Default: ``task`` alone. ``extra_groups``:
    further optimizer groups (e.g. backbone weights for full fine-tuning); ``extra_loss``: a term
    added to each step's loss (:data:`~continual.training.step.ExtraLoss`); ``adjust_grads``: a
    change to each step's gradients (:data:`~continual.training.step.AdjustGrads`).
    At the end the trained parameters hold their best-on-dev values. Nothing else changes."""
    _check_splits(task, data)
    active = tuple(active or (task,))
    check_lengths(model, config.max_length, [c for name in active for c in model.task(name).configs])
    tokenizer = _prepare(model, config, tokenizer)
    start = model.decoder_start_id
    train_ds = tokenize(data["train"], tokenizer, config.max_length, decoder_start=start)
    dev_loader = eval_loader(data["dev"], tokenizer, config.max_length, config.batch_size * 2, decoder_start=start)
    model.activate(*active)
    groups = param_groups(model, active, config, extra_groups)
    batches = endless_batches(train_ds, tokenizer, config.batch_size, config.seed, config.bucket)
    return fit(model, groups, lambda: (active, next(batches)), lambda: evaluate(model, task, dev_loader, active),
               config, callback, f"train {task}", extra_loss=extra_loss, adjust_grads=adjust_grads)


def train_joint(
    model: DeltaModel,
    tasks: dict[str, tuple[Sequence[str], DatasetDict]],
    config: TrainConfig = TrainConfig(),
    tokenizer: Any = None,
    callback: Callable[[Record], None] | None = None,
) -> TrainResult:
    """Multi-task training: each step takes a one-task batch, the task drawn in proportion to its
    training-set size (seeded). ``tasks``: name -> (tasks to activate, data). Early stopping and
    the best checkpoint use the mean dev accuracy over tasks."""
    if not tasks:
        raise ValueError("train_joint needs at least one task")
    for name, (_, data) in tasks.items():
        _check_splits(name, data)
    tokenizer = _prepare(model, config, tokenizer)
    names = list(tasks)
    streams, devs, sizes = {}, {}, []
    for i, (name, (_, data)) in enumerate(tasks.items()):
        ds = tokenize(data["train"], tokenizer, config.max_length, decoder_start=model.decoder_start_id)
        streams[name] = endless_batches(ds, tokenizer, config.batch_size, config.seed + JOINT_SEED_STRIDE * i, config.bucket)
        devs[name] = eval_loader(data["dev"], tokenizer, config.max_length, config.batch_size * 2,
                                 decoder_start=model.decoder_start_id)
        sizes.append(len(ds))
    rng = np.random.default_rng(config.seed)
    probs = np.asarray(sizes, dtype=float) / sum(sizes)
    # Everything any task trains, trainable at once while the groups are collected; each step then
    # activates one task's set, and AdamW skips the parameters that got no gradient.
    # (a shared delta appears in several tasks' lists: de-duplicated, it gets one group)
    involved = tuple(dict.fromkeys(n for active, _ in tasks.values() for n in active))
    model.activate(*involved)
    groups = param_groups(model, involved, config)

    def next_batch() -> tuple[Sequence[str], Batch]:
        name = names[rng.choice(len(names), p=probs)]
        return tuple(tasks[name][0]), next(streams[name])

    def dev() -> dict[str, float]:
        scores = [evaluate(model, n, devs[n], tasks[n][0]) for n in names]
        common = [k for k in scores[0] if all(k in s for s in scores)]  # classification and generative tasks differ
        return {k: float(np.mean([s[k] for s in scores])) for k in common}

    return fit(model, groups, next_batch, dev, config, callback, "train joint", tasks_vary=len(names) > 1)

"""The interface between the scheduler and a way of giving a stream's tasks parameters.

The scheduler (:mod:`continual.scheduler`) only calls the methods of :class:`Strategy`; a new
strategy is a new subclass in this package, registered in ``strategies/__init__.py``, with no
branch elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from adapters import DEFAULT_METHOD, CheckpointError, DeltaConfig, DeltaModel, get_method, load_delta
from adapters.base import DECODER_REFUSAL
from adapters.errors import BaseModelMismatch
from adapters.model import MethodSpec
from adapters.spec import method_configs
from streams import Task, TaskStream

from ..training import AdjustGrads, ExtraLoss, TrainConfig, TrainResult, evaluate, eval_loader, train_task

#: ``data(task)`` gives a task's tokenised splits (the scheduler tokenises each task once).
TaskData = Callable[[Task], Any]


def check_option(strategy: str, key: str, value: Any, ok: Callable[[Any], bool], what: str,
                 integer: bool = False) -> None:
    """Refuse a strategy option that is not a number (an integer where ``integer``; never a bool)
    for which ``ok`` holds, as ``<strategy>: <key> must be <what>, got <value>``."""
    if not isinstance(value, int if integer else (int, float)) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{strategy}: {key} must be {what}, got {value!r}")


def check_choice(strategy: str, key: str, value: Any, choices: Sequence[str]) -> None:
    """Refuse a strategy option that is not one of ``choices``, as ``<strategy>: <key> must be one
    of <choices>, got <value>``."""
    if value not in choices:
        raise ValueError(f"{strategy}: {key} must be one of {', '.join(choices)}, got {value!r}")


def flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``tensors`` as one vector, each None as zeros shaped like its partner in ``like`` (a
    gradient a parameter did not get): what the gradient projections compute with."""
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for t, p in zip(tensors, like)])


def finite_at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: low <= v < float("inf")


def head_of(task: Task) -> dict[str, Any]:
    """``add_task`` arguments for ``task``'s head: the model's own LM head for a generative task
    (its answer words kept as labels), a classifier over its labels otherwise."""
    if task.generative:
        return {"generative": True, "label_names": task.label_names or None}
    return {"label_names": task.label_names}


def add_task(model: DeltaModel, task: Task, methods: Sequence[DeltaConfig]) -> None:
    """Add ``task`` to ``model``: a fresh delta of ``methods``, or, for a task that names a saved
    delta to start from (``task.delta``: a PEFT adapter or a task checkpoint), that delta, with a
    fresh head either way; a delta given with ``train: false`` stays frozen (its head trains)."""
    if task.delta is None:
        model.add_task(task.name, methods, **head_of(task))
        return
    try:
        load_delta(model, task.delta["path"], task.name, strict_backbone=task.delta["check_base"], **head_of(task))
    except BaseModelMismatch as e:  # the Python remedy (strict_base=False) is not the stream file's
        raise CheckpointError(f"task {task.name!r} (its 'delta:' in the stream file): {e.reason}; load it onto that "
                              "model (--backbone), or, if it is the same model under another name, give the task "
                              "delta: {path: ..., check_base: false}") from None
    except CheckpointError as e:  # the file's problem, said with the task whose 'delta:' names it
        raise CheckpointError(f"task {task.name!r} (its 'delta:' in the stream file): {e}") from None
    if not task.delta["train"]:
        model.freeze_delta(task.name)


def nothing_to_train(model: DeltaModel, task: Task) -> bool:
    """A task whose delta is used frozen and whose head has no weights (a generative task's)."""
    t = model.task(task.name)
    return task.delta is not None and not task.delta["train"] and t.head_parameters() == 0


class Strategy:
    """Base class. Subclasses say which parameters each task gets and how a step is trained."""

    name: ClassVar[str]
    description: ClassVar[str]
    trains_backbone: ClassVar[bool] = False
    # True when training a task also changes earlier tasks' parameters (their heads): every task so
    # far is then exported again after each step, so saved checkpoints match the final model.
    updates_old_tasks: ClassVar[bool] = False
    # False where a strategy can only train classification tasks (Avalanche's, through its model)
    generative_tasks: ClassVar[bool] = True
    # False where a strategy can only train generative tasks (LAMOL's language model writes its examples)
    classification_tasks: ClassVar[bool] = True
    # False where training does not go through continual.training.fit (Avalanche's own trainer),
    # which is what runs data-parallel over several processes, or adds a loss term outside the model
    data_parallel: ClassVar[bool] = True
    #: why it cannot (said when a run on several processes is refused)
    data_parallel_why: ClassVar[str] = "its loss has a term computed outside the model"
    # True where training runs in another library's loop (Avalanche's), which keeps dropout on
    own_loop: ClassVar[bool] = False
    #: the options a strategy takes and their defaults (shown by ``continual list strategies``)
    defaults: ClassVar[dict[str, Any]] = {}
    # True where a task may start from a saved delta (``delta:`` in a stream file): the strategy
    # gives each task a delta of its own, added through :func:`add_task`
    starts_from_deltas: ClassVar[bool] = False
    # True where reports() runs the model (rank 0 alone calls it: with a sharded backbone every
    # forward pass needs all processes, so such a strategy cannot shard it)
    reports_run_model: ClassVar[bool] = False
    #: the stream's last task (set by :meth:`check_stream`, which a run calls first; None before)
    final: str | None = None
    #: names of the tasks a strategy adds for itself (a shared delta's holder): refused as a stream's
    reserved: ClassVar[tuple[str, ...]] = ()

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,)) -> None:
        # typed at the edge: a method name or dict becomes its validated config here
        # (a string in the command line's grammar too: "lora:rank=4")
        self.methods: list[DeltaConfig] = method_configs(methods)

    def remember(self, task: Task) -> None:
        """Add ``task`` to ``self.seen``, the tasks finished so far in stream order, once (a resumed
        run finishes its done steps again to rebuild them), for strategies that look back at them."""
        seen = self.__dict__.setdefault("seen", [])
        if task.name not in [t.name for t in seen]:
            seen.append(task)

    def check_stream(self, stream: TaskStream, model: DeltaModel, max_length: int | None = None) -> None:
        """Refuse, before anything runs, a stream this strategy cannot train on ``model`` (tasks
        without their own length use ``max_length``):
        generative tasks on a backbone without a language-model head or under a strategy that only
        trains classifiers; a method that cannot act on a decoder-only backbone on one; tasks that
        start from a saved delta under one that cannot use it."""
        generative = [t.name for t in stream if t.generative]
        if generative and model.lm_head is None:
            raise ValueError(f"tasks {generative} are generative (text answers), but the backbone {model.backbone_name!r} "
                             "has no language-model head; use a decoder, e.g. --backbone smollm2")
        if generative and not self.generative_tasks:
            raise ValueError(f"strategy {self.name!r} trains classification tasks only; tasks {generative} are generative")
        classifiers = [t.name for t in stream if not t.generative]
        if classifiers and not self.classification_tasks:
            raise ValueError(f"strategy {self.name!r} trains generative tasks only (text answers, on a decoder); tasks "
                             f"{classifiers} are classification tasks; use generative ones (e.g. --stream generative "
                             "--backbone smollm2)")
        if model.spec.kind == "decoder":  # a method that chooses by a query over the input (L2P, CODA-Prompt, ...)
            for m in self.methods:
                if not get_method(m.method).capabilities.decoders:
                    raise ValueError(DECODER_REFUSAL.format(method=m.method, backbone=model.backbone_name))
        for t in stream:  # here, not when the task's turn comes: earlier tasks would train first
            self.check_name(t.name)
        self.final = stream[len(stream) - 1].name if len(stream) else None
        named = [t.name for t in stream if t.delta is not None]
        if named and not self.starts_from_deltas:
            raise ValueError(f"tasks {named} start from a saved delta ('delta:' in the stream file), which strategy "
                             f"{self.name!r} cannot use (it does not give each task a delta of its own); use per-task "
                             "or per-task-fusion")

    def check_name(self, name: str) -> None:
        """Refuse a task name this strategy uses for a task of its own (:attr:`reserved`)."""
        if name in self.reserved:
            raise ValueError(f"task name {name!r} is reserved by the {self.name} strategy; rename the task")

    def plan(self, num_tasks: int) -> list[list[int]]:
        """Training steps: the task indices trained together at each step. One row of the
        accuracy matrix is filled after each step (the row of its last task)."""
        return [[i] for i in range(num_tasks)]

    def ends_stream(self, tasks: Sequence[Task]) -> bool:
        """True when a training step of ``tasks`` is the stream's last: what a strategy keeps only
        for later tasks (EWC's Fisher, OGD's directions) need not be computed after it."""
        return self.final is not None and tasks[-1].name == self.final

    def prepare(self, model: DeltaModel, task: Task) -> None:
        """Add the task's untrained parameters (the caller seeds the RNG first)."""
        raise NotImplementedError

    def active(self, task: str) -> tuple[str, ...]:
        """Tasks to activate to run ``task`` (its own last: its head gives the logits)."""
        return (task,)

    def trains_with(self, task: str) -> tuple[str, ...]:
        """Tasks acting while ``task`` trains, its own last (default: what scores it, :meth:`active`;
        I-LoRA trains a fast delta and answers with a slow one)."""
        return self.active(task)

    def exported(self, task: str) -> tuple[str, ...]:
        """Tasks saved as shareable checkpoints after ``task``'s step (default: what it runs with)."""
        return self.active(task)

    def reports(self, model: DeltaModel, task: Task, loader: Any, directory: Path) -> dict[str, Path]:
        """Files about ``task`` after its step (logged with the step's run); default none."""
        return {}

    def train(self, model: DeltaModel, tasks: list[Task], config: TrainConfig, data: TaskData,
              callback: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        """Train one step."""
        (task,) = tasks
        if nothing_to_train(model, task):  # a frozen imported delta on a generative task: scored on dev only
            start = time.perf_counter()
            loader = eval_loader(data(task)["dev"], model.tokenizer, config.max_length, config.batch_size * 2,
                                 decoder_start=model.decoder_start_id)
            dev = evaluate(model, task.name, loader, self.active(task.name), config.precision)
            return TrainResult(dev, 0, 0, time.perf_counter() - start, [])
        return train_task(model, task.name, data(task), config, callback=callback, active=self.trains_with(task.name),
                          extra_loss=self.loss_term(model, task, config, data),
                          adjust_grads=self.grad_change(model, task, config, data))

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: TaskData) -> ExtraLoss | None:
        """A term added to each training step's loss on ``task`` (replay, a penalty, distillation);
        default none. See :data:`continual.training.ExtraLoss`."""
        return None

    def grad_change(self, model: DeltaModel, task: Task, config: TrainConfig, data: TaskData) -> AdjustGrads | None:
        """A change to each training step's gradients on ``task`` after the backward pass (A-GEM's
        projection; SI only reads them); default none. See :data:`continual.training.AdjustGrads`."""
        return None

    def finish(self, model: DeltaModel, task: Task) -> None:
        """After training: freeze what must not change any more."""
        model.freeze(task.name)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        """Everything training changed, to resume a stream after this step."""
        return {f"tasks.{k}": v for k, v in model.tasks.state_dict().items()}

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        tasks = {k[len("tasks."):]: v for k, v in state.items() if k.startswith("tasks.")}
        model.tasks.load_state_dict(tasks, strict=True)

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        """Parameters trained for this task (delta + head, or more)."""
        t = model.task(task.name)
        return (0 if t.delta_frozen else t.delta_parameters()) + t.head_parameters()  # a delta used frozen trains nothing

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "methods": [m.to_dict() for m in self.methods]}

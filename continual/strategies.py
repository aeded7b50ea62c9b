"""How a stream's tasks get parameters and are trained: our method and the baselines.

- ``per-task``  one new delta + head per task, trained then frozen. Old tasks' deltas are never
                touched again, so their predictions cannot change: BWT is exactly 0.
- ``per-task-fusion``  per-task deltas, plus for each task an AdapterFusion over all deltas so far
                (its own included), through which the task is scored (continual fusion).
- ``seq-delta`` one delta shared by all tasks, trained on each task in turn (new head per task).
- ``seq-ft``    sequential full fine-tuning of the backbone (new head per task): the classic
                catastrophic-forgetting baseline.
- ``joint``     one shared delta trained on all tasks at once (multi-task): the upper bound; it
                fills only the last row of the accuracy matrix.
- ``avalanche-naive|ewc|lwf|replay|agem``  Avalanche's strategies on the same backbone and stream
                (``continual.avalanche_strategies``; the ``[avalanche]`` extra).

The runner (``continual.runner``) only calls the methods of :class:`Strategy`; a new strategy is a
new subclass here, with no branch elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from .train import TrainConfig, TrainResult, train_joint, train_task

SHARED = "shared_delta"  # the task holding a shared delta (no head)


class Strategy:
    """Base class. Subclasses say which parameters each task gets and how a step is trained."""

    name: ClassVar[str]
    description: ClassVar[str]
    trains_backbone: ClassVar[bool] = False
    # True when training a task also changes earlier tasks' parameters (their heads): every task so
    # far is then exported again after each step, so saved checkpoints match the final model.
    updates_old_tasks: ClassVar[bool] = False

    def __init__(self, methods: Sequence[MethodSpec] = ("bottleneck",)) -> None:
        self.methods = list(methods)

    def plan(self, num_tasks: int) -> list[list[int]]:
        """Training steps: the task indices trained together at each step. One row of the
        accuracy matrix is filled after each step (the row of its last task)."""
        return [[i] for i in range(num_tasks)]

    def prepare(self, model: DeltaModel, task: Task) -> None:
        """Add the task's untrained parameters (the caller seeds the RNG first)."""
        raise NotImplementedError

    def active(self, task: str) -> tuple[str, ...]:
        """Tasks to activate to run ``task`` (its own last: its head gives the logits)."""
        return (task,)

    def exported(self, task: str) -> tuple[str, ...]:
        """Tasks saved as shareable checkpoints after ``task``'s step (default: what it runs with)."""
        return self.active(task)

    def reports(self, model: DeltaModel, task: Task, loader: Any, directory: Path) -> dict[str, Path]:
        """Files about ``task`` after its step (logged with the step's run); default none."""
        return {}

    def train(self, model: DeltaModel, tasks: list[Task], config: TrainConfig, data: Callable[[Task], Any],
              callback: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        """Train one step. ``data(task)`` gives the task's (tokenised) splits."""
        (task,) = tasks
        return train_task(model, task.name, data(task), config, callback=callback, active=self.active(task.name))

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
        return t.delta_parameters() + t.head_parameters()

    def describe(self) -> dict[str, Any]:
        from adapters import make_config

        return {"strategy": self.name, "methods": [make_config(m).to_dict() for m in self.methods]}


class PerTaskDelta(Strategy):
    name = "per-task"
    description = "a new delta + head per task, frozen after training (no forgetting by construction)"

    def prepare(self, model: DeltaModel, task: Task) -> None:
        model.add_task(task.name, self.methods, label_names=task.label_names)


class _SharedDelta(Strategy):
    """One delta shared by every task (a head-only task per task on top of it)."""

    def prepare(self, model: DeltaModel, task: Task) -> None:
        if task.name == SHARED:
            raise ValueError(f"task name {SHARED!r} is reserved by the {self.name} strategy; rename the task")
        if SHARED not in model.tasks:
            model.add_task(SHARED, self.methods)
        model.add_task(task.name, [], label_names=task.label_names)

    def active(self, task: str) -> tuple[str, ...]:
        return (SHARED, task)

    def finish(self, model: DeltaModel, task: Task) -> None:
        model.freeze(task.name)  # the head; the shared delta keeps training on the next task

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        return model.task(SHARED).delta_parameters() + model.task(task.name).head_parameters()


class SequentialDelta(_SharedDelta):
    name = "seq-delta"
    description = "one shared delta trained on each task in turn (baseline: forgets)"


class Joint(_SharedDelta):
    name = "joint"
    description = "one shared delta trained on all tasks at once (multi-task upper bound; last row only)"

    def plan(self, num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]

    def train(self, model, tasks, config, data, callback):
        spec = {t.name: (self.active(t.name), data(t)) for t in tasks}
        # The same number of steps per task as a sequential run gets.
        config = dataclasses.replace(config, max_steps=config.max_steps * len(tasks))
        return train_joint(model, spec, config, callback=callback)


class ContinualFusion(PerTaskDelta):
    """Per-task deltas, plus for each new task an AdapterFusion over every delta so far (its own
    included), trained with a head after the task's own delta is frozen (Pfeiffer et al.'s two
    stages, repeated along the stream). The task is then scored through its fusion. Everything
    trained is frozen, so BWT stays exactly 0; FWT shows what fusing earlier tasks brings."""

    name = "per-task-fusion"
    description = "per-task deltas, then for each task an AdapterFusion over all deltas so far (its own included)"
    SUFFIX = "_fusion"

    def __init__(self, methods: Sequence[MethodSpec] = ("bottleneck",), **fusion: Any) -> None:
        super().__init__(methods)
        self.fusion = fusion  # FusionConfig fields

    def fused(self, task: str) -> str:
        return task + self.SUFFIX

    def prepare(self, model: DeltaModel, task: Task) -> None:
        from fusion import FusionConfig

        if task.name.endswith(self.SUFFIX):
            raise ValueError(f"task names ending in {self.SUFFIX!r} are reserved by the {self.name} strategy; rename {task.name!r}")
        super().prepare(model, task)
        sources = tuple(n for n in model.tasks if not n.endswith(self.SUFFIX))
        model.add_task(self.fused(task.name), [FusionConfig(sources=sources, **self.fusion)], label_names=task.label_names)

    def active(self, task: str) -> tuple[str, ...]:
        return (self.fused(task),)

    def exported(self, task: str) -> tuple[str, ...]:
        return (task, self.fused(task))  # the fusion is of no use without its own source

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        own = train_task(model, task.name, data(task), config, callback=callback, active=(task.name,))
        model.freeze(task.name)
        fused = model.task(self.fused(task.name))
        fused.head.load_state_dict(model.task(task.name).head.state_dict())  # start from the task's own head

        def shifted(record: dict[str, Any]) -> None:  # stage 2 steps continue stage 1's in the logs
            callback({**record, "step": record["step"] + own.steps, "stage": 2})

        result = train_task(model, self.fused(task.name), data(task), config, callback=shifted if callback else None)
        result.seconds += own.seconds
        return result

    def finish(self, model: DeltaModel, task: Task) -> None:
        model.freeze(task.name)
        model.freeze(self.fused(task.name))

    def reports(self, model: DeltaModel, task: Task, loader: Any, directory: Path) -> dict[str, Path]:
        """The fusion's attention per layer x delta on the task's test set: CSV, Markdown, heatmap."""
        from fusion import fusion_weights

        fusion_weights(model, self.fused(task.name), loader).save(directory)
        return {"fusion": directory}

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        own, fused = model.task(task.name), model.task(self.fused(task.name))
        return own.delta_parameters() + own.head_parameters() + fused.delta_parameters() + fused.head_parameters()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fusion": dict(self.fusion)}


class SequentialFineTune(Strategy):
    name = "seq-ft"
    description = "sequential full fine-tuning of the backbone, new head per task (baseline: forgets)"
    trains_backbone = True

    def __init__(self, methods: Sequence[MethodSpec] = (), backbone_lr: float = 5e-5) -> None:
        super().__init__(methods)
        self.backbone_lr = backbone_lr

    def prepare(self, model: DeltaModel, task: Task) -> None:
        model.add_task(task.name, [], label_names=task.label_names)

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        params = list(model.backbone.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            group = {"params": params, "lr": self.backbone_lr, "name": "backbone"}
            return train_task(model, task.name, data(task), config, callback=callback, extra_groups=[group])
        finally:
            for p in params:
                p.requires_grad_(False)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        out.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        model.backbone.load_state_dict(backbone, strict=True)

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        return model.backbone_parameters() + model.task(task.name).head_parameters()

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "methods": [], "backbone_lr": self.backbone_lr}


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (PerTaskDelta, ContinualFusion, SequentialDelta, SequentialFineTune, Joint)
}

# Avalanche's strategies as baselines (the [avalanche] extra; the module imports avalanche lazily,
# so they are listed without it and say how to install it when used).
from .avalanche_strategies import AVALANCHE_STRATEGIES  # noqa: E402  (needs SequentialFineTune above)

STRATEGIES.update({s.name: s for s in AVALANCHE_STRATEGIES})


def make_strategy(name: str, methods: Sequence[MethodSpec] = ("bottleneck",), **options: Any) -> Strategy:
    """A strategy by name (see ``STRATEGIES``); ``options`` go to its constructor (e.g.
    ``ewc_lambda`` for ``avalanche-ewc``, ``temperature`` for ``per-task-fusion``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; one of: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    try:
        return cls(**options) if cls.trains_backbone else cls(methods, **options)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad option(s) {sorted(options)}: {e}") from None

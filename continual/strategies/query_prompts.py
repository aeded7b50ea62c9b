"""What the prompt strategies that choose by a query share (L2P, CODA-Prompt, DualPrompt).

Each trains one delta of its own method shared by every task (a head per task on top), whose
prompt each input chooses by its query over the frozen backbone, so no task id is needed at test
time (decoder-only backbones are refused before anything runs, by :meth:`Strategy.check_stream`,
as for every method whose ``capabilities.decoders`` is False). :class:`TaskSlots` adds what
CODA-Prompt and DualPrompt share: the delta keeps a part per task (``delta.task_names(t)``), set up when the task starts
(``delta.begin_task(t)``) and trained with the parts every task trains (``always``); the other
tasks' parts are held fixed, and a stream longer than the delta's ``tasks`` is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from adapters import Delta, DeltaModel
from adapters.model import MethodSpec
from streams import Task, TaskStream

from ..training import ExtraLoss, TrainConfig
from .base import check_option, finite_at_least
from .shared_delta import SHARED, _SharedDelta


class QueryPrompts(_SharedDelta):
    method: ClassVar[str]   # the one method it trains
    example: ClassVar[str]  # a setting of it, shown when another method is given
    data_parallel = False  # its loss term (a key pull, CODA-Prompt's penalty) is added outside the data-parallel model

    def __init__(self, methods: Sequence[MethodSpec], pull_lambda: float | None = None) -> None:
        """``pull_lambda``: the weight of the key pull the delta records after each forward pass
        (``delta.pull``: L2P's and DualPrompt's matching term), added to each step's loss; None
        for a delta without one."""
        super().__init__(methods)
        if [m.method for m in self.methods] != [self.method]:
            raise ValueError(f"{self.name} trains one {self.method} shared by every task: its method must be {self.method} "
                             f"alone (e.g. --method {self.method}:{self.example}), got {[m.method for m in self.methods]}")
        if pull_lambda is not None:
            check_option(self.name, "pull_lambda", pull_lambda, finite_at_least(0), "a finite number >= 0")
        self.pull_lambda = None if pull_lambda is None else float(pull_lambda)

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any) -> ExtraLoss | None:
        if not self.pull_lambda:
            return None
        delta = self.delta(model)
        return lambda batch, labels, logits: self.pull_lambda * delta.pull

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        return out if self.pull_lambda is None else {**out, "pull_lambda": self.pull_lambda}

    def delta(self, model: DeltaModel) -> Delta:
        """The shared delta of the strategy's method."""
        return model.task(SHARED).deltas[self.method]


class TaskSlots(QueryPrompts):
    always: ClassVar[frozenset[str]] = frozenset()  # parameters every task trains (DualPrompt's general prompt)

    def __init__(self, methods: Sequence[MethodSpec], pull_lambda: float | None = None) -> None:
        super().__init__(methods, pull_lambda)
        self.current = 0  # the task whose part trains (set by prepare; rebuilt on resume)

    def too_long(self, n: int) -> str:
        """Why a stream of ``n`` tasks does not fit the delta's ``tasks``, and the setting that does."""
        raise NotImplementedError

    def check_stream(self, stream: TaskStream, model: DeltaModel, max_length: int | None = None) -> None:
        super().check_stream(stream, model, max_length)
        if len(stream) > self.methods[0].tasks:
            raise ValueError(self.too_long(len(stream)))

    def own(self, model: DeltaModel) -> set[str]:
        """The delta's parameters the current task trains, by name within the delta."""
        return {*self.always, *self.delta(model).task_names(self.current)}

    def prepare(self, model: DeltaModel, task: Task) -> None:
        super().prepare(model, task)
        self.current = len([n for n in model.tasks if n != SHARED]) - 1  # this task's place in the stream
        delta = self.delta(model)
        delta.begin_task(self.current)
        mine = self.own(model)
        model.hold(SHARED, [f"deltas.{self.method}.{n}" for n, _ in delta.named_parameters() if n not in mine])

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        mine = self.own(model)
        return (sum(p.numel() for n, p in self.delta(model).named_parameters() if n in mine)
                + model.task(task.name).head_parameters())

"""``progressive-prompts``: a new soft prompt per task, prepended with the frozen prompts of the earlier tasks.

Progressive Prompts, Razdaibiedina et al., "Progressive Prompts: Continual Learning for Language
Models" (ICLR 2023): task k learns a prompt P_k of its own; the input of task k is
``[P_k; P_{k-1}; ...; P_1; x]``, where every earlier prompt is frozen, so training task k can reuse
what they hold (forward transfer) and cannot change how an earlier task is answered (no
forgetting: task j < k is still run with ``[P_j; ...; P_1; x]``). Paper defaults: 10 tokens per
task on T5, 20 on BERT, each prompt reparameterised through a residual two-layer MLP during
training. Here the prompt is any delta with an input transform (``--method prompt``, e.g.
``prompt:num_tokens=10``); each task keeps its own head (a classifier, or the model's LM head).

How we depart from the paper: no residual MLP reparameterisation (the prompt is trained directly,
as in Lester et al.'s prompt tuning); the stream's length is bounded by the backbone's positions
(``max_length`` + every task's prompt tokens must fit, checked before anything runs). Without a
task id (the task-agnostic matrix) the run's router picks which task's prompt chain answers.
"""

from __future__ import annotations

from typing import Sequence

from adapters import DeltaModel, get_method
from adapters.model import MethodSpec
from streams import Task, TaskStream

from ..training import position_limit
from ..training.config import positions_added
from ..training.data import check_generation_room
from .base import Strategy, head_of


class ProgressivePrompts(Strategy):
    name = "progressive-prompts"
    description = "a new soft prompt + head per task, prepended with the earlier tasks' frozen prompts (--method prompt)"

    def __init__(self, methods: Sequence[MethodSpec] = ("prompt:num_tokens=20",)) -> None:  # the paper's length on BERT
        super().__init__(methods)
        kinds = [m.method for m in self.methods if not get_method(m.method).capabilities.input_transform]
        if kinds:
            raise ValueError(f"progressive-prompts chains soft prompts: its methods must prepend to the input (e.g. "
                             f"--method prompt:num_tokens=10); {kinds} do not")
        self.order: list[str] = []  # tasks in stream order, each one's prompt in front of the ones before

    def check_stream(self, stream: TaskStream, model: DeltaModel, max_length: int | None = None) -> None:
        super().check_stream(stream, model, max_length)
        per_task = positions_added(self.methods)
        limit = position_limit(model)
        longest = max((t.max_length or max_length or 0) for t in stream)
        if limit is not None and len(stream) * per_task + longest > limit:
            raise ValueError(f"progressive-prompts: {len(stream)} tasks x {per_task} prompt tokens + the longest task's "
                             f"{longest} tokens exceed the backbone's {limit} positions; use fewer prompt tokens")
        for length in {t.max_length or max_length for t in stream if t.generative and (t.max_length or max_length)}:
            check_generation_room(model, length, len(stream) * per_task)  # the whole chain, then the answer

    def prepare(self, model: DeltaModel, task: Task) -> None:
        model.add_task(task.name, self.methods, **head_of(task))
        if task.name not in self.order:
            self.order.append(task.name)

    def active(self, task: str) -> tuple[str, ...]:
        # earlier tasks first: each active prompt is prepended in turn, so the task's own ends up in front
        return tuple(self.order[:self.order.index(task) + 1]) if task in self.order else (task,)

    def exported(self, task: str) -> tuple[str, ...]:
        return (task,)  # its prompt and head; the chain is the earlier tasks' own checkpoints

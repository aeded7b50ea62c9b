"""``replay``: one shared delta, and a small memory of earlier tasks' examples replayed at every step.

Experience replay with a tiny episodic memory, after Chaudhry et al., "On Tiny Episodic Memories
in Continual Learning" (2019, arXiv:1902.10486): a fixed budget of stored examples, split evenly
between the tasks seen so far; each training step on the new task also trains on a batch drawn
from the memory. Their defaults: a memory batch as large as the task's batch, a budget of a few
examples per class. Ours: ``memory_size=200`` examples in all, ``replay_batch`` = the batch size.

How we depart from the paper:

- Each task's stored examples are the first ones of a seeded permutation of its training split
  (the paper's reservoir sampling gives a uniform sample too, but depends on arrival order). When
  a new task arrives every task's share shrinks to ``memory_size // tasks`` (the earliest tasks
  keep the remainder) by cutting the end of its list, so the memory stays task-balanced and any
  task's memory after row i is a prefix of what it was before.
- The step's loss is the new batch's mean loss *plus* the memory batch's (the paper concatenates
  the two batches into one mean: half of this; AdamW makes the two nearly the same step). A
  memory batch holding several earlier tasks is run task by task, each through the shared delta
  and its own head (a classifier's heads differ; generative tasks share the LM head), and their
  losses are averaged weighted by their share of the memory batch.
- An earlier classification task's head stays frozen (as under ``seq-delta``): replay trains the
  shared delta to keep serving it, where the paper's single network retrains every head.

The memory (the stored indices) is part of the run's saved state, so a resumed run replays
exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task, TaskStream

from ..training import TrainConfig, collate_rows, token_loss
from .base import check_option
from .shared_delta import _SharedDelta


def check_memory_size(strategy: str, size: int, stream: TaskStream, what: str = "example") -> None:
    """Refuse a memory too small to keep one ``what`` of each task the stream's last task trains
    beside (a task left out would be replayed never)."""
    earlier = len(stream) - 1
    if size < earlier:
        raise ValueError(f"{strategy}: memory_size={size} cannot keep one {what} of each earlier task: the stream's "
                         f"last task trains with {earlier} before it; use memory_size >= {earlier}")


def store_share(memory: dict[str, torch.Tensor], task: str, n: int, seed: int, size: int) -> None:
    """Add ``task``'s share of a task-balanced memory of ``size`` indices (the start of a seeded
    permutation of its ``n`` training rows); every task's share shrinks to the even split, the
    earliest tasks keeping the remainder."""
    memory[task] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    share, extra = divmod(size, len(memory))
    for i, name in enumerate(memory):
        memory[name] = memory[name][:share + (1 if i < extra else 0)].clone()


class Replay(_SharedDelta):
    name = "replay"
    description = "one shared delta; a seeded, task-balanced memory of earlier tasks' examples replayed each step"
    defaults = {"memory_size": 200, "replay_batch": None}
    data_parallel = False  # the memory batch's loss is computed outside the data-parallel model

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), memory_size: int = 200,
                 replay_batch: int | None = None) -> None:
        super().__init__(methods)
        for key, v in (("memory_size", memory_size), ("replay_batch", replay_batch)):
            if v is not None or key == "memory_size":  # replay_batch None: the batch size; a memory needs a size
                check_option(self.name, key, v, lambda n: n >= 1, "an integer >= 1", integer=True)
        self.memory_size, self.replay_batch = memory_size, replay_batch
        self.memory: dict[str, torch.Tensor] = {}  # task -> indices into its tokenised training split, in order
        self.seen: list[Task] = []

    def check_stream(self, stream: TaskStream, model: DeltaModel, max_length: int | None = None) -> None:
        super().check_stream(stream, model, max_length)
        check_memory_size(self.name, self.memory_size, stream)

    def finish(self, model: DeltaModel, task: Task) -> None:
        super().finish(model, task)
        self.remember(task)

    def memory_loss(self, model: DeltaModel, data: Any, picks: list[tuple[Task, int]],
                    loss: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Mean loss of a memory batch: each earlier task's rows through the shared delta and that
        task's own head, weighted by their share of the batch. ``loss(task, rows, outputs, labels,
        batch)`` replaces the cross-entropy (a subclass's own memory loss, e.g. DER's logit
        matching); for a generative task it gets the (N, V) logits at the answer's N positions and
        their N labels; ``batch`` is the model's input for those rows (to run them again, e.g.
        through another delta)."""
        total = torch.zeros((), dtype=torch.float32, device=model.device)
        for old in dict.fromkeys(t.name for t, _ in picks):
            t = next(t for t, _ in picks if t.name == old)
            rows = [i for u, i in picks if u.name == old]
            mem = collate_rows(data(t)["train"], rows, model.tokenizer)
            mem = {k: v.to(model.device) for k, v in mem.items()}
            mem_labels = mem.pop("labels")
            if mem_labels.dim() > 1:  # a generative task's: the LM head at its answer's positions alone, as in a step
                mem["logit_positions"] = mem_labels != -100
                mem_labels = mem_labels[mem["logit_positions"]]
            with model.acting(*self.trains_with(old)):
                out = model(**mem)
                term = token_loss(out, mem_labels) if loss is None else loss(t, rows, out, mem_labels, mem)
                total = total + term * (len(rows) / len(picks))
        return total

    def memory_batches(self, task: Task, config: TrainConfig, size: int | None, per_task: bool = False):
        """A function giving one memory batch's picks per call (seeded by the step's seed, so a
        resumed step draws the same batches), or None when the memory holds nothing. With
        ``per_task``, a batch of ``size`` from each earlier task's share per call (GEM's)."""
        pools = [[(t, int(i)) for i in self.memory.get(t.name, ())] for t in self.seen if t.name != task.name]
        pools = [p for p in pools if p] if per_task else [[pick for p in pools for pick in p]]
        if not pools or not pools[0]:
            return None
        size = size or config.batch_size
        gen = torch.Generator().manual_seed(config.seed)
        draw = lambda: [[p[i] for i in torch.randint(len(p), (size,), generator=gen).tolist()] for p in pools]  # noqa: E731
        return draw if per_task else lambda: draw()[0]

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        draw = self.memory_batches(task, config, self.replay_batch)
        if draw is None:
            return None
        return lambda batch, labels, logits: self.memory_loss(model, data, draw())

    def train(self, model, tasks, config, data, callback):
        result = super().train(model, tasks, config, data, callback)
        for t in tasks:
            self._store(t, len(data(t)["train"]), config.seed)
        return result

    def _store(self, task: Task, n: int, seed: int) -> None:
        """Add ``task``'s share of the memory; every task's share shrinks to the even split."""
        store_share(self.memory, task.name, n, seed, self.memory_size)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        out.update({f"replay.{i}": self.memory[name] for i, name in enumerate(self.memory)})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        names = [t.name for t in self.seen]  # rebuilt (prepare + finish of the finished steps) before this
        self.memory = {names[i]: state[f"replay.{i}"].cpu().long() for i in range(len(names)) if f"replay.{i}" in state}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "memory_size": self.memory_size, "replay_batch": self.replay_batch}

"""Scoring a row of the accuracy matrix, re-scoring only what can have changed.

After each step every task seen so far is scored on its test split. With one frozen delta per task
an old task's predictions cannot change, so scoring it again is wasted work that grows with the
square of the stream's length. Here each task's score is stored with a fingerprint of everything
its forward pass reads: the state of the tasks it runs with (its delta and head, and any task
those use, e.g. a fusion's sources) and the backbone's weights. When the fingerprint is unchanged
the score is carried over (and reported as carried); otherwise the task is scored again. Strategies
that change old tasks (seq-ft and Avalanche's change the backbone or old heads, seq-delta the
shared delta) therefore get every entry re-scored, with no flag to set: the fingerprint sees it.

The fingerprint hashes every byte of those tensors (BLAKE2b), not a sample, so a carried score is
exactly what a new scoring would give; ``tests/test_scoring.py`` checks that against full re-scoring.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

import torch
from datasets import DatasetDict
from tqdm.auto import tqdm

from adapters import DeltaModel
from streams import Task

from .training import answers_cut, distributed, eval_loader, prompts_cut, tokenize


def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name, t in tensors:
        t = t.detach()
        if hasattr(t, "to_local"):  # sharded across processes: this rank's shard, which changes iff the whole does
            t = t.to_local()
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tasks_read(model: DeltaModel, active: Iterable[str]) -> list[str]:
    """The tasks whose state a forward pass with ``active`` reads: those, and what their deltas
    are built over (a fusion's sources), transitively, in a fixed order."""
    seen: dict[str, None] = {}
    todo = list(active)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen[name] = None
        todo += [s for d in model.task(name).deltas.values() for s in d.sources()]
    return sorted(seen)


class RowScorer:
    """Scores rows of the matrix, carrying over the entries whose inputs did not change.

    ``score(task)`` gives the task's scores; ``active(task)`` the tasks it runs with.
    ``rescore_all=True`` scores every entry every row (for checking, or for a timing baseline)."""

    def __init__(self, model: DeltaModel, score: Callable[[Any], dict[str, float]],
                 active: Callable[[str], tuple[str, ...]], rescore_all: bool = False) -> None:
        self.model, self.score, self.active, self.rescore_all = model, score, active, rescore_all
        self._last: dict[str, tuple[str, dict[str, float]]] = {}  # task -> (fingerprint, scores)
        self.backbone = ""  # the backbone's digest at the last row

    def fingerprint(self, task: str, backbone: str) -> str:
        tasks = tasks_read(self.model, self.active(task))
        state = ((f"{t}.{k}", v) for t in tasks for k, v in self.model.task(t).state_dict().items())
        return backbone + _digest(state)

    def row(self, tasks: list[Any]) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Scores of each of ``tasks`` (by name), and the names whose scores were carried over."""
        backbone = self.backbone = _digest(self.model.backbone.state_dict().items())
        scores, carried = {}, []
        for task in tasks:
            key = self.fingerprint(task.name, backbone)
            last = self._last.get(task.name)
            if last is not None and last[0] == key and not self.rescore_all:
                scores[task.name] = last[1]
                carried.append(task.name)
            else:
                scores[task.name] = self.score(task)
                self._last[task.name] = (key, scores[task.name])
        return scores, carried

    def forget(self) -> None:
        """Drop every stored score (the model was rebuilt, e.g. on resume)."""
        self._last.clear()


class TokenisedTasks:
    """Each task's splits tokenised once per run (the test sets are scored many times); called
    as ``data(task)`` it is the :data:`~continual.strategies.TaskData` strategies train on."""

    def __init__(self, tokenizer: Any, default_length: int, eval_batch: int, decoder_start: int | None = None) -> None:
        self.tokenizer, self.default_length, self.eval_batch = tokenizer, default_length, eval_batch
        self.decoder_start = decoder_start  # an encoder-decoder's: generative targets go to its decoder
        self._data: dict[str, DatasetDict] = {}
        self._loaders: dict[tuple[str, str], Any] = {}

    def length(self, task: Task) -> int:
        return task.max_length or self.default_length

    def __call__(self, task: Task) -> DatasetDict:
        if task.name not in self._data:
            data = DatasetDict({s: tokenize(ds, self.tokenizer, self.length(task), task.metric, self.decoder_start)
                                for s, ds in task.splits().items()})
            for what, count, loses in (("answers", answers_cut, "are cut"), ("prompts", prompts_cut, "lose their start")):
                cut = {s: count(data[s]) for s in ("train", "test")}
                if any(cut.values()) and distributed.is_main():  # said, never silent: a cut answer caps the score,
                    # a cut prompt loses what it began with (TRACE's instructions come first)
                    tqdm.write(f"task {task.name}: {cut['train']} of {len(data['train'])} training and {cut['test']} of "
                               f"{len(data['test'])} test {what} are longer than max_length {self.length(task)} leaves "
                               f"them and {loses}; raise --max-length (or the task's max_length) to keep them whole")
            seen = task.seen_in_training()
            if any(seen.values()) and distributed.is_main():  # said, never silent: such scores flatter
                tqdm.write(f"task {task.name}: " + " and ".join(f"{seen[s]} of {len(data[s])} {s}" for s in seen if seen[s])
                           + " examples occur verbatim in its training split (duplicates in the data, or the same file); "
                           "their scores measure memory, not generalisation")
            self._data[task.name] = data
        return self._data[task.name]

    def loader(self, task: Task, split: str = "test") -> Any:
        key = (task.name, split)
        if key not in self._loaders:
            self._loaders[key] = eval_loader(self(task)[split], self.tokenizer, self.length(task), self.eval_batch)
        return self._loaders[key]

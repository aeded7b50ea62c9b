"""Scores without the task id: the task-agnostic matrix ``A`` (R_agnostic), filled beside R.

R is task-aware: each test example is run with its own task's deltas and head. The tables the
continual-learning literature on deltas publishes (O-LoRA, InfLoRA, SAPT, TRACE) are made the other
way: one model answers every input and nothing says which task it came from. After each row of
R the scheduler therefore also fills a row of ``A``:

1. a router (:mod:`fusion.routing`: ``mahalanobis``, ``prototype`` or ``linear``, ``TrainConfig.router``) is fitted
   inside the run on the tasks seen so far only: the frozen backbone's sentence embeddings of up
   to :data:`FIT_MAX` training examples of each task, added when the task's step ends (the
   ``perplexity`` router fits nothing: each seen task's deltas say how surprising each test
   example is to them, :mod:`fusion.perplexity`);
2. every test example of every task seen so far is sent to the task the router picks, and is
   answered with that task's ``strategy.active`` deltas and head: a classifier's answer is the
   routed head's label *name*, right when it equals the gold name; a generative answer is
   generated through the routed task's deltas and scored against the example's reference with
   its own task's metric. An example sent to a task of the other kind (a classifier for a
   generative example) scores 0.

So for per-task deltas and continual fusion the router picks the delta; for strategies with one
shared delta (seq-delta, replay, ewc, lwf, joint) it picks only a classification task's head, and
generative tasks, which share the model's LM head, are answered the same whatever the route.

Cost: each example's score is kept with a key of the function that answered it (the contents of
the tasks it read, not their names, and the backbone's weights). An example is answered again only
when its route or that function changed, and the task-aware pass hands its per-example scores over
(:meth:`AgnosticScorer.record`), so a per-task stream answers only the examples routed elsewhere.
The fitted embeddings are part of a run's saved state: a resumed run routes exactly as the
uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from adapters import DeltaModel
from adapters.errors import non_finite_rows, refuse_non_finite
from fusion.routing import embed, make_router, reads_surprise, router_refusal, surprise
from streams import Task

from .scoring import _digest
from .training import answers, batch_logits, eval_loader
from .training.data import length_order, sample_rows
from .training.textscore import score_each

FIT_MAX = 1000  # training examples per task the router is fitted on (a seeded, label-stratified sample)
PREFIX = "agnostic."  # of this scorer's tensors in a run's saved state


def function_key(model: DeltaModel, active: Sequence[str], backbone: str) -> str:
    """What answering with ``active`` computes, independent of the tasks' names: the delta
    configs, parameters, heads (kind, and a classifier's label names) of ``active`` and of what
    their deltas read (a fusion's sources), in order, and the backbone's digest. A generative
    task's answer words are kept as its label names but never read by generation, so they are
    not part of it: under one shared delta every generative route answers as the task's own."""
    header, state = [backbone], []
    order, todo = [], list(active)
    while todo:  # active first, in order, then sources: the order is part of the function
        name = todo.pop(0)
        if name not in order:
            order.append(name)
            todo += [s for d in model.task(name).deltas.values() for s in d.sources()]
    for pos, name in enumerate(order):
        t = model.task(name)
        head = "none" if t.head is None else ("lm" if getattr(t.head, "generative", False) else "cls")
        labels = None if head == "lm" else t.label_names
        header.append(f"{pos}:{[c.to_dict() for c in t.configs]}:{head}:{labels}:{name in active}")
        state += [(f"{pos}.{k}", v) for k, v in t.state_dict().items()]
    return hashlib.blake2b("|".join([*header, _digest(state)]).encode(), digest_size=20).hexdigest()


def check_router(name: str, tasks: Sequence[Task], model: DeltaModel) -> None:
    """Refuse, before the run, a router that cannot route these tasks on this model (its own
    ``refusal``: the perplexity router on a stream mixing kinds of task, or a T5 prompt)."""
    why = router_refusal(name, [t.generative for t in tasks], model.seq2seq)
    if why:
        raise ValueError(f"{why}; choose another router (--router)")


class AgnosticScorer:
    """The router and the per-example score store of one stream run (see the module docstring).

    ``data``: the run's :class:`~continual.scoring.TokenisedTasks`; ``active``: the strategy's
    ``active``; ``precision``: the run's."""

    def __init__(self, model: DeltaModel, data: Any, active: Callable[[str], tuple[str, ...]], router: str = "mahalanobis",
                 seed: int = 0, precision: str = "fp32") -> None:
        self.model, self.data, self.active, self.precision = model, data, active, precision
        self.router_name, self.seed = router, seed
        self.router = self._new_router()
        self.fitted: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (task, embeddings, labels), in order
        self._test_emb: dict[tuple[str, str], torch.Tensor] = {}
        # a router that reads the deltas' surprise (perplexity) fits on nothing and embeds nothing
        self.by_surprise = reads_surprise(self.router)
        self._surprise: dict[tuple[str, str], torch.Tensor] = {}  # (task, function key) -> per test example
        self._scores: dict[tuple[str, str], np.ndarray] = {}  # (task, function key) -> per-example, NaN = not yet

    def _new_router(self) -> Any:
        return make_router(self.router_name, self.seed)

    # -- fitting -------------------------------------------------------------------------------------
    def add_task(self, task: Task) -> None:
        """Fit the router on ``task`` too (at most :data:`FIT_MAX` training examples: :func:`~continual.training.data.sample_rows`)."""
        if self.by_surprise:  # only the task's place: its deltas are asked at scoring time
            self._fit(task.name, torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
            return
        train = self.data(task)["train"]  # tokenised; a classification task's keeps its "label" column
        first = train.select(sample_rows(train, FIT_MAX, self.seed))
        labels = torch.as_tensor(first["label"] if "label" in first.column_names else [0] * len(first))  # free text: one prototype
        # embedded in order of length (batches pad little); the router is fitted on the same order
        order = length_order(first)
        loader = eval_loader(first.select(order), self.model.tokenizer, self.data.length(task), self.data.eval_batch,
                             decoder_start=self.model.decoder_start_id)
        self._fit(task.name, embed(self.model, loader, self.precision), labels[torch.tensor(order, dtype=torch.long)])

    def _fit(self, name: str, emb: torch.Tensor, labels: torch.Tensor) -> None:
        self.fitted.append((name, emb, labels))
        self.router.add_task(name, emb, labels.tolist())

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted embeddings and labels, keyed by position (saved with the run's state)."""
        out = {}
        for i, (_, emb, labels) in enumerate(self.fitted):
            out[f"{PREFIX}{i}.embeddings"], out[f"{PREFIX}{i}.labels"] = emb.contiguous(), labels.contiguous()
        return out

    def load_state(self, names: Sequence[str], state: dict[str, torch.Tensor]) -> None:
        """Refit the router from a saved state: task i of ``names`` on its saved embeddings."""
        self.router, self.fitted = self._new_router(), []
        for i, name in enumerate(names):
            self._fit(name, state[f"{PREFIX}{i}.embeddings"].cpu(), state[f"{PREFIX}{i}.labels"].cpu())

    # -- scoring -------------------------------------------------------------------------------------
    def record(self, task: Task, per_example: Sequence[float], backbone: str) -> None:
        """The task-aware pass's per-example scores of ``task``: answered by its own function."""
        key = function_key(self.model, self.active(task.name), backbone)
        self._scores[(task.name, key)] = np.asarray(per_example, dtype=float)

    def _embeddings(self, task: Task, backbone: str) -> torch.Tensor:
        key = (task.name, backbone)
        if key not in self._test_emb:
            self._test_emb = {k: v for k, v in self._test_emb.items() if k[1] == backbone}  # an old backbone's go
            self._test_emb[key] = embed(self.model, self.data.loader(task), self.precision)
        return self._test_emb[key]

    def _surprises(self, task: Task, tasks: Sequence[Task], keys: Sequence[str]) -> torch.Tensor:
        """(test examples of ``task``, ``tasks``): each one's surprise under each task's function
        (cached by function, as the scores are: a frozen task's column is computed once)."""
        self._surprise = {k: v for k, v in self._surprise.items() if k[1] in keys}  # changed functions' go
        columns = []
        for by, key in zip(tasks, keys):
            if (task.name, key) not in self._surprise:
                self._surprise[(task.name, key)] = surprise(self.model, self.data.loader(task), self.active(by.name),
                                                            self.precision)
            columns.append(self._surprise[(task.name, key)])
        return torch.stack(columns, 1)

    def row(self, tasks: Sequence[Task], backbone: str) -> tuple[list[float], float]:
        """Each of ``tasks``' score with routed tasks (in order) and the routing accuracy.
        ``tasks``: the stream's tasks seen so far, each fitted (:meth:`add_task`) already."""
        fitted = [name for name, _, _ in self.fitted]
        if fitted != [t.name for t in tasks]:
            raise RuntimeError(f"the router was fitted on {fitted}, asked to route over {[t.name for t in tasks]}")
        keys = [function_key(self.model, self.active(t.name), backbone) for t in tasks]
        scores, right, total = [], 0, 0
        for j, task in enumerate(tasks):
            routed = self._surprises(task, tasks, keys) if self.by_surprise else self._embeddings(task, backbone)
            slots = self.router.predict(routed).numpy()
            right, total = right + int((slots == j).sum()), total + len(slots)
            per_example = np.full(len(slots), np.nan)
            for k in np.unique(slots):
                where = np.flatnonzero(slots == k)
                per_example[where] = self._answered(task, tasks[k], keys[k], where)
            scores.append(float(per_example.mean()))
        return scores, right / max(total, 1)

    def _answered(self, task: Task, by: Task, key: str, where: np.ndarray) -> np.ndarray:
        """Scores of ``task``'s test examples ``where`` answered by task ``by`` (cached by function)."""
        if task.generative != by.generative:
            return np.zeros(len(where))  # a classifier cannot answer a text question, nor the reverse
        store = self._scores.setdefault((task.name, key), np.full(len(self.data(task)["test"]), np.nan))
        missing = where[np.isnan(store[where])]
        if len(missing):
            store[missing] = self._answer(task, by, missing)
        return store[where]

    def _answer(self, task: Task, by: Task, where: np.ndarray) -> np.ndarray:
        subset = self.data(task)["test"].select(where.tolist())
        active = self.active(by.name)
        if task.generative:
            loader = self.data.loader(task).subset(subset)  # the whole split's answer length and metric
            preds, refs = answers(self.model, loader, active, self.precision)
            return np.asarray(score_each(loader.metric, preds, refs, loader.metric_sources()), dtype=float)
        names = self.model.task(by.name).label_names
        gold = [task.label_names[y] for y in subset["label"]]
        loader = eval_loader(subset, self.model.tokenizer, self.data.length(task), self.data.eval_batch)
        preds = _predicted(self.model, loader, active, self.precision)
        return np.asarray([names[p] == g for p, g in zip(preds, gold)], dtype=float)


@torch.no_grad()
def _predicted(model: DeltaModel, loader: Any, active: Sequence[str], precision: str) -> list[int]:
    """The label index the last of ``active``'s heads predicts for each example of ``loader`` (its
    gold labels may belong to another task's label set: no loss is taken)."""
    preds, bad = [], []
    for logits, _ in batch_logits(model, loader, active, precision):
        preds.append(logits.argmax(-1))
        bad.append(non_finite_rows(logits))
    # an argmax of NaN is label 0: a routed score from such logits would be noise, printed as a number
    refuse_non_finite(sum(bad), f"scoring without the task id (task {active[-1]!r}'s head)")
    return torch.cat(preds).tolist() if preds else []

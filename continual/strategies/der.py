"""``der``: replay that also keeps what the delta answered, and pulls its logits back to it (DER++).

Dark Experience Replay, Buzzega, Boschini, Porrello, Abati & Calderara, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline" (NeurIPS 2020, arXiv:2004.07211). The
memory holds, beside each stored example x and its label y, the logits z the network gave it when
it was stored. Training a new task adds, for memory samples (x', z') and (x'', y''),

    α · ‖f(x') − z'‖²  +  β · CE(f(x''), y'')

to the new batch's loss: DER is the first term alone (β = 0), DER++ both. Matching logits keeps the
old function's whole output, not only its arg max ("dark knowledge"), so less of it drifts than
under replay's labels alone. Defaults ``alpha=0.1``, ``beta=0.5`` (in the range of the paper's
searched values; not tuned here), and replay's ``memory_size=200``.

How we depart from the paper:

- The memory is replay's (:mod:`.replay`): a seeded, task-balanced budget of training examples,
  restored exactly on resume. Each example's logits are recorded once, when its task ends, by the
  delta and head as trained on it, with dropout off; the paper records them as reservoir sampling
  inserts the example, mid-training. When a task's share of the memory shrinks, its logits are cut
  with it.
- One memory batch gives both terms (the paper draws two): half the memory's forward passes.
- Each earlier task's rows run through the shared delta and that task's own frozen head (as under
  ``replay``), so a classifier's logits are those of its own head.
- A generative task's "logits" are the language model's at its answer's tokens (the positions its
  loss is on); of each such row of the vocabulary (49k wide for SmolLM2) only the ``TOPK`` largest
  are kept, and the term matches the current logits at those indices. A classifier's rows, at
  most ``TOPK`` wide, are kept whole, as in the paper. The squared error is a mean over the kept
  entries (the paper's mean over the logits).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ..training import TrainConfig, batch_logits, collate_rows, token_loss
from .base import check_option, finite_at_least
from .replay import Replay

TOPK = 64  # the logits kept of one answer token (a classifier's row narrower than this is kept whole)


def logit_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The rows DER matches: a classifier's (B, C) logits as they are; a language model's
    (B, T, V) logits at its labelled (answer) positions, example by example, in order."""
    return logits if logits.dim() == 2 else logits[labels != -100]


def rows_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many of :func:`logit_rows`' rows each example gave."""
    return torch.ones(len(labels), dtype=torch.long) if logits.dim() == 2 else (labels != -100).sum(1).long().cpu()


def kept(rows: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) kept of each row: the whole row when it is at most ``k`` (default
    :data:`TOPK`) wide, else its ``k`` largest entries."""
    k = TOPK if k is None else k
    rows = rows.detach().float()
    if rows.shape[-1] <= k:
        return torch.arange(rows.shape[-1], device=rows.device).expand(rows.shape[0], -1).clone(), rows
    values, indices = rows.topk(k, dim=-1)
    return indices, values


def logit_match(rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """DER's term: the mean squared difference between the current logits at the kept indices and
    the kept values (zero while the delta answers as it did)."""
    return ((rows.float().gather(-1, indices) - values) ** 2).mean()


class DER(Replay):
    name = "der"
    description = ("one shared delta; replay's memory keeps the logits each example got when its task ended, and "
                   "training matches them (alpha) and the labels (beta) (DER++; beta=0: DER)")
    defaults = {"memory_size": 200, "alpha": 0.1, "beta": 0.5, "replay_batch": None}

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), memory_size: int = 200, alpha: float = 0.1,
                 beta: float = 0.5, replay_batch: int | None = None) -> None:
        super().__init__(methods, memory_size, replay_batch)
        for key, v in (("alpha", alpha), ("beta", beta)):
            check_option("der", key, v, finite_at_least(0), "a finite number >= 0")
        self.alpha, self.beta = float(alpha), float(beta)
        # task -> (rows per stored example, kept indices, kept values), in the order of self.memory[task]
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        draw = self.memory_batches(task, config, self.replay_batch)
        if draw is None or self.alpha == self.beta == 0:
            return None
        return lambda batch, labels, logits: self.memory_loss(model, data, draw(), self.dark_loss)

    def dark_loss(self, task: Task, rows: list[int], out: torch.Tensor, labels: torch.Tensor, _batch: Any = None) -> torch.Tensor:
        """α · logit matching + β · cross-entropy on one earlier task's memory rows."""
        counts, indices, values = self.recorded[task.name]
        starts = torch.cumsum(counts, 0) - counts
        where = {int(r): p for p, r in enumerate(self.memory[task.name].tolist())}
        sel = torch.cat([torch.arange(int(starts[where[r]]), int(starts[where[r]] + counts[where[r]])) for r in rows])
        current = logit_rows(out, labels)
        if len(current) != len(sel):  # the answer's tokens changed since they were recorded
            raise RuntimeError(f"der: task {task.name!r}'s memory rows give {len(current)} logit rows, "
                               f"{len(sel)} were recorded")
        sel = sel.to(indices.device)
        loss = self.alpha * logit_match(current, indices[sel], values[sel])
        return loss + self.beta * token_loss(out, labels) if self.beta else loss

    def train(self, model, tasks, config, data, callback):
        result = super().train(model, tasks, config, data, callback)  # replay's: stores, and cuts every share
        for name, (counts, indices, values) in self.recorded.items():
            n = len(self.memory[name])
            end = int(counts[:n].sum())
            self.recorded[name] = (counts[:n].clone(), indices[:end].clone(), values[:end].clone())
        for t in tasks:
            self.recorded[t.name] = self.record(model, t, data(t)["train"], config)
        return result

    def record(self, model: DeltaModel, task: Task, train: Any, config: TrainConfig):
        """The logits the delta and ``task``'s head give its stored examples now (dropout off)."""
        rows = self.memory[task.name].tolist()
        if not rows:  # a memory smaller than the number of tasks leaves the latest ones none
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
        size = config.batch_size
        batches = (collate_rows(train, rows[s:s + size], model.tokenizer) for s in range(0, len(rows), size))
        counts, indices, values = [], [], []
        with torch.no_grad():
            for out, labels in batch_logits(model, batches, self.active(task.name), config.precision):
                counts.append(rows_per_example(out, labels))
                i, v = kept(logit_rows(out, labels))
                indices.append(i)
                values.append(v)
        return torch.cat(counts), torch.cat(indices), torch.cat(values)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        for i, name in enumerate(self.memory):
            counts, indices, values = self.recorded[name]
            out.update({f"der.{i}.counts": counts, f"der.{i}.indices": indices, f"der.{i}.values": values})
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        self.recorded = {name: (state[f"der.{i}.counts"].cpu().long(), state[f"der.{i}.indices"].to(model.device).long(),
                              state[f"der.{i}.values"].to(model.device).float())
                       for i, name in enumerate(self.memory) if f"der.{i}.counts" in state}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "alpha": self.alpha, "beta": self.beta}

"""The training protocol, written once: every trainer in the project follows it.

Our own loop (:mod:`continual.training.loop`) and Avalanche's strategies (through the plugin in
:mod:`continual.strategies.avalanche.model`) both drive a :class:`Protocol`, so a comparison
between them measures the continual-learning mechanism, not a different recipe:

- learning rate: linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0;
- a record (loss, lr, samples/s) every ``log_every`` steps, passed to ``callback``;
- a dev evaluation every ``eval_every`` steps and after the last one;
- early stopping after ``patience`` evaluations without a better dev accuracy, counted from the
  end of the warm-up (at a learning rate still near 0 no gain is expected: a long schedule would
  otherwise stop untrained);
- at the end, the trained parameters get their best-on-dev values back.

The trainer calls :meth:`Protocol.before_step` (sets the learning rates), runs its own step, and
calls :meth:`Protocol.after_step` with the loss as a device tensor (read back only when a record
is written, so the loop needs no host sync per step) until :attr:`Protocol.should_stop`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .config import TrainConfig, TrainResult

Record = dict[str, Any]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: what the model would be scored with is noise (an
    argmax of NaN logits is label 0), so the run stops instead of printing chance-level numbers."""


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier of 0-based step ``step``: linear warm-up, then linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Protocol:
    """Schedule, records, dev evaluation, early stopping and best-on-dev weights for one training run.

    ``params``: what is trained (snapshotted at the best dev score, restored by :meth:`finish`);
    ``optimizer``: the schedule scales its groups' peak rates, ``base_lrs`` (default: the groups'
    ``lr`` now; pass them when the optimizer is reused across tasks, its rates then decayed);
    ``dev()``: scores the model on held-out data (a dict with ``accuracy``)."""

    def __init__(self, config: TrainConfig, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                 dev: Callable[[], dict[str, float]], callback: Callable[[Record], None] | None = None,
                 desc: str = "train", base_lrs: Sequence[float] | None = None) -> None:
        self.config, self.optimizer, self.dev, self.callback, self.desc = config, optimizer, dev, callback, desc
        self.params = list(params)
        self.base_lrs = list(base_lrs) if base_lrs is not None else [g["lr"] for g in optimizer.param_groups]
        self.warmup = config.warmup_steps()
        self.step = 0  # steps finished
        self.best: dict[str, float] = {"accuracy": -1.0}
        self.best_step = 0
        self.bad_evals = 0
        self.history: list[Record] = []
        self._best_state = self._snapshot()
        self._loss: torch.Tensor | None = None
        self._seen = self._since = 0
        self._start = self._t_log = time.perf_counter()
        self._bar = tqdm(total=config.max_steps, desc=desc, disable=not config.progress, leave=False)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def before_step(self) -> None:
        """Set this step's learning rates."""
        factor = lr_factor(self.step, self.config.max_steps, self.warmup)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * factor

    def after_step(self, loss: torch.Tensor, examples: int) -> Record | None:
        """Count a finished step; returns the record written now (with ``dev_*`` scores when the
        dev set was scored), or None."""
        self.step += 1
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss
        self._seen += examples
        self._since += 1
        step, cfg = self.step, self.config
        evaluate_now = step % cfg.eval_every == 0 or step == cfg.max_steps
        record = None
        if step % cfg.log_every == 0 or evaluate_now:
            now = time.perf_counter()
            record = {"step": step, "loss": float(self._loss) / self._since, "lr": self.optimizer.param_groups[0]["lr"],
                      "samples_per_s": self._seen / (now - self._t_log)}
            if not math.isfinite(record["loss"]):  # the sum since the last record: every step is checked
                self._bar.close()
                raise DivergedError(
                    f"{self.desc}: the training loss became {record['loss']} between steps {step - self._since + 1} "
                    f"and {step}: training diverged (scores of this model would be noise); lower the learning "
                    f"rate (peak rates of its parameter groups: {', '.join(f'{lr:g}' for lr in self.base_lrs)})")
            if evaluate_now:
                self._evaluate(record)
            self.history.append(record)
            if self.callback is not None:
                self.callback(record)
            self._loss, self._seen, self._since, self._t_log = None, 0, 0, time.perf_counter()
        self._bar.update(1)
        return record

    def _evaluate(self, record: Record) -> None:
        score = self.dev()
        record.update({f"dev_{k}": v for k, v in score.items()})
        if score["accuracy"] > self.best["accuracy"]:
            self.best, self.best_step, self.bad_evals = score, self.step, 0
            self._best_state = self._snapshot()
        elif self.step > self.warmup:
            self.bad_evals += 1
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", dev_acc=f"{score['accuracy']:.3f}")

    @property
    def should_stop(self) -> bool:
        patience = self.config.patience
        return self.step >= self.config.max_steps or (patience is not None and self.bad_evals >= patience)

    def finish(self) -> TrainResult:
        """Close the bar, put the best-on-dev values back, and say what happened."""
        self._bar.close()
        with torch.no_grad():
            for p, b in zip(self.params, self._best_state):
                p.copy_(b)
        return TrainResult(self.best, self.best_step, self.step, time.perf_counter() - self._start, self.history)

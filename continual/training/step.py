"""One optimisation step with no host sync, and the optimizer it runs (the fast path's core).

Shared by the training loop and ``benchmarks/speed.py``, so the benchmark times exactly what
training runs. Precision helpers (autocast, frozen bf16 Linear weights) live in
:mod:`adapters.precision`; losses and optimizers live here, outside the delta library.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from adapters.precision import autocast, resolve_precision


def make_optimizer(groups: Sequence[dict[str, Any]], device: torch.device, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW; fused (one multi-tensor kernel per step) on a GPU. The CPU has no fused AdamW."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


#: ``extra_loss(batch, labels, logits)``: a term a strategy adds to each step's loss (a replay
#: batch's loss, a penalty, a distillation term); None adds nothing. For a generative task the
#: logits and labels are those of the answer positions only, and ``batch`` carries them as
#: ``logit_positions`` (so the model run on it again gives the same positions)
ExtraLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], "torch.Tensor | None"]

#: ``adjust_grads(params)``: changes the ``.grad`` of the step's trained parameters in place after
#: the backward pass and before clipping (A-GEM's projection); run in the forward pass's autocast
#: (under fp16 a gradient it computes itself is not loss-scaled: it must keep it from underflowing)
AdjustGrads = Callable[[Sequence[torch.Tensor]], None]


class TrainStep:
    """One optimisation step of whatever is trainable in ``model``, with no host sync (but one, for a
    generative task's answer positions, when not compiled; one for the loss scaler's overflow check
    under fp16; and whatever ``adjust_grads`` needs): returns the loss as a device tensor.
    Use it inside :func:`adapters.precision.frozen_linears_in` for bf16 / fp16.

    compile: None, or a torch.compile mode. The model is traced with its delta hooks; activating
    another set of tasks re-traces once. ``extra_loss``: see :data:`ExtraLoss` (run in the same
    autocast as the forward pass; it may run the model again, e.g. under ``model.acting``);
    ``adjust_grads``: see :data:`AdjustGrads`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp32",
        compile: str | None = None,
        grad_clip: float | None = 1.0,
        extra_loss: ExtraLoss | None = None,
        adjust_grads: AdjustGrads | None = None,
    ) -> None:
        self.model, self.optimizer, self.grad_clip, self.extra_loss = model, optimizer, grad_clip, extra_loss
        self.adjust_grads = adjust_grads
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.forward = torch.compile(model, mode=compile) if compile else model
        self.compiled = bool(compile)  # (a compiled step keeps whole logits: one shape per batch, no recompiles)
        # fp16 needs loss scaling: a gradient below 6e-8 (an LM head's, spread over a vocabulary
        # and the batch's tokens) is zero in fp16 and the delta silently stops learning from it.
        # bf16 has fp32's range and needs none. A step whose scaled gradients overflow is skipped.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def __call__(self, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                 denominator: torch.Tensor | None = None) -> torch.Tensor:
        """``denominator``: divide the summed loss by it instead of averaging over ``labels``
        (a data-parallel rank's slice: see :mod:`continual.training.distributed`)."""
        if labels.dim() > 1 and not self.compiled:
            # a generative task learns its answer tokens only: the LM head (a vocabulary-wide
            # matrix product, and the largest activation of the step) runs at those positions alone
            answer = labels != -100
            batch, labels = {**batch, "logit_positions": answer}, labels[answer]
        with autocast(self.precision, self.device):
            logits = self.forward(**batch)
            extra = self.extra_loss(batch, labels, logits) if self.extra_loss is not None else None
        if denominator is None:
            loss = token_loss(logits, labels)
        else:
            loss = token_loss(logits, labels, reduction="sum") / denominator
        if extra is not None:
            loss = loss + extra.float()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # the true gradients, for the change and the clip below
        if self.adjust_grads is not None:
            with autocast(self.precision, self.device):
                self.adjust_grads(self.params)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for both kinds of task: a classifier's (B, C) logits and (B,) labels, or a
    language model's (B, T, V) logits and (B, T) next-token labels (-100 where nothing is learned:
    prompt and padding), averaged over (or, ``reduction="sum"``, summed over) the labelled positions."""
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100,
                                       reduction=reduction)


def mfu(samples_per_s: float, tokens_per_sample: int, params: int, peak_flops: float, flops_per_param_token: int = 4) -> float:
    """Model FLOP utilisation: ``flops_per_param_token * params * tokens / s / peak``.

    4 for a frozen-backbone training step (2 forward + 2 for the input gradients; no weight
    gradients), 6 for full fine-tuning, 2 for inference."""
    return flops_per_param_token * params * tokens_per_sample * samples_per_s / peak_flops

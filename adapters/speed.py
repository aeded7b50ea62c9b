"""Speed helpers shared by training, serving and the benchmarks.

Why these are safe for a frozen backbone:
- bf16 autocast casts every Linear weight to bf16 in every forward pass. The backbone's weights
  never change, so :func:`frozen_linears_in` casts them once instead. Autocast would produce the
  very same bf16 values, so results are unchanged (a test checks it bit for bit); LayerNorm and
  embedding weights stay in fp32, where autocast keeps them too.
- Deltas and heads keep fp32 master weights; autocast runs their matrix products in bf16.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that supports it, else fp32 (CPU bf16 is slower than fp32 on most CPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


@contextlib.contextmanager
def frozen_linears_in(backbone: nn.Module, precision: str) -> Iterator[None]:
    """Within the block, the backbone's frozen Linear weights and biases are held in the autocast
    dtype (cast once, not in every forward pass); on exit the original values are put back, so
    the model is exactly as before. Parameters that require grad are left alone.

    On a GPU the fp32 originals wait in host memory meanwhile, so the GPU holds the bf16 copy
    only: less memory than autocast, which keeps both."""
    if precision == "fp32":
        yield
        return
    dtype = _DTYPES[precision]
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, nn.Linear):
                    for p in (m.weight, m.bias):
                        if p is not None and not p.requires_grad and p.dtype != dtype:
                            original = p.data
                            p.data = original.to(dtype)
                            saved.append((p, original.cpu() if original.is_cuda else original))
        yield
    finally:
        for p, original in saved:
            p.data = original.to(p.device)


def make_optimizer(groups: Sequence[dict[str, Any]], device: torch.device, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW; fused (one multi-tensor kernel per step) on a GPU. The CPU has no fused AdamW."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


class TrainStep:
    """One optimisation step of whatever is trainable in ``model``, with no host sync: returns the
    loss as a device tensor. Use it inside :func:`frozen_linears_in` for bf16 / fp16.

    compile: None, or a torch.compile mode. The model is traced with its delta hooks; activating
    another set of tasks re-traces once."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str = "fp32",
        compile: str | None = None,
        grad_clip: float | None = 1.0,
    ) -> None:
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.forward = torch.compile(model, mode=compile) if compile else model

    def __call__(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            logits = self.forward(**batch)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach()


def mfu(samples_per_s: float, tokens_per_sample: int, params: int, peak_flops: float, flops_per_param_token: int = 4) -> float:
    """Model FLOP utilisation: ``flops_per_param_token * params * tokens / s / peak``.

    4 for a frozen-backbone training step (2 forward + 2 for the input gradients; no weight
    gradients), 6 for full fine-tuning, 2 for inference."""
    return flops_per_param_token * params * tokens_per_sample * samples_per_s / peak_flops

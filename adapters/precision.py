"""Precision helpers shared by training, serving and the benchmarks (no losses, no optimizers:
the training step lives in :mod:`continual.training.step`).

Why these are safe for a frozen backbone:
- bf16 autocast casts every Linear weight to bf16 in every forward pass. The backbone's weights
  never change, so :func:`frozen_linears_in` casts them once instead. Autocast would produce the
  very same bf16 values, so results are unchanged (a test checks it bit for bit); LayerNorm and
  embedding weights stay in fp32, where autocast keeps them too.
- Deltas and heads keep fp32 master weights; autocast runs their matrix products in bf16.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where oneDNN runs bf16
    matrix products faster than fp32. Elsewhere CPU bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that supports it and on a CPU with bf16 matrix instructions
    (:func:`cpu_has_fast_bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
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
                        # (a weight sharded across processes, a DTensor, is cast by autocast instead)
                        if p is not None and not p.requires_grad and p.dtype != dtype and not hasattr(p, "to_local"):
                            original = p.data
                            p.data = original.to(dtype)
                            saved.append((p, original.cpu() if original.is_cuda else original))
        yield
    finally:
        for p, original in saved:
            p.data = original.to(p.device)

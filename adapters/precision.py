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
from typing import Any, Iterator

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
def frozen_linears_in(backbone: nn.Module, precision: str, lm_head: nn.Module | None = None) -> Iterator[None]:
    """Within the block, the backbone's frozen Linear weights and biases are held in the autocast
    dtype (cast once, not in every forward pass); on exit the original values are put back, so
    the model is exactly as before. Parameters that require grad are left alone.

    A Linear whose weight is tied to another module's (an LM head sharing the input embeddings,
    as T5's, which is its own backbone) keeps its fp32 weight: cast in place, the embeddings would
    hand the residual stream bf16 values, where autocast keeps it in fp32. It computes from a bf16
    copy made once instead, as does ``lm_head`` (a causal LM's, which lives outside its backbone):
    without it autocast casts a 49,152 x 576 head (SmolLM2's) again at every training step.

    On a GPU the fp32 originals wait in host memory meanwhile, so the GPU holds the bf16 copy
    only: less memory than autocast, which keeps both."""
    if precision == "fp32":
        yield
        return
    dtype = _DTYPES[precision]
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    held: list[nn.Module] = []
    # parameters some module other than a Linear holds too (tied embeddings): cast in place, they would change it
    shared = {id(p) for m in backbone.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    try:
        with torch.no_grad():
            for m in dict.fromkeys([*backbone.modules(), *([lm_head] if lm_head is not None else [])]):
                if not isinstance(m, nn.Linear):
                    continue
                # (a weight sharded across processes, a DTensor, is cast by autocast instead)
                frozen = [p for p in (m.weight, m.bias) if p is not None and not p.requires_grad and not hasattr(p, "to_local")]
                if m is lm_head or id(m.weight) in shared:  # a copy of the whole layer: only when nothing of it trains
                    if len(frozen) == len(list(m.parameters())) and m.weight.dtype != dtype and "forward" not in m.__dict__:
                        bias = None if m.bias is None else m.bias.detach().to(dtype)
                        m.forward = _PackedForward(m, m.weight.detach().to(dtype), bias, prepacked=False)
                        held.append(m)
                    continue
                for p in frozen:  # (a layer whose bias alone trains still has its weight cast)
                    if p.dtype != dtype:
                        original = p.data
                        p.data = original.to(dtype)
                        saved.append((p, original.cpu() if original.is_cuda else original))
        yield
    finally:
        for p, original in saved:
            p.data = original.to(p.device)
        for m in held:
            del m.forward


def lowrank_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a low-rank term (LoRA's ``B A x``) computes in: autocast off in a CPU pass
    without gradients (scoring, generation), else unchanged.

    Why: its matrix products are tiny (8 rows by 576 by 8 when decoding at batch 8), and on a CPU
    such a product costs several times more in bf16 than in fp32 (60-70 us against about 16 us in
    a profile of ``benchmarks/decode_speed.py``'s setup), besides the casts autocast adds around
    it; PEFT also computes its LoRA term in fp32 (its weights' dtype). The fp32 term is the more exact
    one; it is cast to the layer's output dtype before it is added. Training (gradients on) and
    GPUs keep autocast's dtype, so trained values are unchanged."""
    if x.device.type == "cpu" and not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


def _can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking: CPUs only, fp32 always, bf16 where the CPU has bf16 instructions."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_fast_bf16())))


def _frozen_linears(model: Any) -> list[nn.Linear]:
    """The frozen Linear layers of a DeltaModel's backbone and its LM head (each once)."""
    heads = [model.lm_head] if isinstance(getattr(model, "lm_head", None), nn.Linear) else []
    mods = [m for m in [*model.backbone.modules(), *heads] if isinstance(m, nn.Linear)]
    # (a layer with a trained bias, BitFit's, keeps its own forward; so does a sharded weight)
    return [m for m in dict.fromkeys(mods) if not any(p.requires_grad or hasattr(p, "to_local") for p in m.parameters())
            and m.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)]


@contextlib.contextmanager
def inference_linears(model: Any) -> Iterator[None]:
    """Within the block, the frozen Linear layers of ``model`` (its backbone and LM head) compute
    from a copy of their weights made once on entering: in the dtype the pass computes in (the
    autocast dtype when autocast is on for the model's device, else the weight's own), and on a
    CPU reordered for oneDNN's matrix kernels ("prepacked"). Enter it inside the autocast block.
    Outside the block nothing has changed. For inference (scoring, generation): a pass that
    needs gradients through a prepacked layer uses the layer's own weights as usual (an unpacked
    copy serves it: the same values, the gradient flows to the layer's input).

    Why: decoding a few tokens at a time is bound by reading the weights. Under autocast every
    step casts every fp32 weight to bf16 again (reading 4 bytes and writing 2 per weight), and on a
    CPU the default matrix product repacks the weight in every call; for 8 rows at a time that
    reads each weight about three times. The copy is read once per step instead (measured by
    ``benchmarks/decode_speed.py``). A tied LM head gets its own copy, so the input embeddings keep
    their values. In bf16 the outputs are the very values autocast gives; in fp32 oneDNN sums in
    another order than the default kernel (differences of about 1e-6 of the output's size).

    Re-entrant: an inner block in the same dtype uses the outer one's copies (or
    :func:`frozen_linears_in`'s), unless it can prepack where they are not; one in another dtype
    (another autocast) makes its own until it ends; costs one copy of the frozen Linear
    weights in memory while it lasts, and the time to make it (about a tenth of a second per 100M
    weights on a CPU): enter it once around a whole scoring pass, not around each batch."""
    device = model.device
    cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    patched = []  # (layer, the forward it had: an outer block's, or None)
    try:
        with torch.no_grad():
            for m in _frozen_linears(model):
                dtype = cast or m.weight.dtype
                prepack = _can_prepack(device, dtype)
                outer = m.__dict__.get("forward")
                if outer is not None and (not isinstance(outer, _PackedForward)
                                          or (outer.weight.dtype == dtype and (outer.prepacked or not prepack))):
                    continue  # an outer block's copies in this dtype serve (or someone else patched it)
                if outer is None and not prepack and dtype == m.weight.dtype:
                    continue  # nothing to gain
                w = m.weight.detach().to(dtype)
                b = None if m.bias is None else m.bias.detach().to(dtype)
                if prepack:
                    w = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
                m.forward = _PackedForward(m, w, b, prepack)
                patched.append((m, outer))
        yield
    finally:
        for m, outer in patched:
            if outer is None:
                del m.forward
            else:
                m.forward = outer


class _PackedForward:
    """A Linear layer's forward from a held copy of its weights (see :func:`inference_linears`)."""

    def __init__(self, module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, prepacked: bool) -> None:
        self.original = type(module).forward.__get__(module)
        self.weight, self.bias, self.prepacked = weight, bias, prepacked

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked and torch.is_grad_enabled() and x.requires_grad:
            return self.original(x)  # (oneDNN's packed product has no backward)
        x = x.to(self.weight.dtype)
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return nn.functional.linear(x, self.weight, self.bias)

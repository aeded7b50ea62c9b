"""Dropout in the frozen backbone, with cheaper random masks on a CPU.

Why: a training step on a CPU spends about a fifth of its time drawing dropout masks
(``bernoulli_`` draws one Mersenne-Twister number per element, on one thread; attention
dropout also sends scaled-dot-product attention to its slow "safe softmax" path). The backbone
is frozen but still trains in ``train()`` mode, as PEFT and AdapterHub train it, so its dropout
is part of the method and stays on.

:func:`fast_dropout` keeps the semantics (each element is zeroed independently with probability
``p``, survivors are scaled by the inverse keep rate) but draws one 64-bit random number for
four elements: 16 random bits each. ``p`` is thus rounded to a multiple of 1/65536 (0.1 becomes
0.1000061), and the scale uses that rounded keep rate, so the expectation is preserved (exactly in
fp32; in bf16 the scale is rounded to bf16, as torch's own dropout rounds it).
Masks come from torch's default generator: ``torch.manual_seed`` makes them repeatable. The mask
is built in the integer type of the dtype's width ((bits >= threshold) times the scale's bit
pattern), a third of the time of ``torch.where`` with scalar operands on a CPU.

Attention-probability dropout is done in the same way by an attention function registered with
transformers (``"delta_fast_sdpa"``): the plain softmax-dropout-matmul when training with
dropout on a CPU, and transformers' own SDPA otherwise (evaluation, GPUs, dropout 0, causal or
grouped-query attention), so nothing else changes. The same function runs attention that trains
in bf16 or fp16 on a CPU in fp32 (see :func:`_upcast`): a speed choice, not a dropout one, made
here because this is where the backbone's attention is swapped for training; with torch's own
masks (``masks="torch"``) only that part applies (:data:`ATTENTION_TORCH_MASKS`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator

import torch
from torch import nn

ATTENTION = "delta_fast_sdpa"
ATTENTION_TORCH_MASKS = "delta_sdpa"  # the same without the fast-mask path (``masks="torch"``)
DROPOUT_MASKS = ("fast", "torch")  # what fast_dropout(backbone, masks) accepts
_LEVELS = 1 << 16
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, by itemsize


def keep_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape``: 0 with probability ``round(p * 65536) / 65536``, else the
    inverse of the keep rate (so its mean is 1 in expectation)."""
    drop = round(p * _LEVELS)
    n = math.prod(shape)
    # random_ from the int64 minimum with no upper bound draws all 64 bits: four 16-bit draws
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    bits = words.view(torch.int16)[:n].view(shape)
    keep = bits >= drop - _LEVELS // 2
    scale = torch.tensor(_LEVELS / (_LEVELS - drop), dtype=dtype, device=device)
    as_int = _SAME_WIDTH_INT.get(dtype.itemsize) if dtype.is_floating_point else None
    if as_int is None:  # (no integer of that width: the plain select)
        return torch.where(keep, scale, torch.zeros((), dtype=dtype, device=device))
    # {0, 1} times the scale's bit pattern is {+0.0, scale} in dtype's bits: one cheap integer pass
    # where torch.where with scalar operands is slow on a CPU. The result is then one multiply
    # (forward and backward), about twice as fast as torch.where(keep, x * scale, 0).
    return keep.to(as_int).mul_(scale.view(as_int)).view(dtype)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` with 16-bit masks (see the module docstring)."""
    if p <= 0.0:
        return x
    if round(p * _LEVELS) >= _LEVELS:  # p rounds to 1: everything is dropped
        return torch.zeros_like(x)
    return x * keep_mask(x.shape, p, x.device, x.dtype)


_dropout = dropout  # the attention function's own argument is called ``dropout``


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``; ``inplace`` is ignored) drawing 16-bit masks when
    training on a CPU; elsewhere exactly ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile cannot trace the in-place 64-bit draw (a graph break per layer that sends
        # the whole encoder back to eager); compiled code draws its own masks in any case
        if self.training and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return dropout(x, self.p)
        return super().forward(x)


def _upcast(*qkv: torch.Tensor) -> torch.dtype | None:
    """The dtype attention would compute in, when it trains in bf16 or fp16 on a CPU (None
    otherwise): there it runs in fp32 instead, and its output is cast to that dtype. The CPU's
    fused attention kernel takes about twice as long forward and backward in bf16 as in fp32
    (measured by ``benchmarks/train_attention.py``); the fp32 result is the more exact one.
    Inference keeps autocast's dtype."""
    q = qkv[0]
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not any(t.requires_grad for t in qkv):
        return None
    if torch.is_autocast_enabled("cpu"):  # (autocast runs attention in its dtype on a CPU)
        return torch.get_autocast_dtype("cpu")
    low = [t.dtype for t in qkv if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else None


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               *, fast_masks: bool = True, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal") or getattr(module, "is_causal", False)
    plain = (fast_masks and dropout > 0 and module.training and query.device.type == "cpu" and not causal
             and query.shape[1] == key.shape[1] and "sliding_window" not in kwargs
             and not torch.compiler.is_compiling())  # (see FastDropout.forward)
    if not plain:
        low = _upcast(query, key, value)
        if low is not None:
            with torch.autocast("cpu", enabled=False):
                mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() else attention_mask
                out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                                      dropout=dropout, scaling=scaling, **kwargs)
            return out.to(low), weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
        if attention_mask.dtype == torch.bool:  # True: attend (SDPA's convention)
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:  # an older transformers: the attention part is skipped
        return False
    for name, fn in ((ATTENTION, _attention), (ATTENTION_TORCH_MASKS, functools.partial(_attention, fast_masks=False))):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)  # the masks SDPA gets, built the same way
    return True


@contextlib.contextmanager
def fast_dropout(backbone: nn.Module, masks: str = "fast") -> Iterator[None]:
    """Within the block, the backbone's ``nn.Dropout`` modules are :class:`FastDropout` and its
    SDPA attention is :data:`ATTENTION`; on exit the original modules and attention are put back.
    With ``masks="torch"`` (torch's own masks) only the attention is swapped, for
    :data:`ATTENTION_TORCH_MASKS`: fp32 attention when training in bf16 (see :func:`_upcast`), the
    dropout left to torch. Does nothing to a backbone on a GPU."""
    if masks not in DROPOUT_MASKS:
        raise ValueError(f"unknown dropout masks {masks!r}; choose one of {DROPOUT_MASKS}")
    if next(backbone.parameters()).device.type != "cpu":
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(backbone.modules()) if masks == "fast" else []:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped.append((parent, name, child))
    configs: list[Any] = []
    if _register():  # each config once: a model's layers share their model's
        sdpa = {id(m.config): m.config for m in backbone.modules()
                if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
        configs = list(sdpa.values())
    for c in configs:
        c._attn_implementation = ATTENTION if masks == "fast" else ATTENTION_TORCH_MASKS
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)

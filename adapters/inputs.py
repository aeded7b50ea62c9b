"""The checks a forward pass makes on its inputs before the backbone sees them, so that a wrong
shape or an input longer than the backbone can place is a clear error, not a reshape or an
expand failing deep inside ``transformers``. Shapes only: checking values costs a host sync in
every compiled step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def checked_batch(input_ids: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mask (all ones when None) of a batch of sound shapes, else a clear ValueError."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = f"a {input_ids.dim()}-d {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor) else repr(input_ids)
        raise ValueError(f"input_ids must be a (batch, length) tensor of integer token ids; got {got}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} hold no tokens: give at least one example")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask's shape {tuple(attention_mask.shape)} is not input_ids' {tuple(input_ids.shape)}")
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def position_table(backbone: nn.Module) -> int | None:
    """How many positions the backbone's table of absolute positions can give (BERT, RoBERTa,
    MPNet, GPT-2), or None where positions are relative or rotary (T5, Llama, ...) and no input
    length overflows a table. RoBERTa and MPNet count positions from after the padding index."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            start = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - start
    return None


def check_positions(model: Any, tokens: int, added: int = 0, new: int = 0) -> None:
    """Refuse an input of ``tokens`` tokens with ``added`` positions prepended by its deltas and
    ``new`` generated tokens fed back, when that needs more positions than the backbone's table
    holds (``model.max_positions``; None: no table, nothing to check)."""
    limit = getattr(model, "max_positions", None)
    if limit is None or tokens + added + new <= limit:
        return
    parts = [f"{tokens} tokens"] + [f"{n} {what}" for n, what in ((added, "prepended by its deltas"),
                                                                  (new, "generated tokens fed back")) if n]
    raise ValueError(f"an input of {' + '.join(parts)} needs {tokens + added + new} positions, more than the "
                     f"{limit} of the backbone {model.backbone_name!r} (a table of absolute positions); truncate "
                     "the input (e.g. the tokenizer's truncation=True, max_length=...) or prepend fewer tokens")

"""Per-task heads over the backbone's token states: a classifier, or the model's own LM head."""

from __future__ import annotations

import torch
from torch import nn

from .base import FrozenRef
from .errors import ConfigError

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states (B, T, d) to (B, d) using the attention mask (B, T)."""
    if how == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # index of the last attended token; works for left and right padding
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        idx = (positions * mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ConfigError(f"unknown pooling {how!r}; known: {POOLINGS}")


class ClassificationHead(nn.Module):
    """Pooling, dropout and one linear layer (what a sentence classifier on MiniLM uses)."""

    generative = False

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ConfigError(f"a classification head needs a whole number of labels, at least 2, got {num_labels!r}")
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; known: {POOLINGS}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, mask, self.pooling).to(self.classifier.weight.dtype)
        return self.classifier(self.dropout(pooled))


class LMHead(nn.Module):
    """A generative task's head: the backbone's own (frozen) language-model head, shared by every
    generative task and held through :class:`~adapters.base.FrozenRef`, so a task saves, counts and
    trains none of its weights. Gives logits over the vocabulary at every position (B, T, V)."""

    generative = True
    num_labels = None
    pooling = None

    def __init__(self, lm_head: nn.Module) -> None:
        super().__init__()
        self.lm_head = FrozenRef(lm_head)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        head = self.lm_head()
        return head(hidden.to(head.weight.dtype))

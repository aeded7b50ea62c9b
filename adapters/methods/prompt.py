"""Prompt tuning (Lester et al. 2021): trainable soft tokens prepended to the input embeddings.

Only the input changes; the classification head pools over the real tokens (the model strips the
prompt positions before pooling). Initialised from the embeddings of random vocabulary tokens
(``init="vocab"``, the paper's better choice) or small random vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..base import Capabilities, Delta
from ..config import DeltaConfig
from ..registry import register


@dataclasses.dataclass(frozen=True)
class PromptConfig(DeltaConfig):
    method = "prompt"
    default_lr = 3e-2
    num_tokens: int = 100
    init: Literal["vocab", "random"] = "vocab"

    def validate(self) -> None:
        self.require_positive("num_tokens")


@register
class Prompt(Delta):
    config_class = PromptConfig
    # soft tokens are attended from the start; each example of a mixed batch gets its own prompt
    capabilities = Capabilities(identity_at_init=False, input_transform=True, mixed_batches=True)

    @classmethod
    def positions_added(cls, config: PromptConfig) -> int:
        return config.num_tokens

    def __init__(self, config: PromptConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.prompt = nn.Parameter(initial_tokens(backbone.get_input_embeddings().weight, config.num_tokens, config.init))

    @classmethod
    def stack_inputs(cls, deltas: list["Prompt | None"]) -> "GatheredPrompt":
        """Every task's prompt in one zero-padded table, for mixed-task batches."""
        present = [d for d in deltas if d is not None]
        longest, dim = max(d.prompt.shape[0] for d in present), present[0].prompt.shape[1]
        table, lengths = torch.zeros(len(deltas), longest, dim), torch.zeros(len(deltas), dtype=torch.long)
        with torch.no_grad():
            for i, d in enumerate(deltas):
                if d is not None:
                    table[i, : d.prompt.shape[0]] = d.prompt.float()
                    lengths[i] = d.prompt.shape[0]
        return GatheredPrompt(table, lengths)

    def transform_inputs(self, embeds, mask, extra):
        return prepend(self.prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds, mask, extra)


def initial_tokens(table: torch.Tensor, n: int, init: str) -> torch.Tensor:
    """``n`` soft tokens (n, d) on the CPU in fp32 to start a prompt from: rows of the embedding
    ``table`` drawn at random (``"vocab"``), or Gaussian at the table's scale (``"random"``)."""
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (n,))
        return table.detach()[ids.to(table.device)].clone().float().cpu()
    return torch.randn(n, table.shape[1]) * float(table.detach().float().std())  # works on any device


def prepend(prompts: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, extra: dict):
    """``prompts`` (B, P, d) in front of ``embeds`` (B, T, d): the widened mask (prompt positions
    attended), token types 0 on them, and P, as :meth:`Delta.transform_inputs` returns."""
    b, p = embeds.shape[0], prompts.shape[1]
    embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([mask.new_ones(b, p), mask], dim=1)
    extra = dict(extra)
    if extra.get("token_type_ids") is not None:
        tt = extra["token_type_ids"]
        extra["token_type_ids"] = torch.cat([tt.new_zeros(b, p), tt], dim=1)
    return embeds, mask, extra, p


class GatheredPrompt(nn.Module):
    """Prompts of many tasks for a mixed-task batch: example i gets its own task's prompt.

    Prompts differ in length, so each example's sequence is laid out as ``[its prompt][its
    tokens][padding]``: its prompt and tokens sit at exactly the positions they have when the task
    runs alone (absolute and relative position encodings agree), and the trailing padding is
    masked. Returns per-example offsets of the first real token. No loop, no host sync."""

    def __init__(self, table: torch.Tensor, lengths: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)      # (tasks, longest, d), zero-padded
        self.register_buffer("lengths", lengths)  # (tasks,)

    def forward(self, embeds, mask, extra, batch):
        b, t = mask.shape
        longest = self.table.shape[1]
        p = self.lengths[batch.idx].unsqueeze(1)                         # (B, 1)
        j = torch.arange(longest + t, device=mask.device).unsqueeze(0)   # (1, P + T)
        is_prompt = j < p
        src = (j - p).clamp(0, t - 1)                                    # token read at slot j
        is_token = (j >= p) & (j < p + t)
        prompt = self.table[batch.idx][:, j[0].clamp(max=longest - 1)].to(embeds.dtype)
        tokens = torch.gather(embeds, 1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        out = torch.where(is_prompt.unsqueeze(-1), prompt, tokens * is_token.unsqueeze(-1).to(embeds.dtype))
        new_mask = torch.where(is_prompt, torch.ones_like(src), torch.gather(mask, 1, src) * is_token)
        extra = dict(extra)
        if extra.get("token_type_ids") is not None:
            tt = extra["token_type_ids"]
            extra["token_type_ids"] = torch.where(is_token, torch.gather(tt, 1, src), torch.zeros_like(src))
        return out, new_mask.to(mask.dtype), extra, p.squeeze(1)

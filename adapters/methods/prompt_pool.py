"""A prompt pool with learned keys, selected per input by a query from the frozen backbone (L2P).

Learning to Prompt, Wang et al., "Learning to Prompt for Continual Learning" (CVPR 2022): a pool of
M prompts P_1..P_M (each L_p soft tokens) with keys k_1..k_M in the backbone's hidden space. For an
input x, the query q(x) is the frozen backbone's representation of x without any prompt; the N keys
most similar to q(x) (cosine) select their prompts, which are prepended to x's embeddings:
``[P_s1; ...; P_sN; x]``. The keys learn through a surrogate term, λ · Σ_i (1 − cos(q(x), k_si)),
that pulls each selected key toward the queries that select it; the strategy adds it to the loss
(:class:`continual.strategies.prompt_pool.PromptPool`), read from :attr:`PromptPool.pull` after
the forward pass. No task id is needed at test time: the input chooses its prompts.

Paper defaults (ViT): M = 10, L_p = 5, N = 5, λ = 0.1 (its surrogate weight is a tuned constant;
ours is the strategy's ``pull_lambda``). Ours: the same sizes; the query is the mean of the
backbone's (for T5: its encoder's) last hidden states over the real tokens (the paper takes ViT's
[CLS]), run with dropout off and no delta acting, under ``no_grad``.

How we depart from the paper: no batch-wise prompt-frequency diversification; prompts are
initialised from random vocabulary embeddings (as ``prompt``), keys uniformly in [-1, 1]. Each
selection needs a second backbone pass (the query), as in the paper; mixed-task batches are
refused (the selection is already per example). Decoder-only backbones are refused: their training
input holds the answer, which generation does not have, so a query over it would select
differently in training and generation (an encoder's or T5's encoder input is the same in both).
With another input transform active, the query sees the input as this delta receives it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Capabilities, Delta, FrozenRef
from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import register
from .prompt import initial_tokens, prepend


@dataclasses.dataclass(frozen=True)
class PromptPoolConfig(DeltaConfig):
    method = "prompt_pool"
    default_lr = 3e-2
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    init: Literal["vocab", "random"] = "vocab"

    def validate(self) -> None:
        self.require_positive("pool_size", "prompt_length", "top_k")
        if self.top_k > self.pool_size:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed pool_size ({self.pool_size})")


def select(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the ``top_k`` keys most similar (cosine) to its query: (indices (B, N), their
    similarities (B, N)); ties go to the lower index (a stable sort), so selection is deterministic."""
    sim = F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()
    order = torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices[:, :top_k]
    return order, sim.gather(1, order)


class QueryDelta(Delta):
    """A delta that chooses, per input, by a query of it over the frozen backbone (L2P, CODA-Prompt,
    DualPrompt): made inside a DeltaModel, refused on a decoder-only backbone (``decoders=False``:
    see :data:`adapters.base.DECODER_REFUSAL`)."""

    @classmethod
    def create(cls, config: DeltaConfig, model: Any) -> "QueryDelta":
        delta = cls(config, model.backbone)  # a decoder-only backbone was refused by its capabilities
        delta._model = FrozenRef(model)  # to run the query with no delta acting
        return delta

    def query(self, embeds: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """The frozen backbone's (T5: its encoder's) mean last hidden state over the real tokens,
        with dropout off, no delta acting and no gradient."""
        model = self._model() if getattr(self, "_model", None) is not None else None
        if model is None:
            raise ConfigError(f"{self.config.method} runs inside a DeltaModel (its query needs the frozen backbone)")
        body = model.backbone.get_encoder() if model.seq2seq else model.backbone
        was_training = body.training
        body.eval()
        try:
            with torch.no_grad(), model.disabled():
                hidden = body(inputs_embeds=embeds, attention_mask=mask, **extra).last_hidden_state
        finally:
            body.train(was_training)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@register
class PromptPool(QueryDelta):
    config_class = PromptPoolConfig
    capabilities = Capabilities(identity_at_init=False, input_transform=True, decoders=False,
                                why_not_mixed="each example already selects its own prompts, with a second backbone pass")

    @classmethod
    def positions_added(cls, config: PromptPoolConfig) -> int:
        return config.top_k * config.prompt_length

    def __init__(self, config: PromptPoolConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        table = backbone.get_input_embeddings().weight
        init = initial_tokens(table, config.pool_size * config.prompt_length, config.init)
        self.prompts = nn.Parameter(init.reshape(config.pool_size, config.prompt_length, table.shape[1]))
        self.keys = nn.Parameter(torch.rand(config.pool_size, table.shape[1]) * 2 - 1)
        self._model: FrozenRef | None = None  # set by create()
        self.pull: torch.Tensor | None = None  # Σ (1 − cos) of the last forward pass, mean over examples
        self.selected: torch.Tensor | None = None  # the last forward pass's prompt indices (B, N)

    def transform_inputs(self, embeds, mask, extra):
        c = self.config
        idx, sim = select(self.query(embeds, mask, extra), self.keys, c.top_k)
        self.selected, self.pull = idx, (1 - sim).sum(1).mean()
        # index_select, not self.prompts[idx]: indexing's backward adds the rows of a prompt chosen by several
        # examples in a varying order on a CPU, so a seeded run's numbers changed from run to run
        chosen = torch.index_select(self.prompts, 0, idx.reshape(-1))
        return prepend(chosen.reshape(embeds.shape[0], c.top_k * c.prompt_length, -1), embeds, mask, extra)

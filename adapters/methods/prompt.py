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

from ..base import Delta
from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import register


@dataclasses.dataclass(frozen=True)
class PromptConfig(DeltaConfig):
    method = "prompt"
    default_lr = 3e-2
    num_tokens: int = 100
    init: Literal["vocab", "random"] = "vocab"

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be >= 1, got {self.num_tokens}")


@register
class Prompt(Delta):
    config_class = PromptConfig
    identity_at_init = False

    def __init__(self, config: PromptConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        table = backbone.get_input_embeddings().weight
        if config.init == "vocab":
            ids = torch.randint(0, table.shape[0], (config.num_tokens,))
            init = table.detach()[ids.to(table.device)].clone().float().cpu()
        else:
            init = torch.randn(config.num_tokens, table.shape[1]) * float(table.detach().float().std())  # works on any device
        self.prompt = nn.Parameter(init)

    def transform_inputs(self, embeds, mask, extra):
        b, p = embeds.shape[0], self.prompt.shape[0]
        embeds = torch.cat([self.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
        mask = torch.cat([mask.new_ones(b, p), mask], dim=1)
        extra = dict(extra)
        if extra.get("token_type_ids") is not None:
            tt = extra["token_type_ids"]
            extra["token_type_ids"] = torch.cat([tt.new_zeros(b, p), tt], dim=1)
        return embeds, mask, extra, p

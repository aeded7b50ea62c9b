"""LoRA (Hu et al. 2021): ``W x + (alpha / r) * B A x`` on chosen linear layers.

``A`` gets Kaiming-uniform init and ``B`` zeros, so a fresh LoRA is the identity. Default: rank 8
on query and value (shared/seed-notes.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..base import LayerwiseConfig, SiteDelta
from ..errors import ConfigError
from ..registry import register
from ..targets import Site


@dataclasses.dataclass(frozen=True)
class LoRAConfig(LayerwiseConfig):
    method = "lora"
    default_lr = 1e-3
    targets: tuple[str, ...] = ("query", "value")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class LoRASite(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


@register
class LoRA(SiteDelta):
    config_class = LoRAConfig

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        c = self.config
        if not isinstance(backbone.get_submodule(site.output), nn.Linear):
            raise ConfigError(f"LoRA targets linear layers; {site.output} is not one")
        return LoRASite(d_in, d_out, c.rank, c.alpha / c.rank, c.dropout)

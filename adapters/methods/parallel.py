"""Parallel adapter (He et al. 2022, "Towards a unified view of PETL").

Beside a sub-layer: ``out = sublayer(x) + scaling * up(act(down(x)))``, reading the sub-layer's
input ``x``. Default: beside the FFN block, scaling 4, as in the paper's best variant.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..base import Capabilities, LayerwiseConfig, SiteDelta
from ..errors import ConfigError
from ..registry import register
from ..targets import Site
from .bottleneck import Bottleneck, stack_mlps


@dataclasses.dataclass(frozen=True)
class ParallelConfig(LayerwiseConfig):
    method = "parallel"
    default_lr = 1e-3
    targets: tuple[str, ...] = ("ffn",)
    bottleneck_dim: int = 64
    activation: str = "relu"
    scaling: float = 4.0

    def validate(self) -> None:
        super().validate()
        self.require_positive("bottleneck_dim")
        if self.scaling == 0:  # the adapter's output is multiplied by it: it would train and add nothing
            raise ConfigError("scaling 0 multiplies the parallel adapter's output by zero (it would train, and "
                              "change nothing); the paper's best variant uses 4, the default")


class ParallelSite(nn.Module):
    def __init__(self, mlp: Bottleneck, scaling: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.scaling = scaling

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.mlp(x)

    def linear_outputs(self, x: torch.Tensor, h: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        return self.mlp.linear_outputs(x, self.scaling)


@register
class ParallelAdapter(SiteDelta):
    config_class = ParallelConfig
    capabilities = Capabilities(site_terms=True, mixed_batches=True, fusable=True, linear_units=True)

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        c = self.config
        return ParallelSite(Bottleneck(d_in, d_out, c.bottleneck_dim, c.activation), c.scaling)

    @classmethod
    def stack_sites(cls, sites: list[nn.Module | None]) -> nn.Module | None:
        return stack_mlps([None if s is None else s.mlp for s in sites], [0.0 if s is None else s.scaling for s in sites], reads="x")

"""Sequential bottleneck adapter (Houlsby et al. 2019).

After a sub-layer's output projection: ``h <- h + up(act(down(h)))``. The up-projection starts at
zero, so a fresh adapter is the identity. Placement "attn_out" + "ffn_out" is Houlsby's; "ffn_out"
alone is the Pfeiffer placement.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..base import LayerwiseConfig, SiteDelta, make_activation
from ..errors import ConfigError
from ..registry import register
from ..targets import Site


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(LayerwiseConfig):
    """bottleneck_dim is used unless reduction_factor is set (then dim = d_model / factor)."""

    method = "bottleneck"
    default_lr = 1e-3
    targets: tuple[str, ...] = ("attn_out", "ffn_out")
    bottleneck_dim: int = 64
    reduction_factor: float | None = None
    activation: str = "silu"

    def validate(self) -> None:
        super().validate()
        if self.bottleneck_dim < 1:
            raise ConfigError(f"bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be > 0, got {self.reduction_factor}")

    def dim_for(self, d_model: int) -> int:
        if self.reduction_factor is None:
            return self.bottleneck_dim
        return max(1, int(d_model // self.reduction_factor))


class Bottleneck(nn.Module):
    """down -> activation -> up, with a zero-initialised up-projection."""

    def __init__(self, d_in: int, d_out: int, dim: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, dim)
        self.act = make_activation(activation)
        self.up = nn.Linear(dim, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z.to(self.down.weight.dtype))))


class SequentialSite(nn.Module):
    """Reads the sub-layer output ``h`` (not its input)."""

    def __init__(self, mlp: Bottleneck) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)


@register
class BottleneckAdapter(SiteDelta):
    config_class = BottleneckConfig

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        return SequentialSite(Bottleneck(d_out, d_out, self.config.dim_for(d_out), self.config.activation))

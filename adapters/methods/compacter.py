"""Compacter (Karimi Mahabadi et al. 2021): a bottleneck adapter whose projections are
parameterised hypercomplex multiplication (PHM) layers,

    W = sum_i  A_i (x) (s_i t_i^T)          (x) = Kronecker product

with the small "rule" matrices A_i (n x n) shared by every adapter of the delta and rank-r
factors per layer. The up-projection's t starts at zero, so a fresh Compacter is the identity.
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
class CompacterConfig(LayerwiseConfig):
    method = "compacter"
    default_lr = 3e-3
    targets: tuple[str, ...] = ("attn_out", "ffn_out")
    bottleneck_dim: int = 64
    phm_dim: int = 4
    phm_rank: int = 1
    activation: str = "silu"

    def validate(self) -> None:
        super().validate()
        if self.phm_dim < 1 or self.phm_rank < 1:
            raise ConfigError("phm_dim and phm_rank must be >= 1")
        if self.bottleneck_dim % self.phm_dim:
            raise ConfigError(f"bottleneck_dim ({self.bottleneck_dim}) must be divisible by phm_dim ({self.phm_dim})")


class PHMLinear(nn.Module):
    """The per-site factors of one PHM layer; the shared rule comes in at call time."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, zero: bool) -> None:
        super().__init__()
        if d_in % n or d_out % n:
            raise ConfigError(f"Compacter needs dimensions divisible by phm_dim={n}, got {d_in} -> {d_out}")
        self.n = n
        self.s = nn.Parameter(torch.randn(n, d_in // n, rank) * (1.0 / d_in) ** 0.5)
        self.t = nn.Parameter(torch.zeros(n, rank, d_out // n) if zero else torch.randn(n, rank, d_out // n) * (1.0 / rank) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        b = self.s @ self.t  # n x (d_in/n) x (d_out/n)
        w = torch.einsum("iab,icd->acbd", rule, b)  # block (a, b) of the Kronecker sum
        return w.reshape(self.n * b.shape[1], self.n * b.shape[2])

    def forward(self, z: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return z @ self.weight(rule) + self.bias


class CompacterSite(nn.Module):
    def __init__(self, d: int, c: CompacterConfig) -> None:
        super().__init__()
        self.down = PHMLinear(d, c.bottleneck_dim, c.phm_dim, c.phm_rank, zero=False)
        self.act = make_activation(c.activation)
        self.up = PHMLinear(c.bottleneck_dim, d, c.phm_dim, c.phm_rank, zero=True)


@register
class Compacter(SiteDelta):
    config_class = CompacterConfig

    def __init__(self, config: CompacterConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        n = config.phm_dim
        # Shared across all layers: the Kronecker "rules", near identity blocks plus noise.
        self.phm_rule = nn.Parameter(torch.eye(n).expand(n, n, n).clone() + 0.01 * torch.randn(n, n, n))

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        return CompacterSite(d_out, self.config)

    def contribution(self, key: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        site = self.site_modules[key]
        z = site.act(site.down(h.to(self.phm_rule.dtype), self.phm_rule))
        return site.up(z, self.phm_rule)

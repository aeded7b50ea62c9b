"""LoRA (Hu et al. 2021): ``W x + (alpha / r) * B A x`` on chosen linear layers.

``A`` gets Kaiming-uniform init and ``B`` zeros, so a fresh LoRA is the identity. Default: rank 8
on query and value (shared/seed-notes.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..base import Capabilities, LayerwiseConfig, SiteDelta
from ..errors import ConfigError
from ..precision import lowrank_precision
from ..registry import register
from ..targets import Site, linear_dims


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
        self.require_positive("rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.alpha == 0:  # the update is scaled by alpha / rank: a LoRA that trains and changes nothing
            raise ConfigError("alpha 0 scales the LoRA update to zero (it would train, and change nothing); "
                              "the usual choice is alpha = 2 * rank, or the default 16")


def check_low_rank_site(config: LoRAConfig, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> None:
    """A low-rank term ``B A x`` (LoRA's, and every LoRA of ``sapt_lora``) goes on a linear layer at
    least ``config.rank`` wide."""
    if linear_dims(backbone.get_submodule(site.output)) is None:
        raise ConfigError(f"{config.method} targets linear layers; {site.output} is not one")
    if config.rank > min(d_in, d_out):  # B A then holds more numbers than the layer's own update can use
        raise ConfigError(f"{config.method} rank {config.rank} is above the width of {site.output} ({d_in} -> {d_out}): "
                          f"a rank beyond {min(d_in, d_out)} adds parameters and memory but nothing it can express; "
                          f"use rank <= {min(d_in, d_out)}")


class LoRASite(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with lowrank_precision(x):
            x = self.dropout(x.to(self.lora_A.dtype))
            return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def linear_outputs(self, x: torch.Tensor, h: torch.Tensor) -> list[tuple[nn.Parameter, None, torch.Tensor]]:
        """A's output ``A x`` (rank units) and B's, the term ``s B A x`` (output units); without
        dropout (``capabilities.linear_units``)."""
        with lowrank_precision(x):
            a = x.to(self.lora_A.dtype) @ self.lora_A.t()
            return [(self.lora_A, None, a), (self.lora_B, None, a @ self.lora_B.t() * self.scaling)]


@register
class LoRA(SiteDelta):
    config_class = LoRAConfig
    capabilities = Capabilities(site_terms=True, mixed_batches=True, fusable=True, linear_units=True)

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        c = self.config
        check_low_rank_site(c, site, d_in, d_out, backbone)
        return LoRASite(d_in, d_out, c.rank, c.alpha / c.rank, c.dropout)

    @classmethod
    def summed_config(cls, config: LoRAConfig, n: int) -> LoRAConfig:
        """``sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ...] [A_1; ...]``: one LoRA of rank ``n r``
        whose scaling is 1 (each source's scaling goes into its block of B)."""
        return config.replace(rank=config.rank * n, alpha=float(config.rank * n))

    def load_sum(self, sources: list["LoRA"], weights: list[float]) -> None:
        with torch.no_grad():
            for key, site in self.site_modules.items():
                parts = [s.site_modules[key] for s in sources]
                site.lora_A.copy_(torch.cat([p.lora_A.float() for p in parts]))
                site.lora_B.copy_(torch.cat([w * p.scaling * p.lora_B.float() for w, p in zip(weights, parts)], dim=1))

    @classmethod
    def stack_sites(cls, sites: list[nn.Module | None]) -> nn.Module:
        """All tasks' A and B at one site, ranks zero-padded to the largest and each task's
        scaling folded into its B; absent tasks get zeros. Zero rows and columns add exact zeros,
        so stacking changes no result."""
        present = [s for s in sites if s is not None]
        rank = max(s.lora_A.shape[0] for s in present)
        d_in, d_out = present[0].lora_A.shape[1], present[0].lora_B.shape[0]
        A = torch.zeros(len(sites), rank, d_in)
        B = torch.zeros(len(sites), d_out, rank)
        with torch.no_grad():
            for i, s in enumerate(sites):
                if s is not None:
                    r = s.lora_A.shape[0]
                    A[i, :r] = s.lora_A.float()
                    B[i, :, :r] = s.lora_B.float() * s.scaling
        return GatheredLoRA(A, B)


class GatheredLoRA(nn.Module):
    """LoRA for a mixed-task batch: each example's own A and B, gathered by its task slot, in two
    batched matrix products (the BGMV idea of Punica / S-LoRA); no loop over tasks or examples."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A_t", A.transpose(1, 2).contiguous())  # (tasks, d_in, r)
        self.register_buffer("B_t", B.transpose(1, 2).contiguous())  # (tasks, r, d_out)

    def forward(self, x: torch.Tensor, h: torch.Tensor, batch) -> torch.Tensor:
        idx = batch.idx
        with lowrank_precision(x):
            return torch.bmm(torch.bmm(x.to(self.A_t.dtype), self.A_t[idx]), self.B_t[idx])

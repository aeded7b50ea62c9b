"""Sequential bottleneck adapter (Houlsby et al. 2019).

After a sub-layer's output projection: ``h <- h + up(act(down(h)))``. The up-projection starts at
zero, so a fresh adapter is the identity. Placement "attn_out" + "ffn_out" is Houlsby's; "ffn_out"
alone is the Pfeiffer placement.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..base import Capabilities, LayerwiseConfig, SiteDelta, make_activation
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
        self.require_positive("bottleneck_dim")
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

    def linear_outputs(self, z: torch.Tensor, scale: float = 1.0) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        """The down-projection's output and the up-projection's (times ``scale``, as the site adds it)."""
        down = self.down(z.to(self.down.weight.dtype))
        return [(self.down.weight, self.down.bias, down), (self.up.weight, self.up.bias, self.up(self.act(down)) * scale)]


class GatheredMLP(nn.Module):
    """Bottleneck MLPs of many tasks for a mixed-task batch: each example's own down/up weights,
    gathered by its task slot, in batched matrix products; no loop over tasks or examples.

    reads: "h" (sequential adapter: the sub-layer output) or "x" (parallel adapter: its input)."""

    def __init__(self, down_w, down_b, up_w, up_b, activation: nn.Module, reads: str) -> None:
        super().__init__()
        self.register_buffer("down_t", down_w.transpose(1, 2).contiguous())  # (tasks, d_in, m)
        self.register_buffer("down_b", down_b.unsqueeze(1))                   # (tasks, 1, m)
        self.register_buffer("up_t", up_w.transpose(1, 2).contiguous())      # (tasks, m, d_out)
        self.register_buffer("up_b", up_b.unsqueeze(1))                       # (tasks, 1, d_out)
        self.act = activation
        self.reads = reads

    def forward(self, x: torch.Tensor, h: torch.Tensor, batch) -> torch.Tensor:
        idx = batch.idx
        z = (h if self.reads == "h" else x).to(self.down_t.dtype)
        # bmm then a broadcast bias add: baddbmm with a broadcast (B, 1, m) bias is a slow path
        z = self.act(torch.bmm(z, self.down_t[idx]) + self.down_b[idx])
        return torch.bmm(z, self.up_t[idx]) + self.up_b[idx]


def stack_mlps(mlps: list["Bottleneck | None"], scalings: list[float], reads: str) -> GatheredMLP | None:
    """Stack the bottleneck MLPs of many tasks (None: a task without one at this site, giving 0).

    Bottleneck sizes are zero-padded to the largest: a padded unit has zero down weights and bias,
    so its activation input is 0, and a zero up column, so it adds exactly 0. Each task's scaling
    is folded into its up projection. Different activations cannot share one kernel: None."""
    present = [m for m in mlps if m is not None]
    if len({type(m.act) for m in present}) > 1:
        return None
    dim = max(m.down.out_features for m in present)
    d_in, d_out = present[0].down.in_features, present[0].up.out_features
    n = len(mlps)
    down_w, down_b = torch.zeros(n, dim, d_in), torch.zeros(n, dim)
    up_w, up_b = torch.zeros(n, d_out, dim), torch.zeros(n, d_out)
    with torch.no_grad():
        for i, (m, s) in enumerate(zip(mlps, scalings)):
            if m is None:
                continue
            k = m.down.out_features
            down_w[i, :k], down_b[i, :k] = m.down.weight.float(), m.down.bias.float()
            up_w[i, :, :k], up_b[i] = m.up.weight.float() * s, m.up.bias.float() * s
    return GatheredMLP(down_w, down_b, up_w, up_b, type(present[0].act)(), reads)


class SequentialSite(nn.Module):
    """Reads the sub-layer output ``h`` (not its input)."""

    def __init__(self, mlp: Bottleneck) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)

    def linear_outputs(self, x: torch.Tensor, h: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        return self.mlp.linear_outputs(h)


@register
class BottleneckAdapter(SiteDelta):
    config_class = BottleneckConfig
    capabilities = Capabilities(site_terms=True, mixed_batches=True, fusable=True, linear_units=True)

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        return SequentialSite(Bottleneck(d_out, d_out, self.config.dim_for(d_out), self.config.activation))

    @classmethod
    def stack_sites(cls, sites: list[nn.Module | None]) -> nn.Module | None:
        return stack_mlps([None if s is None else s.mlp for s in sites], [1.0] * len(sites), reads="h")

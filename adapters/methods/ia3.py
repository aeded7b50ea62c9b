"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale keys, values and the feed-forward activations.

- At an output-scaled site (keys, values): ``h <- l * h``, i.e. the term ``(l - 1) * h``.
- At an input-scaled site (the feed-forward down-projection ``W``, ``feedforward`` targets):
  ``h <- W (l * x) + b``, i.e. the term ``W ((l - 1) * x)``. This needs the frozen ``W``; the
  site holds it through :class:`~adapters.base.FrozenRef`, so it is neither saved with the delta
  nor counted as its parameter, and follows the backbone to any device.

``l`` starts at ones, so a fresh (IA)^3 is exactly the backbone. Its parameter count is tiny
(about 0.02% of MiniLM), which is why the paper trains it with a large learning rate.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..base import FrozenRef, LayerwiseConfig, SiteDelta
from ..errors import ConfigError
from ..registry import register
from ..targets import Site, resolve_sites


@dataclasses.dataclass(frozen=True)
class IA3Config(LayerwiseConfig):
    """``feedforward``: targets whose *input* is rescaled (the feed-forward down-projection);
    every other target has its output rescaled."""

    method = "ia3"
    default_lr = 3e-3
    targets: tuple[str, ...] = ("key", "value", "ffn_out")
    feedforward: tuple[str, ...] = ("ffn_out",)

    def validate(self) -> None:
        super().validate()
        stray = sorted(set(self.feedforward) - set(self.targets))
        if stray:
            raise ConfigError(f"ia3: feedforward targets {stray} are not among targets {list(self.targets)}")


class IA3Site(nn.Module):
    """The scaling vector of one site; ``base`` is the frozen Linear (input-scaled sites only)."""

    def __init__(self, size: int, base: nn.Linear | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.base = FrozenRef(base) if base is not None else None

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        d = self.scale - 1
        if self.base is None:
            return h.to(d.dtype) * d
        w = self.base().weight
        return F.linear(x.to(w.dtype) * d.to(w.dtype), w)


@register
class IA3(SiteDelta):
    config_class = IA3Config

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        module = backbone.get_submodule(site.output)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"(IA)^3 rescales linear layers; {site.output} is not one")
        c = self.config
        # (no feedforward targets: every site rescales its output; resolve_sites refuses an empty list)
        if c.feedforward and site.key in {s.key for s in resolve_sites(backbone, c.feedforward, c.layers, c.skip_first)}:
            return IA3Site(d_in, module)
        return IA3Site(d_out, None)

    @classmethod
    def stack_sites(cls, sites: list[nn.Module | None]) -> nn.Module:
        """Every task's ``l - 1`` at one site, gathered per example; absent tasks get zeros (no change)."""
        present = [s for s in sites if s is not None]
        D = torch.zeros(len(sites), present[0].scale.shape[0])
        with torch.no_grad():
            for i, s in enumerate(sites):
                if s is not None:
                    D[i] = s.scale.float() - 1
        return GatheredIA3(D, present[0].base)


class GatheredIA3(nn.Module):
    """(IA)^3 for a mixed-task batch: each example's own scaling, gathered by its task slot."""

    def __init__(self, D: torch.Tensor, base: FrozenRef | None) -> None:
        super().__init__()
        self.register_buffer("D", D)  # (tasks, size)
        self.base = base

    def forward(self, x: torch.Tensor, h: torch.Tensor, batch) -> torch.Tensor:
        d = self.D[batch.idx].unsqueeze(1)  # (batch, 1, size)
        if self.base is None:
            return h.to(d.dtype) * d
        w = self.base().weight
        return F.linear(x.to(w.dtype) * d.to(w.dtype), w)

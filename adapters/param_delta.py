"""Specification methods as deltas on existing parameters.

BitFit, last-layer tuning and selective module tuning "train some of the backbone's own weights".
Editing those weights would break two promises: many tasks on one backbone, and a backbone that
never changes. So each chosen parameter ``p`` gets a zero-initialised twin ``dp`` and the module
computes with ``p + dp``. Every supported module is linear in its weight and bias, so that equals
``output + term(x, dp)``, added by a forward hook: the gradient of ``dp`` is exactly the gradient
``p`` would have had, and ``dp = 0`` is bit-for-bit the backbone.

The per-module-type term functions live here, once, for all such methods.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import SiteDelta
from .errors import ConfigError, TargetError
from .targets import Site

Term = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)


def supported(m: nn.Module) -> bool:
    """Module types whose output is linear in their weight and bias."""
    return isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) or _is_rmsnorm(m)


def param_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the delta parameters a module can take (a bias even where it has none)."""
    if isinstance(m, nn.Linear):
        return {"weight": tuple(m.weight.shape), "bias": (m.out_features,)}
    if isinstance(m, nn.Embedding):
        return {"weight": tuple(m.weight.shape)}
    return {"weight": tuple(m.weight.shape), "bias": tuple(m.weight.shape)}


def make_term(m: nn.Module) -> Term:
    """term(x, deltas) such that module_with(p + dp)(x) == module(x) + term(x, dp)."""
    if isinstance(m, nn.Linear):
        def linear(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
            w, b = d.get("weight"), d.get("bias")
            if w is None:
                return b
            return F.linear(x.to(w.dtype), w, b)

        return linear
    if isinstance(m, nn.Embedding):
        padding_idx = m.padding_idx

        def embedding(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.embedding(x, d["weight"], padding_idx)

        return embedding
    if isinstance(m, nn.LayerNorm):
        shape, eps = m.normalized_shape, m.eps

        def normed(x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.float(), shape, None, None, eps)
    elif _is_rmsnorm(m):
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))

        def normed(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise TargetError(f"cannot tune parameters of {type(m).__name__}; supported: Linear, LayerNorm, RMSNorm, Embedding")

    def norm(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        w, b = d.get("weight"), d.get("bias")
        out = 0.0 if w is None else w * normed(x).to(w.dtype)
        return out if b is None else out + b

    return norm


class ParamSite(nn.Module):
    """The zero-initialised twins of one module's chosen parameters."""

    def __init__(self, module: nn.Module, names: Iterable[str]) -> None:
        super().__init__()
        shapes = param_shapes(module)
        names = [n for n in names if n in shapes]
        if not names:
            raise TargetError(f"{type(module).__name__} has none of the requested parameters")
        dtype = module.weight.dtype
        self.deltas = nn.ParameterDict({n: nn.Parameter(torch.zeros(shapes[n], dtype=dtype)) for n in names})
        self._term = make_term(module)  # a closure over constants, not a reference to the module

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._term(x, dict(self.deltas.items()))


class ParamDelta(SiteDelta):
    """Base of the specification methods: subclasses say which modules and which parameters."""

    def module_patterns(self, backbone: nn.Module) -> list[str]:
        """Regexes over module paths; by default the config's ``patterns``."""
        return list(self.config.patterns)

    def exclude_patterns(self) -> tuple[str, ...]:
        return getattr(self.config, "exclude", ())

    def resolve_sites(self, backbone: nn.Module) -> list[Site]:
        patterns = self.module_patterns(backbone)
        compiled = [re.compile(p) for p in patterns]
        excluded = [re.compile(p) for p in self.exclude_patterns()]
        names = [n for n, m in backbone.named_modules() if n and supported(m)]
        hits = [n for n in names if any(c.search(n) for c in compiled) and not any(e.search(n) for e in excluded)]
        hits = [n for n in hits if set(param_shapes(backbone.get_submodule(n))) & set(self.config.params)]
        if not hits:
            sample = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise TargetError(f"{self.config.method}: patterns {patterns} match no tunable module; candidates: {sample}")
        return [Site(re.sub(r"\W", "_", n), -1, n, n) for n in hits]

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        return ParamSite(backbone.get_submodule(site.output), self.config.params)


def check_params(method: str, params: tuple[str, ...]) -> None:
    bad = sorted(set(params) - {"weight", "bias"})
    if bad or not params:
        raise ConfigError(f"{method}: params must be a non-empty subset of ['bias', 'weight'], got {list(params)}")


def check_regexes(method: str, **lists: tuple[str, ...]) -> None:
    """Each of ``patterns`` / ``exclude`` must be regular expressions: a bad one is a ConfigError
    naming it when the config is made, not a bare ``re.error`` (a traceback) when it is attached."""
    for name, items in lists.items():
        for p in items:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"{method}: {name} entry {p!r} is not a regular expression ({e})") from None

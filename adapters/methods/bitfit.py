"""BitFit (Ben Zaken et al. 2022): tune only bias terms.

Implemented as zero-initialised bias deltas (see adapters/param_delta.py), so the backbone's own
biases never change. Architectures without biases (Llama) get a new bias delta on every linear and
norm module, which is what "BitFit" means there in practice.
"""

from __future__ import annotations

import dataclasses

from ..config import DeltaConfig
from ..param_delta import ParamDelta, check_params, check_regexes
from ..registry import register


@dataclasses.dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    """patterns / exclude: regexes over module paths (default: every module, minus the pooler)."""

    method = "bitfit"
    default_lr = 5e-3
    patterns: tuple[str, ...] = (".",)
    exclude: tuple[str, ...] = ("pooler",)
    params: tuple[str, ...] = ("bias",)

    def validate(self) -> None:
        check_params(self.method, self.params)
        check_regexes(self.method, patterns=self.patterns, exclude=self.exclude)


@register
class BitFit(ParamDelta):
    config_class = BitFitConfig

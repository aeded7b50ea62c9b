"""Specification methods that pick existing modules: last-layer tuning and selective tuning.

Both tune (zero-initialised deltas of) the weights and biases of chosen modules; see
adapters/param_delta.py for why a delta rather than the weights themselves.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..config import DeltaConfig
from ..errors import ConfigError
from ..param_delta import ParamDelta, check_params, check_regexes
from ..registry import register
from ..targets import block_paths, num_layers


@dataclasses.dataclass(frozen=True)
class LastLayerConfig(DeltaConfig):
    """Tune every linear / norm module of the last ``num_layers`` transformer blocks."""

    method = "last_layer"
    default_lr = 1e-4
    num_layers: int = 1
    params: tuple[str, ...] = ("weight", "bias")

    def validate(self) -> None:
        self.require_positive("num_layers")
        check_params(self.method, self.params)


@register
class LastLayer(ParamDelta):
    config_class = LastLayerConfig

    def module_patterns(self, backbone: nn.Module) -> list[str]:
        n = num_layers(backbone)
        if self.config.num_layers > n:
            raise ConfigError(f"num_layers={self.config.num_layers} but the backbone has {n} layers")
        paths = block_paths(backbone)
        return [rf"^{re.escape(paths[i])}\." for i in range(n - self.config.num_layers, n)]


@dataclasses.dataclass(frozen=True)
class SelectiveConfig(DeltaConfig):
    """Tune the modules whose path matches any regex in ``patterns`` (e.g. ``"attention"``)."""

    method = "selective"
    default_lr = 1e-4
    patterns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    params: tuple[str, ...] = ("weight", "bias")

    def validate(self) -> None:
        if not self.patterns:
            raise ConfigError("selective: give at least one module-name pattern in 'patterns'")
        check_params(self.method, self.params)
        check_regexes(self.method, patterns=self.patterns, exclude=self.exclude)


@register
class Selective(ParamDelta):
    config_class = SelectiveConfig

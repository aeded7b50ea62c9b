"""Prefix tuning (Li & Liang 2021): trainable key/value vectors prepended in every attention layer.

During training the prefix is produced by an MLP from a small embedding (the reparameterisation
the paper found necessary for stable training); :meth:`Prefix.fold` evaluates that MLP once and
keeps only its result, so a frozen or saved prefix holds just ``layers x 2 x heads x P x d_head``
numbers.

How it reaches the keys and values without forking any modeling code: transformers routes
attention through a registry of attention functions chosen by ``config._attn_implementation``.
While a prefix is attached, that name points to :func:`_prefix_attention`, which prepends the
active prefixes to ``key``/``value``, widens the mask, and calls the stock SDPA function. With no
active prefix it calls the stock function unchanged; detaching the last prefix restores the
backbone's own setting.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..base import Capabilities, Delta, IsActive, check_no_repeats
from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import register
from ..targets import attention_modules, select_layers

_IMPL = "delta_prefix"

# attention module -> prefix providers (callables returning (key, value) or None when inactive)
_PROVIDERS: "weakref.WeakKeyDictionary[nn.Module, list[Callable[[], tuple[torch.Tensor, torch.Tensor] | None]]]" = (
    weakref.WeakKeyDictionary()
)
# backbone config -> (attn implementation before the first prefix, number of prefixes attached)
_SAVED: dict[int, list[Any]] = {}


def _prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    prefixes = [p for p in (f() for f in _PROVIDERS.get(module, ())) if p is not None]
    if not prefixes:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    pk = torch.cat([k for k, _ in prefixes], dim=1).to(key.dtype)  # heads x P x d
    pv = torch.cat([v for _, v in prefixes], dim=1).to(value.dtype)
    n = pk.shape[1]
    key = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
    if attention_mask is None:  # SDPA skipped the mask: rebuild what it would have meant
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        if getattr(module, "is_causal", False):
            attention_mask = attention_mask.tril(k_len - q_len)
        attention_mask = attention_mask[None, None]
    elif attention_mask.dtype != torch.bool:
        raise RuntimeError("prefix tuning expects a boolean SDPA mask")
    ones = torch.ones(*attention_mask.shape[:-1], n, dtype=torch.bool, device=attention_mask.device)
    attention_mask = torch.cat([ones, attention_mask], dim=-1)
    kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_IMPL, _prefix_attention)
AttentionMaskInterface.register(_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@dataclasses.dataclass(frozen=True)
class PrefixConfig(DeltaConfig):
    """num_tokens: prefix length P (the survey used 5); hidden_dim: width of the training-time MLP."""

    method = "prefix"
    default_lr = 5e-3
    num_tokens: int = 5
    reparameterize: bool = True
    hidden_dim: int = 512
    layers: tuple[int, ...] | None = None
    skip_first: int = 0

    def validate(self) -> None:
        if self.num_tokens < 1 or self.hidden_dim < 1:
            raise ConfigError("num_tokens and hidden_dim must be >= 1")
        check_no_repeats("prefix", "layers", self.layers)
        if self.skip_first < 0:
            raise ConfigError(f"prefix: skip_first must be >= 0, got {self.skip_first}")


@register
class Prefix(Delta):
    config_class = PrefixConfig
    # the prefix positions are attended to from the first step; freezing folds the MLP away
    capabilities = Capabilities(identity_at_init=False, folds=True)

    def __init__(self, config: PrefixConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.layer_modules = attention_modules(backbone)  # raises a clear error where unsupported
        self.layer_ids = select_layers(backbone, config.layers, config.skip_first)
        cfg = backbone.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (len(self.layer_ids), 2, self.kv_heads, config.num_tokens, self.head_dim)
        self.shape = shape
        if config.reparameterize:
            self.embedding = nn.Parameter(torch.randn(config.num_tokens, cfg.hidden_size) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.hidden_size, config.hidden_dim),
                nn.Tanh(),
                nn.Linear(config.hidden_dim, shape[0] * shape[1] * shape[2] * shape[4]),
            )
            self.prefix = None
        else:
            self.prefix = nn.Parameter(torch.randn(*shape) * 0.02)

    def kv(self) -> torch.Tensor:
        """All prefixes: layers x 2 x heads x P x head_dim."""
        if self.prefix is not None:
            return self.prefix
        L, two, H, P, D = self.shape
        out = self.mlp(self.embedding)  # P x (L*2*H*D)
        return out.view(P, L, two, H, D).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fold(self) -> None:
        if self.prefix is None:
            value = self.kv().detach().clone()
            del self.mlp, self.embedding
            self.prefix = nn.Parameter(value, requires_grad=False)

    def _hooks(self, backbone: nn.Module, is_active: IsActive) -> list:
        # One kv() per forward pass would be ideal; it is cheap next to attention, so each layer
        # asks for it and takes its slice.
        handles = []
        for slot, layer in enumerate(self.layer_ids):
            module = backbone.get_submodule(self.layer_modules[layer])

            def provide(slot: int = slot) -> tuple[torch.Tensor, torch.Tensor] | None:
                if not is_active():
                    return None
                kv = self.kv()[slot]
                return kv[0], kv[1]

            handles.append(_register_provider(backbone, module, provide))
        return handles


def _register_provider(backbone: nn.Module, module: nn.Module, provide: Callable) -> "_Handle":
    config = backbone.config
    saved = _SAVED.setdefault(id(config), [config._attn_implementation, 0])
    saved[1] += 1
    config._attn_implementation = _IMPL
    providers = _PROVIDERS.setdefault(module, [])
    providers.append(provide)

    def remove() -> None:
        providers.remove(provide)
        saved[1] -= 1
        if saved[1] == 0:
            config._attn_implementation = saved[0]
            _SAVED.pop(id(config), None)

    return _Handle(remove)


class _Handle:
    """Removes a provider once, like torch's RemovableHandle does for hooks."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def remove(self) -> None:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()

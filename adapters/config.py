"""Typed, frozen configuration dataclasses for delta methods.

Every delta method owns one subclass of :class:`DeltaConfig`. Configs are immutable (so a config
recorded in a checkpoint or an MLflow run is the config that was trained) and round-trip through
plain dicts / JSON with strict checking: unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """Base class of every method's config.

    Subclasses set ``method`` (the registry name) and may set ``default_lr``, the learning rate
    the training loop uses for this method's parameters when the user gives none (delta methods
    differ by orders of magnitude here: prompt tuning wants ~1e-2, full last-layer tuning ~5e-5).
    """

    method: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        # Lists are accepted for tuple fields (JSON has no tuples) and normalised, so configs hash
        # and compare by value.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
                value = tuple(value)
            if not _matches(value, hints[f.name]):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} must be {_describe(hints[f.name])}, "
                    f"got {value!r} ({type(value).__name__})"
                )
        self.validate()

    def validate(self) -> None:
        """Check value ranges; subclasses override and raise :class:`ConfigError`."""

    def require_positive(self, *keys: str) -> None:
        """Refuse any of the integer fields ``keys`` below 1 (a size, a count), naming it."""
        for key in keys:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, including the method name."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaConfig":
        """Build from a dict; ``method`` may be present (it must then match)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be built from a dict, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"{cls.__name__} is for method {cls.method!r}, not {method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} for method {cls.method!r}; valid keys: {sorted(names)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "DeltaConfig":
        """A copy with some fields changed (validated like a new config)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for method {self.method!r}; valid keys: {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is float:  # NaN or inf would pass every range check (all comparisons with NaN are false)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is tuple:
        args = get_args(hint)
        inner = _describe(args[0]) if args else "any"
        return f"a list of {inner}"
    if hint is type(None):
        return "null"
    if hint is float:
        return "a finite number"
    return getattr(hint, "__name__", str(hint))

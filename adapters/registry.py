"""Name -> delta class registry.

Methods register themselves with ``@register``. Every module in ``adapters/methods/`` is imported
once, on first lookup, so adding a method is adding one file there: nothing else names it.

Methods that live in other packages (``fusion``'s AdapterFusion, a user's own) are declared as
entry points of the group :data:`ENTRY_POINT_GROUP` in their package's metadata
(``pyproject.toml``), and loaded on first lookup too, so a checkpoint of such a task loads without
importing them by hand, and this package names none of them.
"""

from __future__ import annotations

# the method a task gets when none is named (the Houlsby adapter of the survey)
DEFAULT_METHOD = "bottleneck"
# the learning rate of a classification head when none is given
DEFAULT_HEAD_LR = 1e-3

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from .errors import UnknownMethodError

if TYPE_CHECKING:
    from .base import Delta
    from .config import DeltaConfig

_REGISTRY: dict[str, type["Delta"]] = {}
_loaded = False
ENTRY_POINT_GROUP = "delta_continual.methods"


def register(cls: type["Delta"]) -> type["Delta"]:
    """Class decorator: register a :class:`~adapters.base.Delta` under its config's method name."""
    name = cls.config_class.method
    if not name:
        raise ValueError(f"{cls.__name__}.config_class has no method name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")
    _loaded = True  # before the plugins: they import adapters, which may look a method up
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except ModuleNotFoundError as e:
            if e.name != ep.value.split(".")[0].split(":")[0]:  # the plugin exists but is broken: say so
                raise


def available_methods(include_composite: bool = False) -> list[str]:
    """Sorted names of the registered methods a task can use on its own. ``include_composite``
    adds methods built over other tasks (fusion), which need those tasks to exist."""
    _load_methods()
    return sorted(n for n, cls in _REGISTRY.items() if include_composite or not cls.capabilities.composite)


def get_method(name: str) -> type["Delta"]:
    """The delta class registered as ``name``; the error lists the known names."""
    _load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown delta method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def make_config(spec: "str | dict[str, Any] | DeltaConfig", **overrides: Any) -> "DeltaConfig":
    """Turn a method name, a dict with a ``method`` key, or a config into a validated config."""
    from .config import DeltaConfig

    if isinstance(spec, DeltaConfig):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, str):
        return get_method(spec).config_class.from_dict(dict(overrides))
    if isinstance(spec, dict):
        if "method" not in spec:
            raise UnknownMethodError(f"a delta config dict needs a 'method' key; known methods: {', '.join(available_methods())}")
        cls = get_method(spec["method"]).config_class
        return cls.from_dict({**spec, **overrides})
    raise TypeError(f"cannot make a delta config from {type(spec).__name__}")

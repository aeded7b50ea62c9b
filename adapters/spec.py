"""The method-spec grammar of the command line, next to the configs it builds.

    parse_method("lora")                  -> LoRAConfig()
    parse_method("lora:rank=16,alpha=32") -> LoRAConfig(rank=16, alpha=32.0)
    parse_combo("lora:rank=4+bitfit")     -> [LoRAConfig(rank=4), BitFitConfig()]
    methods_label([LoRAConfig(), BitFitConfig()]) -> "lora+bitfit"

Values are read as YAML scalars (numbers, booleans, strings), so ``dropout=0.1`` is a float and
``targets=[query,value]`` a list; ``alpha=1e1`` is a float too (plain YAML 1.1 would read text).
A spec becomes a typed, validated :class:`DeltaConfig` here, at the edge: everything after the
parser sees configs, never strings.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

from .config import DeltaConfig
from .errors import ConfigError
from .registry import make_config


def parse_options(text: str, context: str | None = None, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``k=v,k=v`` -> dict (values read as YAML scalars). Raises :class:`ConfigError`, also for a
    key given twice (here, or in ``given``: options read earlier for the same thing), which
    would otherwise keep one of the two values silently."""
    import yaml

    out: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"option {item!r} must be key=value (in {context or text!r})")
        key = key.strip()
        if not value.strip():  # "rank=" is a slip (a value lost in the shell), not a request for the default
            raise ConfigError(f"option {key!r} has no value (in {context or text!r}); give one, or leave the option out "
                              "for its default")
        if key in out or key in (given or {}):
            raise ConfigError(f"option {key!r} is given twice (in {context or text!r}): give it once")
        try:
            out[key] = yaml.load(value, Loader=_loader())
        except yaml.YAMLError as e:
            raise ConfigError(f"option {item!r}: cannot read the value ({e.problem})") from None
    return out


@functools.cache
def _loader() -> type:
    """SafeLoader that reads numbers written with an exponent and no dot (``1e-3``) as floats, as
    YAML 1.2 does: PyYAML's YAML 1.1 rules read them as text, so lr=1e-3 or ewc_lambda=1e4 were
    refused. (Stream files are read the same way, streams/safe_yaml.py; the layers keep the two
    packages from sharing one.)"""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
    return Loader


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``targets=[query,value]`` stays one option."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def parse_method(text: str) -> DeltaConfig:
    """``lora`` or ``lora:rank=16,alpha=32`` -> the method's validated config."""
    name, _, opts = text.partition(":")
    if not name.strip():
        raise ConfigError(f"method spec {text!r} names no method")
    options = parse_options(opts, text)
    if "method" in options:  # it would replace the method named before the colon
        raise ConfigError(f"method spec {text!r}: 'method' is not an option; the method is named before the ':'")
    return make_config({"method": name.strip(), **options})


def parse_combo(text: str) -> list[DeltaConfig]:
    """Methods joined by ``+`` (a combination), each as in :func:`parse_method`."""
    return [parse_method(m) for m in text.split("+")]


def method_configs(methods: Any) -> list[DeltaConfig]:
    """Validated configs of one method spec or a list of them: a method name, a string in the
    command line's grammar (``"lora:rank=16"``; given alone, also a ``+``-joined combination), a
    dict with a ``method`` key, or a config. What ``add_task`` and every strategy read."""
    if isinstance(methods, str):  # one spec, not a list of its letters
        return parse_combo(methods)
    specs = methods if isinstance(methods, (list, tuple)) else [methods]
    return [parse_method(m) if isinstance(m, str) else make_config(m) for m in specs]


def methods_label(methods: Sequence[DeltaConfig | str | dict[str, Any]], options: bool = False) -> str:
    """``lora+bitfit``: the method names of a combination, for run names and report rows.
    ``options=True`` adds each method's options that differ from its defaults, ``lora(rank=4)+bitfit``:
    a label that tells apart combinations of the same methods set otherwise (rows of one report)."""
    return "+".join(_method_label(make_config(m), options) for m in methods)


def _method_label(config: DeltaConfig, options: bool) -> str:
    if not options:
        return config.method
    try:
        defaults = make_config(config.method).to_dict()
    except ConfigError:  # a method with a required option (selective): every option is shown
        defaults = {}
    missing = object()
    changed = [f"{k}={_short(v)}" for k, v in config.to_dict().items() if k != "method" and defaults.get(k, missing) != v]
    return f"{config.method}({','.join(changed)})" if changed else config.method


def _short(value: Any) -> str:
    """A value as the method-spec grammar writes it: ``[query,value]``, not ``['query', 'value']``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)

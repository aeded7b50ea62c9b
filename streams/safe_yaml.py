"""YAML that a hostile or broken file cannot use to exhaust memory.

``yaml.safe_load`` refuses arbitrary objects but not a "billion laughs" file: nine anchors, each a
list of nine aliases of the previous one, read in a few hundred bytes and expand to 9^9 items as
soon as anything walks the result. Here the document is composed first (aliases stay shared
nodes), its expanded size is counted over the node graph with memoisation (linear in the file),
and a document larger than the limits is refused before it is constructed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .catalog import DataError

MAX_BYTES = 10 * 1024 * 1024      # a stream file is a few kB; data belongs in the files it names
MAX_EXPANDED_NODES = 1_000_000    # scalars, lists and mappings after every alias is expanded


def _expanded(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a node that contains itself counts once (a recursive alias)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded(child, memo, limit) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded(k, memo, limit) + _expanded(v, memo, limit) for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, limit + 1)  # saturate: the exact size of a bomb does not matter
    return memo[key]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads numbers written with an exponent and no dot (``1e-3``) as floats,
    as YAML 1.2 does; PyYAML's YAML 1.1 rules read them as text."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def load_yaml(path: Path) -> Any:
    """The document in ``path``; :class:`DataError` (naming the file) when it cannot be read, is
    not YAML, or is too large once its aliases are expanded."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DataError(f"{path}: {size} bytes; a stream file may have at most {MAX_BYTES} (put data in the files it names)")
        text = path.read_text(encoding="utf-8")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: stream file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a readable YAML file ({e})") from None
    except OSError as e:  # a symlink loop (ELOOP), a directory, no permission
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded(node, {}, MAX_EXPANDED_NODES) > MAX_EXPANDED_NODES:
            raise DataError(f"{path}: expands to more than {MAX_EXPANDED_NODES:,} values through nested aliases "
                            "(anchors '&' referenced with '*'); refused")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not a readable YAML file ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read") from None
    finally:
        loader.dispose()

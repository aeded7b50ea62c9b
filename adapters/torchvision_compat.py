"""The one workaround for a torchvision whose C extension cannot load (the ``[avalanche]`` extra).

Why it exists: avalanche-lib needs torchvision and imports it at import time, and transformers
imports it too as soon as a model class is imported. On a CPU-only machine the package registry
has only CUDA builds of torchvision; the one that pairs with the installed torch (0.28.0 for torch
2.13.0) installs, but its ``_C`` extension cannot load beside CPU torch (``libc10_cuda.so``
missing). torchvision then dies on import with ``RuntimeError: operator torchvision::nms does not
exist``, because it registers fake (meta) kernels for ``nms`` and ``qnms`` and those need the
operators' schemas, which only ``_C`` defines. Every ``import transformers`` model class fails with
it.

What it does: if torchvision is installed and not imported yet, try to load its ``_C`` the way
torchvision does. If that works (any machine with a matching build, e.g. CUDA torch + CUDA
torchvision) nothing else happens. If it fails, define the two operator *schemas* (no kernels),
so torchvision imports; its image ops (``nms``, ``roi_align``, ...) then raise when called, which
nothing here does (we use torchvision only because Avalanche imports it).

:func:`ensure_importable` runs when :mod:`adapters` is imported, so any code that imports this
project before transformers or avalanche is covered. Without torchvision installed (the core
install) it is a no-op costing one ``find_spec``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import torch

# the operators torchvision registers fake kernels for at import time (torchvision/_meta_registrations.py)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it would undefine the schemas
patched = False  # True once the schemas were defined here (torchvision's _C could not load)


def _extension_path(package_dir: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def ensure_importable() -> bool:
    """Make ``import torchvision`` work when its C extension cannot load; returns whether the
    workaround was needed. Safe to call many times."""
    global _library, patched
    if patched or "torchvision" in sys.modules:
        return patched
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    path = _extension_path(list(spec.submodule_search_locations)[0])
    if path is not None:
        try:
            torch.ops.load_library(path)  # what torchvision/extension.py does; loading twice is harmless
            return False
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    patched = True
    return True

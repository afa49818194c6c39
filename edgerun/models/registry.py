"""HF architecture names -> edgerun model families.

Each family module in edgerun/models declares the HF ``architectures`` it runs in
``ARCHITECTURES`` (and may declare ``MODEL_TYPES`` aliases); adding a family is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from ..errors import UnsupportedArchitectureError

_NOT_FAMILIES = {"registry", "rope", "blocks", "layers"}


@lru_cache(maxsize=None)
def _table() -> tuple[dict, dict]:
    import edgerun.models as pkg
    archs, types = {}, {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"edgerun.models.{info.name}")
        for a in getattr(mod, "ARCHITECTURES", ()):
            archs[a] = mod
        for t in getattr(mod, "MODEL_TYPES", ()):
            types[t] = mod
    return archs, types


def supported() -> list[str]:
    return sorted(_table()[0])


def family(arch: str):
    """The model module for an HF architecture name (or model_type); a clear error listing the supported ones."""
    archs, types = _table()
    mod = archs.get(arch) or types.get(arch)
    if mod is None:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported (supported: {', '.join(supported())})")
    return mod

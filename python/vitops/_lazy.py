"""Lazy attributes of a package: its families' modules load on first use, not on ``import vitops``."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, submodules: tuple[str, ...], names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving ``submodules`` (``package.<name>``) and ``names`` (attribute
    -> the submodule that defines it) on first access."""

    def __getattr__(attr: str):
        if attr in submodules:
            return importlib.import_module(f"{package}.{attr}")
        if attr in names:
            return getattr(importlib.import_module(f"{package}.{names[attr]}"), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__

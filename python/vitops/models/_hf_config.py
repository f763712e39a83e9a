"""Reading HF config objects and dicts alike (the ``from_hf`` constructors of every family's config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def config_getter(obj: Any) -> Callable[[str], Any]:
    """``get(name)``: the field of an HF config object or dict, None when absent (or obj is None)."""
    if obj is None:
        return lambda name: None
    if isinstance(obj, dict):
        return obj.get
    return lambda name: getattr(obj, name, None)


def square_side(size: Any, what: str) -> int | None:
    """HF allows image_size / patch_size as an int or a square (h, w) pair; ``what`` names the
    config in the error for a non-square pair."""
    if size is None or isinstance(size, int):
        return size
    h, w = size
    if h != w:
        raise ValueError(f"{what}: only square images and patches are supported, got {tuple(size)}")
    return h

"""Argument handling every KerasHub-style encoder shares."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(owner: str, dtype) -> torch.dtype | None:
    """KerasHub's ``dtype`` argument (None, a dtype name or a torch dtype) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(
        f"{owner}: dtype must be None, 'float32', 'bfloat16', 'float16' or the matching torch dtype, "
        f"got {dtype!r} (Keras mixed-precision policies are not supported: cast the module instead)"
    )


def check_positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: `{name}` must be a positive int, got {value!r}")


def check_epsilon(owner: str, value) -> None:
    """KerasHub's ``layer_norm_epsilon``: a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise ValueError(f"{owner}: layer_norm_epsilon must be a finite number >= 0, got {value!r}")

"""vitops.posemb_sincos_2d: MaxText's MoCo v3 2-D sin-cos position table (``posemb_type_for_vit="sincos2d"``)."""

from __future__ import annotations

import math
import struct

import torch

from ._checks import check_shape_fits, checked_mul, dtype_name, fail_unless, is_concrete

_op = torch.ops.vitops.posemb_sincos_2d.default
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10000.0, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """MaxText ``posemb_sincos_2d(h, w, width, temperature, dtype)``: the table ``[1, h * w, width]``.

    Row ``m = y * w + x`` is ``[sin(x f_k), cos(x f_k), sin(y f_k), cos(y f_k)]`` for
    ``k = 0 .. width/4 - 1``, ``f_k = 1 / temperature^(k / (width/4 - 1))``, computed in float32 (as
    MaxText) and rounded once to ``dtype``. ``width`` must be a multiple of 4. MaxText's width-4 table
    is NaN (it divides by width/4 - 1 = 0); here f_0 = 1. One kernel, no host synchronisation; the
    table is a constant (no gradient).
    """
    like = torch.empty(0, dtype=dtype, device=device)  # the device to build on (the op's dispatch tensor)
    return _op(like, h, w, width, float(temperature), dtype)


def _as_float32(v: float) -> float:
    """v rounded to float32 as the kernels' static_cast<float> does (inf where it overflows)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.inf


@torch.library.register_fake("vitops::posemb_sincos_2d")
def _fake(like, h, w, width, temperature=10000.0, dtype=None):
    """csrc/ops/posemb_sincos_2d/posemb_sincos_2d.h check_inputs, in the same order."""
    op = "posemb_sincos_2d"
    if is_concrete(h):
        fail_unless(h >= 0, lambda: f"vitops.{op}: `h` must be a non-negative int, got {h}")
    if is_concrete(w):
        fail_unless(w >= 0, lambda: f"vitops.{op}: `w` must be a non-negative int, got {w}")
    if is_concrete(width):
        fail_unless(width >= 0 and width % 4 == 0, lambda: (
            f"vitops.{op}: `width` must be a non-negative multiple of 4 (sin and cos of x and y per frequency), "
            f"got {width}"))
    t32 = _as_float32(temperature) if math.isfinite(temperature) else temperature
    fail_unless(math.isfinite(temperature) and math.isfinite(t32) and t32 > 0, lambda: (
        f"vitops.{op}: `temperature` must be a positive number finite in float32, got {temperature}"))
    out_dtype = like.dtype if dtype is None else dtype
    allow_double = like.device.type != "cuda"
    fail_unless(out_dtype in _FLOATS and (allow_double or out_dtype != torch.float64), lambda: (
        f"vitops.{op}: `dtype` must be float32, bfloat16, float16{' or float64' if allow_double else ' (float64 is CPU only)'}"
        f" (None: the dtype of `like`), got {dtype_name(out_dtype)}"))
    rows = checked_mul(op, "the table rows h * w", h, w)
    check_shape_fits(op, "the output", (1, rows, width))
    return like.new_empty((1, rows, width), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)  # a constant table, even when `like` requires grad


def _backward(ctx, grad_output):
    # the table does not depend on `like` (only its device is read): no gradient flows to it
    return None, None, None, None, None, None


torch.library.register_autograd("vitops::posemb_sincos_2d", _backward, setup_context=_setup_context)

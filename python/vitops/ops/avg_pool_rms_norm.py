"""vitops.avg_pool_rms_norm: Gemma 3's vision exit before its projection GEMM: square average
pooling of a row-major token grid, then the Gemma RMSNorm, in one pass."""

from __future__ import annotations

import math

import torch

from ._checks import (
    allows_double,
    check_float,
    check_float_table,
    check_same_device,
    check_shape_fits,
    dtype_name,
    fail_unless,
    is_concrete,
    shape_str,
)

_op = torch.ops.vitops.avg_pool_rms_norm.default
_backward_op = torch.ops.vitops._avg_pool_rms_norm_backward.default
_WEIGHTED = ("scale", "scale_plus_one")
_KINDS = ("scale", "scale_plus_one", "rms", "none")


def avg_pool_rms_norm(x: torch.Tensor, length: int, weight: torch.Tensor | None, *, eps: float = 1e-6,
                      norm: str = "scale_plus_one") -> torch.Tensor:
    """HF ``Gemma3MultiModalProjector``'s AvgPool2d + ``mm_soft_emb_norm`` (MaxText VisionExit +
    the VisionEmbedder's norm).

    Args:
      x: [B, L, D], L = side² tokens of a row-major square grid.
      length: output tokens, out_side² with out_side dividing side (256 for Gemma 3).
      weight: [D] norm weight (any float dtype), None for ``norm="rms"`` / ``"none"``.
      eps: the norm's epsilon; norm: ``"scale_plus_one"`` x·r·(1 + w) (Gemma 3), ``"scale"``, ``"rms"``,
        ``"none"`` (the pooling alone).

    Returns [B, length, D] in x's dtype: each k x k window averaged (summed row-major in float32,
    divided by k², rounded to x's dtype, as AvgPool2d), then normalised in float32 and rounded once.
    """
    return _op(x, length, weight, float(eps), norm)


def _check(op, x, length, weight, eps, norm):
    """csrc/ops/avg_pool_rms_norm/avg_pool_rms_norm.h check_inputs, in the same order."""
    fail_unless(x.dim() == 3, lambda: f"vitops.{op}: `x` must have shape [B, L, D], got {shape_str(x)}")
    check_float(op, "x", x)
    seq_len = x.shape[1]
    if is_concrete(seq_len, length):
        side = math.isqrt(seq_len)
        fail_unless(side * side == seq_len, lambda: (
            f"vitops.{op}: the sequence length of `x` must be a square grid (side²), got {seq_len}"))
        fail_unless(length >= 1, lambda: f"vitops.{op}: `length` must be a positive int, got {length}")
        out_side = math.isqrt(length)
        fail_unless(out_side * out_side == length and side % out_side == 0, lambda: (
            f"vitops.{op}: `length` ({length}) must be a square whose side divides the grid side {side}"))
    check_shape_fits(op, "the output", (x.shape[0], length, x.shape[2]))
    fail_unless(norm in _KINDS, lambda: (
        f'vitops.{op}: `norm` must be "scale" (x * w), "scale_plus_one" (x * (1 + w)), "rms" (no weight) or '
        f'"none", got "{norm}"'))
    weighted = norm in _WEIGHTED
    fail_unless((weight is not None) == weighted, lambda: (
        f'vitops.{op}: `weight` must be {"given" if weighted else "None"} with norm="{norm}"'))
    if weight is not None:
        fail_unless(weight.dim() == 1 and weight.shape[0] == x.shape[2], lambda: (
            f"vitops.{op}: `weight` must have shape [D] = [{x.shape[2]}], got {shape_str(weight)}"))
        check_float_table(op, "weight", weight, allows_double(x))
        check_same_device(op, "x", x, "weight", weight)
    fail_unless(math.isfinite(eps) and eps >= 0, lambda: f"vitops.{op}: `eps` must be a finite number >= 0, got {eps}")


@torch.library.register_fake("vitops::avg_pool_rms_norm")
def _fake(x, length, weight, eps, norm="scale_plus_one"):
    _check("avg_pool_rms_norm", x, length, weight, eps, norm)
    return x.new_empty((x.shape[0], length, x.shape[2]))


@torch.library.register_fake("vitops::_avg_pool_rms_norm_backward")
def _backward_fake(grad_output, x, length, weight, eps, norm="scale_plus_one"):
    op = "_avg_pool_rms_norm_backward"
    _check(op, x, length, weight, eps, norm)
    b, _, d = x.shape
    fail_unless(grad_output.dim() == 3 and grad_output.shape[0] == b and grad_output.shape[1] == length
                and grad_output.shape[2] == d, lambda: (
        f"vitops.{op}: `grad_output` must have shape [{b}, {length}, {d}], got {shape_str(grad_output)}"))
    fail_unless(grad_output.dtype == x.dtype, lambda: (
        f"vitops.{op}: `grad_output` must have the dtype of `x` ({dtype_name(x.dtype)}), got "
        f"{dtype_name(grad_output.dtype)}"))
    check_same_device(op, "x", x, "grad_output", grad_output)
    return x.new_empty(x.shape), (x.new_empty((0,)) if weight is None else weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    x, length, weight, eps, norm = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (length, eps, norm)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    length, eps, norm = ctx.args
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None, None, None
    grad_x, grad_w = _backward_op(grad, x, length, weight, eps, norm)
    return (grad_x if ctx.needs_input_grad[0] else None, None,
            grad_w if weight is not None and ctx.needs_input_grad[2] else None, None, None)


torch.library.register_autograd("vitops::avg_pool_rms_norm", _backward, setup_context=_setup_context)

"""vitops.avg_pool_by_positions: per-image k x k average pooling by patch position (Gemma 4 exit)."""

from __future__ import annotations

import math

import torch

from ._checks import (
    check_float,
    check_index,
    check_nonnegative,
    check_same_device,
    check_shape_fits,
    fail_unless,
    is_concrete,
    shape_str,
    static_equals,
)

_op = torch.ops.vitops.avg_pool_by_positions.default
_backward_op = torch.ops.vitops._avg_pool_by_positions_backward.default


def avg_pool_by_positions(
    x: torch.Tensor, *, positions_xy: torch.Tensor, length: int, precision=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Performs 2-D spatial pooling according to patch positions (MaxText ``avg_pool_by_positions``).

    Args:
      x: [B, L, D] features.
      positions_xy: [B, L, 2] int64/int32 (x, y) patch coordinates; (-1, -1) marks padding.
      length: output slots per image; L must equal k*k*length for an integer k (the pooling kernel).
      precision: accepted for MaxText compatibility; accumulation is always float32.

    Returns:
      output: [B, length, D] in x's dtype; slot s of image b is the sum of the patches with
        (x//k) + (W_b//k) * (y//k) == s divided by k*k, where W_b is image b's grid width
        (max x + 1); padding is ignored.
      mask: [B, length] bool, True where the slot received at least one patch.
    Deterministic (no atomics) and free of host synchronisation on CUDA.
    """
    return _op(x, positions_xy, length)


def check_kernel_size(op, seq_len, length):
    """k with k * k * length == seq_len (csrc/ops/avg_pool_by_positions/avg_pool_by_positions.h)."""
    fail_unless(length >= 1, lambda: f"vitops.{op}: `length` must be a positive int, got {length}")
    if not is_concrete(seq_len, length):
        return None  # a perfect-square test would specialise the symbols: the real kernel checks it
    k = 0
    if seq_len >= 1 and seq_len % length == 0:
        k = math.isqrt(seq_len // length)
        k = k if k * k == seq_len // length else 0
    fail_unless(k >= 1, lambda: (
        f"vitops.{op}: `length` ({length}) must be L/k\u00b2 for an integer k >= 1, where L = {seq_len} is the "
        "sequence length"))
    return k


def check_positions(op, positions, batch, seq_len):
    check_index(op, "positions_xy", positions)
    fail_unless(positions.dim() == 3 and positions.shape[0] == batch and positions.shape[1] == seq_len
                and static_equals(positions.shape[2], 2), lambda: (
        f"vitops.{op}: `positions_xy` must have shape [B, L, 2] = [{batch}, {seq_len}, 2], got {shape_str(positions)}"))


def check_forward(op, x, positions_xy, length):
    """Both pooling ops' forward checks, in the C++ order."""
    fail_unless(x.dim() == 3, lambda: f"vitops.{op}: `x` must have shape [B, L, D], got {shape_str(x)}")
    check_float(op, "x", x)
    check_same_device(op, "x", x, "positions_xy", positions_xy)
    check_positions(op, positions_xy, x.shape[0], x.shape[1])
    check_kernel_size(op, x.shape[1], length)
    check_shape_fits(op, "the output", (x.shape[0], length, x.shape[2]))


def check_backward(op, grad_output, positions_xy, length, seq_len):
    """Both pooling ops' backward checks, in the C++ order."""
    check_nonnegative(op, "seq_len", seq_len)
    fail_unless(grad_output.dim() == 3 and grad_output.shape[1] == length, lambda: (
        f"vitops.{op}: `grad_output` must have shape [B, length, D] with length = {length}, got "
        f"{shape_str(grad_output)}"))
    check_float(op, "grad_output", grad_output)
    check_same_device(op, "grad_output", grad_output, "positions_xy", positions_xy)
    check_positions(op, positions_xy, grad_output.shape[0], seq_len)
    check_kernel_size(op, seq_len, length)
    check_shape_fits(op, "the gradient of x", (grad_output.shape[0], seq_len, grad_output.shape[2]))


@torch.library.register_fake("vitops::avg_pool_by_positions")
def _fake(x, positions_xy, length):
    check_forward("avg_pool_by_positions", x, positions_xy, length)
    b, _, d = x.shape
    return x.new_empty((b, length, d)), x.new_empty((b, length), dtype=torch.bool)


@torch.library.register_fake("vitops::_avg_pool_by_positions_backward")
def _backward_fake(grad_output, positions_xy, length, seq_len):
    check_backward("_avg_pool_by_positions_backward", grad_output, positions_xy, length, seq_len)
    b, _, d = grad_output.shape
    return grad_output.new_empty((b, seq_len, d))


def _setup_context(ctx, inputs, output):
    x, positions_xy, length = inputs
    ctx.save_for_backward(positions_xy)
    ctx.length = length
    ctx.seq_len = x.shape[1]


def _backward(ctx, grad_output, grad_mask):
    (positions_xy,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_output, positions_xy, ctx.length, ctx.seq_len)
    return grad, None, None


torch.library.register_autograd("vitops::avg_pool_by_positions", _backward, setup_context=_setup_context)

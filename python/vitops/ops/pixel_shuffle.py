"""vitops.pixel_shuffle: Llama 4's vision-adapter pixel shuffle, [..., L, C] -> [..., L r², C / r²]."""

from __future__ import annotations

import math

import torch

from ._checks import (
    check_float,
    check_shape_fits,
    checked_mul,
    checked_product,
    fail_unless,
    is_concrete,
    is_finite_number,
    shape_str,
)

_op = torch.ops.vitops.pixel_shuffle.default
_backward_op = torch.ops.vitops._pixel_shuffle_backward.default


def pixel_shuffle(input_tensor: torch.Tensor, shuffle_ratio: float) -> torch.Tensor:
    """HF / MaxText / Meta Llama 4 ``pixel_shuffle`` (MaxText ``maxtext.models.llama4.pixel_shuffle``).

    Args:
      input_tensor: [..., L, C] tokens of a square grid (L = side * side), any strides.
      shuffle_ratio: 1/n for a whole n (0.5 in the released models; 0.25, 1/3, ... too), with the grid
        side a multiple of n.

    Returns:
      [..., L / n², n² C]: every n x n block of tokens becomes one token, channels in (dh, dw, c) order,
      tokens row-major over the (side / n)² grid. Not torch's ``pixel_unshuffle`` (channel order
      (c, dh, dw)). A non-square L or a ratio that does not divide the side raises a clear error.
    """
    return _op(input_tensor, float(shuffle_ratio))


def _block_of(op, shuffle_ratio):
    """csrc/ops/pixel_shuffle/pixel_shuffle.h block_of: shuffle_ratio = 1/n, returns n."""
    ok = is_finite_number(shuffle_ratio) and 0.0 < shuffle_ratio <= 1.0
    inverse = 1.0 / shuffle_ratio if ok else 0.0
    n = int(round(inverse)) if ok and inverse < 3037000499.0 else 0
    fail_unless(n >= 1 and abs(n * shuffle_ratio - 1.0) <= 1e-12, lambda: (
        f"vitops.{op}: `shuffle_ratio` must be 1/n for a whole n >= 1 (0.5, 0.25, ...), got {shuffle_ratio}"))
    return n


@torch.library.register_fake("vitops::pixel_shuffle")
def _fake(input_tensor, shuffle_ratio):
    op = "pixel_shuffle"
    fail_unless(input_tensor.dim() >= 2, lambda: (
        f"vitops.{op}: `input_tensor` must have shape [..., L, C] (at least 2 dims), got {shape_str(input_tensor)}"))
    check_float(op, "input_tensor", input_tensor)
    n = _block_of(op, shuffle_ratio)
    *lead, length, channels = input_tensor.shape
    if is_concrete(length):  # a symbolic L (dynamic shapes): the real kernel checks the grid at run time
        side = math.isqrt(length)
        fail_unless(side * side == length, lambda: (
            f"vitops.{op}: `input_tensor` has L = {length} tokens, which is not a square grid (L must be side * side); "
            f"shape {shape_str(input_tensor)}"))
        fail_unless(side % n == 0, lambda: (
            f"vitops.{op}: `shuffle_ratio` 1/{n} needs the grid side to be a multiple of {n}, got side {side} "
            f"(L = {length})"))
    checked_product(op, "the batch size (product of the leading dims)", lead)
    out_channels = checked_mul(op, "the output channels C / shuffle_ratio**2", n * n, channels)
    out = (*lead, length // (n * n), out_channels)
    check_shape_fits(op, "the output", out)
    return input_tensor.new_empty(out)


@torch.library.register_fake("vitops::_pixel_shuffle_backward")
def _backward_fake(grad_output, shuffle_ratio):
    op = "_pixel_shuffle_backward"
    fail_unless(grad_output.dim() >= 2, lambda: (
        f"vitops.{op}: `grad_output` must have shape [..., L, C] (at least 2 dims), got {shape_str(grad_output)}"))
    check_float(op, "grad_output", grad_output)
    n = _block_of(op, shuffle_ratio)
    *lead, length, channels = grad_output.shape
    if is_concrete(length, channels):
        side = math.isqrt(length)
        fail_unless(side * side == length and channels % (n * n) == 0, lambda: (
            f"vitops.{op}: `grad_output` shape {shape_str(grad_output)} is not a pixel_shuffle output for "
            f"shuffle_ratio 1/{n} (expected [..., side², C * {n * n}])"))
    checked_product(op, "the batch size (product of the leading dims)", lead)
    sizes = (*lead, length * n * n, channels // (n * n))
    check_shape_fits(op, "the gradient of input_tensor", sizes)
    return grad_output.new_empty(sizes)


def _setup_context(ctx, inputs, output):  # both ops take (tensor, shuffle_ratio)
    ctx.shuffle_ratio = inputs[1]


def _backward(ctx, grad_output):
    if grad_output is None:
        return None, None
    return _backward_op(grad_output, ctx.shuffle_ratio), None


torch.library.register_autograd("vitops::pixel_shuffle", _backward, setup_context=_setup_context)


def _double_backward(ctx, grad_grad_input):
    # the backward is the inverse permutation: its gradient is the forward permutation
    return _op(grad_grad_input, ctx.shuffle_ratio), None


torch.library.register_autograd("vitops::_pixel_shuffle_backward", _double_backward,
                                setup_context=_setup_context)

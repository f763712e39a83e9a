"""vitops.avg_pool_by_positions: per-image k x k average pooling by patch position (Gemma 4 exit)."""

from __future__ import annotations

import torch

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


@torch.library.register_fake("vitops::avg_pool_by_positions")
def _fake(x, positions_xy, length):
    torch._check(x.dim() == 3, lambda: f"vitops.avg_pool_by_positions: `x` must be [B, L, D], got {x.shape}")
    b, _, d = x.shape
    return x.new_empty((b, length, d)), x.new_empty((b, length), dtype=torch.bool)


@torch.library.register_fake("vitops::_avg_pool_by_positions_backward")
def _backward_fake(grad_output, positions_xy, length, seq_len):
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

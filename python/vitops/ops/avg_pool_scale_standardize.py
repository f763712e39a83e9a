"""vitops.avg_pool_scale_standardize: the Gemma 4 vision exit (pool, sqrt(D) scale, standardize) in one op."""

from __future__ import annotations

import torch

from ._checks import allows_double, check_float_table, check_same_device, fail_unless, shape_str
from .avg_pool_by_positions import check_backward as _check_pool_backward
from .avg_pool_by_positions import check_forward as _check_pool_forward

_op = torch.ops.vitops.avg_pool_scale_standardize.default
_backward_op = torch.ops.vitops._avg_pool_scale_standardize_backward.default


def avg_pool_scale_standardize(
    x: torch.Tensor,
    positions_xy: torch.Tensor,
    length: int,
    scale: float,
    std_bias: torch.Tensor | None = None,
    std_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``Gemma4VisionPooler`` + the standardize lines of ``Gemma4VisionModel.forward`` (k >= 1).

    Args:
      x: [B, L, D] encoder output.
      positions_xy: [B, L, 2] int64/int32 (x, y) patch coordinates; (-1, -1) marks padding.
      length: output slots per image; L must be k*k*length for an integer k.
      scale: multiplier of the pooled features, sqrt(D) for Gemma 4.
      std_bias, std_scale: optional [D] standardize buffers (both or neither).

    Returns:
      output: [B, length, D] in x's dtype: pooled = sum of the slot's patches / k^2 (float32, as
        ``avg_pool_by_positions``) rounded to x's dtype, then ``y = pooled * scale`` and, when
        standardizing, ``(y - std_bias) * std_scale``, all in float32, rounded once.
      mask: [B, length] bool, True where the slot received at least one patch.
    Deterministic, a single kernel launch on CUDA, no host synchronisation.
    """
    return _op(x, positions_xy, length, float(scale), std_bias, std_scale)


def _check_std_buffer(op, arg, t, like_name, like, dim):
    fail_unless(t.dim() == 1 and t.shape[0] == dim, lambda: (
        f"vitops.{op}: `{arg}` must have shape [D] = [{dim}], got {shape_str(t)}"))
    check_float_table(op, arg, t, allows_double(like))
    check_same_device(op, like_name, like, arg, t)


# The pooling op's checks, then the standardize buffers (csrc/ops/avg_pool_scale_standardize/*.h).
@torch.library.register_fake("vitops::avg_pool_scale_standardize")
def _fake(x, positions_xy, length, scale, std_bias=None, std_scale=None):
    op = "avg_pool_scale_standardize"
    _check_pool_forward(op, x, positions_xy, length)
    fail_unless((std_bias is None) == (std_scale is None), lambda: (
        f"vitops.{op}: `std_bias` and `std_scale` must be given together (both or neither)"))
    b, _, d = x.shape
    if std_bias is not None:
        _check_std_buffer(op, "std_bias", std_bias, "x", x, d)
        _check_std_buffer(op, "std_scale", std_scale, "x", x, d)
    return x.new_empty((b, length, d)), x.new_empty((b, length), dtype=torch.bool)


@torch.library.register_fake("vitops::_avg_pool_scale_standardize_backward")
def _backward_fake(grad_output, positions_xy, length, seq_len, scale, std_scale):
    op = "_avg_pool_scale_standardize_backward"
    _check_pool_backward(op, grad_output, positions_xy, length, seq_len)
    b, _, d = grad_output.shape
    if std_scale is not None:
        _check_std_buffer(op, "std_scale", std_scale, "grad_output", grad_output, d)
    return grad_output.new_empty((b, seq_len, d))


def _setup_context(ctx, inputs, output):
    x, positions_xy, length, scale, std_bias, std_scale = inputs
    ctx.save_for_backward(positions_xy, std_scale)
    ctx.length = length
    ctx.seq_len = x.shape[1]
    ctx.scale = scale


def _backward(ctx, grad_output, grad_mask):
    positions_xy, std_scale = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_output, positions_xy, ctx.length, ctx.seq_len, ctx.scale, std_scale)
    # positions, length, scale and the standardize buffers get no gradient
    return grad, None, None, None, None, None


torch.library.register_autograd("vitops::avg_pool_scale_standardize", _backward, setup_context=_setup_context)

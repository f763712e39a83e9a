"""vitops.apply_multidimensional_rope: per-axis half-split RoPE (Gemma 4 vision 2-D RoPE)."""

from __future__ import annotations

import torch

_op = torch.ops.vitops.apply_multidimensional_rope.default
_backward_op = torch.ops.vitops._apply_multidimensional_rope_backward.default


def apply_multidimensional_rope(
    inputs: torch.Tensor,
    positions: torch.Tensor,
    *,
    base_frequency: float,
    rotary_fraction: float | None = None,
    scale_factor: float = 1.0,
) -> torch.Tensor:
    """Applies multidimensional RoPE (MaxText ``apply_multidimensional_rope``).

    Args:
      inputs: [..., L, H, hd]; may be a strided view (e.g. Q/K slices of a fused QKV projection)
        as long as the head dim is contiguous.
      positions: [..., L] (1-D RoPE over the first ``rotary_fraction * hd`` channels) or
        [..., L, ndim] (N-D: channels split into one chunk per axis, chunk ``a`` rotated by
        ``positions[..., a]``; with ``rotary_fraction=None`` the last chunk takes the remainder).
      base_frequency: RoPE base (theta); Gemma 4 vision uses 100.
      rotary_fraction: fraction of the head dim to rotate; None rotates everything.
      scale_factor: multiplies the rotation angles. (MaxText accepts but ignores it: results
        agree with MaxText for the default 1.0.)

    Returns:
      A contiguous tensor shaped like ``inputs`` with the rotation applied in float32 using cos/sin
      rounded to the input dtype (HF's dtype flow).
    """
    fraction = None if rotary_fraction is None else float(rotary_fraction)
    return _op(inputs, positions, float(base_frequency), fraction, float(scale_factor))


@torch.library.register_fake("vitops::apply_multidimensional_rope")
def _fake(inputs, positions, base_frequency, rotary_fraction=None, scale_factor=1.0):
    torch._check(inputs.dim() >= 3, lambda: "vitops.apply_multidimensional_rope: `inputs` must be [..., L, H, hd]")
    return inputs.new_empty(inputs.shape)


@torch.library.register_fake("vitops::_apply_multidimensional_rope_backward")
def _backward_fake(grad_output, positions, base_frequency, rotary_fraction, scale_factor):
    return grad_output.new_empty(grad_output.shape)


def _setup_context(ctx, inputs, output):
    _, positions, base_frequency, rotary_fraction, scale_factor = inputs
    ctx.save_for_backward(positions)
    ctx.args = (base_frequency, rotary_fraction, scale_factor)


def _backward(ctx, grad_output):
    (positions,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_output, positions, *ctx.args)
    return grad, None, None, None, None


torch.library.register_autograd("vitops::apply_multidimensional_rope", _backward, setup_context=_setup_context)


# The backward is the transposed rotation, a linear map of grad_output whose own transpose is the
# forward rotation: registering it makes double backward (gradgradcheck, Hessian-vector) work.
def _backward_setup_context(ctx, inputs, output):
    _, positions, base_frequency, rotary_fraction, scale_factor = inputs
    ctx.save_for_backward(positions)
    ctx.args = (base_frequency, rotary_fraction, scale_factor)


def _backward_backward(ctx, grad_grad_input):
    (positions,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _op(grad_grad_input, positions, *ctx.args)
    return grad, None, None, None, None


torch.library.register_autograd(
    "vitops::_apply_multidimensional_rope_backward", _backward_backward, setup_context=_backward_setup_context
)

"""vitops.apply_multidimensional_rope: per-axis half-split RoPE (Gemma 4 vision 2-D RoPE)."""

from __future__ import annotations

import torch

from ._checks import (
    check_float,
    check_same_device,
    check_shape_fits,
    dtype_name,
    fail_unless,
    is_concrete,
    is_finite_number,
    shape_str,
)

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


_POSITION_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


def _check_and_plan(op, what, inputs, positions, base_frequency, rotary_fraction, scale_factor):
    """csrc/ops/apply_multidimensional_rope/apply_multidimensional_rope.h check_and_plan, same order."""
    fail_unless(inputs.dim() >= 3, lambda: (
        f"vitops.{op}: `{what}` must have shape [..., L, H, hd] (at least 3 dims), got {shape_str(inputs)}"))
    check_float(op, what, inputs)
    fail_unless(positions.dtype in _POSITION_DTYPES, lambda: (
        f"vitops.{op}: `positions` must be int32, int64, float32 or float64, got {dtype_name(positions.dtype)}"))
    check_same_device(op, what, inputs, "positions", positions)
    fail_unless(is_finite_number(base_frequency) and base_frequency > 0, lambda: (
        f"vitops.{op}: `base_frequency` must be a positive finite number, got {base_frequency}"))
    fail_unless(is_finite_number(scale_factor), lambda: (
        f"vitops.{op}: `scale_factor` must be a finite number, got {scale_factor}"))
    if rotary_fraction is not None:
        fail_unless(0.0 <= rotary_fraction <= 1.0, lambda: (
            f"vitops.{op}: `rotary_fraction` must be in [0, 1] or None, got {rotary_fraction}"))
    check_shape_fits(op, "the output", inputs.shape)  # contiguous, shaped like the input
    d = inputs.dim()
    hd = inputs.shape[-1]
    one_d = positions.dim() + 2 == d
    fail_unless(one_d or positions.dim() + 1 == d, lambda: (
        f"vitops.{op}: `positions` must have shape [..., L] (1-D) or [..., L, ndim] (N-D) for `{what}` of shape "
        f"{shape_str(inputs)} [..., L, H, hd], got {shape_str(positions)}"))
    leading_match = all(positions.shape[i] == inputs.shape[i] for i in range(d - 2))
    fail_unless(leading_match, lambda: (
        f"vitops.{op}: the leading dims of `positions` {shape_str(positions)} must equal the [..., L] dims of "
        f"`{what}` {shape_str(inputs)}"))
    if not is_concrete(hd):
        return  # channel splits of a symbolic head dim: checked by the real kernel
    if one_d:
        rotated = hd if rotary_fraction is None else int(rotary_fraction * float(hd))
        fail_unless(rotated % 2 == 0, lambda: (
            f"vitops.{op}: the rotated width {rotated} (head dim {hd}, rotary_fraction {rotary_fraction}) "
            "must be even"))
        return
    ndim = positions.shape[-1]
    fail_unless(ndim >= 1, lambda: (
        f"vitops.{op}: N-D `positions` {shape_str(positions)} must have at least one position axis in its last dim"))
    if not is_concrete(ndim):
        return
    budget = hd if rotary_fraction is None else int(round(hd * rotary_fraction))
    per_axis = 2 * (budget // 2 // ndim)
    fail_unless(per_axis > 0, lambda: (
        f"vitops.{op}: head dim {hd} with rotary_fraction {rotary_fraction} leaves no channels to rotate for "
        f"{ndim} position axes (need at least 2 per axis)"))
    last = per_axis if rotary_fraction is not None else hd - per_axis * (ndim - 1)
    fail_unless(last % 2 == 0, lambda: (
        f"vitops.{op}: chunk width {last} for axis {ndim - 1} (head dim {hd}, {ndim} position axes) must be even"))
    if inputs.device.type == "cuda" and inputs.numel() > 0:
        # the CUDA kernel's cos/sin tables of one row must fit its 48 KiB of shared memory
        pairs = (per_axis * (ndim - 1) + last) // 2
        fail_unless(16 + 8 * pairs <= 48 * 1024, lambda: (
            f"vitops.{op}: {pairs} rotated pairs per head need more shared memory than the CUDA kernel may use"))


@torch.library.register_fake("vitops::apply_multidimensional_rope")
def _fake(inputs, positions, base_frequency, rotary_fraction=None, scale_factor=1.0):
    _check_and_plan("apply_multidimensional_rope", "inputs", inputs, positions, base_frequency, rotary_fraction,
                    scale_factor)
    return inputs.new_empty(inputs.shape)


@torch.library.register_fake("vitops::_apply_multidimensional_rope_backward")
def _backward_fake(grad_output, positions, base_frequency, rotary_fraction, scale_factor):
    _check_and_plan("_apply_multidimensional_rope_backward", "grad_output", grad_output, positions, base_frequency,
                    rotary_fraction, scale_factor)
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

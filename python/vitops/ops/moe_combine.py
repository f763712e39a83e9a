"""vitops.moe_combine: the inverse of moe_route's bucketing, added to the shared expert's output."""

from __future__ import annotations

import torch

from ._checks import check_float, check_same_device, dtype_name, fail_unless, shape_str
from .moe_route import check_index_arg

_op = torch.ops.vitops.moe_combine.default
_backward_op = torch.ops.vitops._moe_combine_backward.default


def moe_combine(shared: torch.Tensor, expert_out: torch.Tensor, token_slot: torch.Tensor,
                token_order: torch.Tensor) -> torch.Tensor:
    """``out[t] = shared[t] + expert_out[token_slot[t]]``, rounded once (HF adds the routed experts'
    sum to the shared expert's output; with one expert per token that sum is exact).

    Args:
      shared: [N, H] the shared expert's output (any float dtype; float64 on the CPU).
      expert_out: [N, H] the experts' outputs in moe_route's bucketed row order, shared's dtype.
      token_slot, token_order: [N] int64, moe_route's inverse permutations. The CPU kernel checks
        that they are (a clear error otherwise); the CUDA kernel cannot without a host
        synchronisation and writes NaN rows for indices out of [0, N).

    Differentiable in ``shared`` (the gradient itself) and ``expert_out`` (gathered by token_order).
    """
    return _op(shared, expert_out, token_slot, token_order)


def _check_combine(op, shared, expert_out, token_slot, token_order):
    """csrc/ops/moe_combine/moe_combine.h check_combine, in the same order."""
    fail_unless(shared.dim() == 2, lambda: (
        f"vitops.{op}: `shared` must have shape [N, H] (tokens, hidden), got {shape_str(shared)}"))
    fail_unless(expert_out.dim() == 2 and tuple(expert_out.shape) == tuple(shared.shape), lambda: (
        f"vitops.{op}: `expert_out` must have the shape of `shared` {shape_str(shared)} (the experts' outputs in "
        f"moe_route's bucketed row order), got {shape_str(expert_out)}"))
    check_float(op, "shared", shared)
    fail_unless(expert_out.dtype == shared.dtype, lambda: (
        f"vitops.{op}: `expert_out` must have the dtype of `shared` ({dtype_name(shared.dtype)}), got "
        f"{dtype_name(expert_out.dtype)}"))
    check_same_device(op, "shared", shared, "expert_out", expert_out)
    check_index_arg(op, "token_slot", token_slot, shared.shape[0], "shared", shared)
    check_index_arg(op, "token_order", token_order, shared.shape[0], "shared", shared)


@torch.library.register_fake("vitops::moe_combine")
def _fake(shared, expert_out, token_slot, token_order):
    _check_combine("moe_combine", shared, expert_out, token_slot, token_order)
    return shared.new_empty(shared.shape)


@torch.library.register_fake("vitops::_moe_combine_backward")
def _backward_fake(grad_output, token_order):
    op = "_moe_combine_backward"
    fail_unless(grad_output.dim() == 2, lambda: (
        f"vitops.{op}: `grad_output` must have shape [N, H], got {shape_str(grad_output)}"))
    check_float(op, "grad_output", grad_output)
    check_index_arg(op, "token_order", token_order, grad_output.shape[0], "grad_output", grad_output)
    return grad_output.new_empty(grad_output.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[3])


def _backward(ctx, grad_output):
    (token_order,) = ctx.saved_tensors
    grad_expert = _backward_op(grad_output, token_order) if ctx.needs_input_grad[1] else None
    return (grad_output if ctx.needs_input_grad[0] else None), grad_expert, None, None


torch.library.register_autograd("vitops::moe_combine", _backward, setup_context=_setup_context)

"""vitops.factorized_posemb: x-table row + y-table row per patch (Gemma 4 2-D position embedding)."""

from __future__ import annotations

import torch

from ._checks import (
    check_float,
    check_index,
    check_same_device,
    check_shape_fits,
    fail_unless,
    shape_str,
    static_equals,
)

_op = torch.ops.vitops.factorized_posemb.default
_backward_op = torch.ops.vitops._factorized_posemb_backward.default

_LAYOUTS = {"hf": 0, "maxtext": 1}


def _table_dim(posemb: torch.Tensor, layout: str | None) -> int:
    if posemb.dim() != 3:
        raise ValueError(
            f"vitops.factorized_posemb: `posemb` must be [2, N_pos, D] (HF) or [N_pos, 2, D] (MaxText), "
            f"got shape {tuple(posemb.shape)}"
        )
    if layout is not None:
        if layout not in _LAYOUTS:
            raise ValueError(f"vitops.factorized_posemb: `layout` must be 'hf' or 'maxtext', got {layout!r}")
        return _LAYOUTS[layout]
    hf, mt = posemb.shape[0] == 2, posemb.shape[1] == 2
    if hf and mt:
        raise ValueError(
            "vitops.factorized_posemb: `posemb` of shape [2, 2, D] is ambiguous; pass layout='hf' or 'maxtext'"
        )
    if not (hf or mt):
        raise ValueError(
            f"vitops.factorized_posemb: `posemb` must be [2, N_pos, D] (HF) or [N_pos, 2, D] (MaxText), "
            f"got shape {tuple(posemb.shape)}"
        )
    return 0 if hf else 1


def factorized_posemb(
    posemb: torch.Tensor, positions_xy: torch.Tensor, precision=None, *, layout: str | None = None
) -> torch.Tensor:
    """Computes the factorized position embedding from (x, y) coordinates (MaxText ``factorized_posemb``).

    Args:
      posemb: the table, HF layout [2, N_pos, D] or MaxText layout [N_pos, 2, D] (read in place,
        any strides). The layout is inferred from which dim has size 2, or given by ``layout``.
      positions_xy: [..., 2] int64/int32 (x, y) patch coordinates, any strides; -1 marks padding
        and contributes zero (per coordinate). Any other coordinate outside [0, N_pos) is invalid:
        on CPU it raises; on CUDA (where checking would need a device-to-host sync) the kernel never
        reads out of bounds and instead fills that patch's output row with NaN, as MaxText's one-hot
        formulation poisons out-of-range positions. The backward skips such coordinates on CUDA.
      precision: accepted for MaxText compatibility; accumulation is always float32 (float64 for
        float64 tables).

    Returns:
      [..., D] contiguous, in the table's dtype; x row + y row summed once in float32 and rounded.
      The gradient of the table is bitwise deterministic (no atomics).
    """
    return _op(posemb, positions_xy, _table_dim(posemb, layout))


def _check_table_dim(op, table_dim):
    fail_unless(table_dim in (0, 1), lambda: (
        f"vitops.{op}: `table_dim` must be 0 ([2, N_pos, D], HF) or 1 ([N_pos, 2, D], MaxText), got {table_dim}"))


def _check_positions(op, positions_xy):
    fail_unless(positions_xy.dim() >= 1 and static_equals(positions_xy.shape[-1], 2), lambda: (
        f"vitops.{op}: `positions_xy` must have shape [..., 2] ((x, y) per patch), got {shape_str(positions_xy)}"))
    check_index(op, "positions_xy", positions_xy)


# The checks of csrc/ops/factorized_posemb/factorized_posemb.h, in the same order.
@torch.library.register_fake("vitops::factorized_posemb")
def _fake(posemb, positions_xy, table_dim):
    op = "factorized_posemb"
    _check_table_dim(op, table_dim)
    fail_unless(posemb.dim() == 3, lambda: (
        "vitops.factorized_posemb: `posemb` must be [2, N_pos, D] (table_dim=0) or [N_pos, 2, D] (table_dim=1), "
        f"got {shape_str(posemb)}"))
    fail_unless(posemb.shape[table_dim] == 2, lambda: (
        f"vitops.factorized_posemb: `posemb` must have size 2 (x and y tables) on dim table_dim={table_dim}, "
        f"got shape {shape_str(posemb)}"))
    check_float(op, "posemb", posemb)
    _check_positions(op, positions_xy)
    check_same_device(op, "posemb", posemb, "positions_xy", positions_xy)
    check_shape_fits(op, "the output", (*positions_xy.shape[:-1], posemb.shape[2]))
    return posemb.new_empty((*positions_xy.shape[:-1], posemb.shape[2]))


@torch.library.register_fake("vitops::_factorized_posemb_backward")
def _backward_fake(grad_output, positions_xy, num_positions, table_dim):
    op = "_factorized_posemb_backward"
    _check_table_dim(op, table_dim)
    _check_positions(op, positions_xy)
    check_float(op, "grad_output", grad_output)
    check_same_device(op, "grad_output", grad_output, "positions_xy", positions_xy)
    fail_unless(num_positions >= 0, lambda: (
        f"vitops._factorized_posemb_backward: `num_positions` must be >= 0, got {num_positions}"))
    shape_ok = grad_output.dim() == positions_xy.dim() and all(
        a == b for a, b in zip(grad_output.shape[:-1], positions_xy.shape[:-1]))
    fail_unless(shape_ok, lambda: (
        "vitops._factorized_posemb_backward: `grad_output` must be [..., D] over the patches of `positions_xy` "
        f"{shape_str(positions_xy)}, got {shape_str(grad_output)}"))
    d = grad_output.shape[-1]
    check_shape_fits(op, "the gradient of posemb", (2, num_positions, d) if table_dim == 0 else (num_positions, 2, d))
    if grad_output.device.type == "cuda":  # the CUDA kernel's uint32 sort keys
        fail_unless(num_positions < 2**30, lambda: (
            f"vitops._factorized_posemb_backward: `num_positions` ({num_positions}) must be below 2^30 on CUDA"))
    d = grad_output.shape[-1]
    shape = (2, num_positions, d) if table_dim == 0 else (num_positions, 2, d)
    return grad_output.new_empty(shape)


def _setup_context(ctx, inputs, output):
    posemb, positions_xy, table_dim = inputs
    ctx.save_for_backward(positions_xy)
    ctx.table_dim = table_dim
    ctx.num_positions = posemb.shape[1 - table_dim]


def _backward(ctx, grad_output):
    (positions_xy,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _backward_op(grad_output, positions_xy, ctx.num_positions, ctx.table_dim)
    return grad, None, None


torch.library.register_autograd("vitops::factorized_posemb", _backward, setup_context=_setup_context)

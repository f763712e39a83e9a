"""vitops.merge_soft_tokens: the multimodal merge (soft tokens written into the text embeddings at the
placeholder rows) as an index scatter with no host synchronisation."""

from __future__ import annotations

import torch

from ._checks import check_float, check_index, check_same_device, check_shape_fits, fail_unless, is_concrete, shape_str
from ._checks import checked_mul, dtype_name

_op = torch.ops.vitops.merge_soft_tokens.default
_backward_op = torch.ops.vitops._merge_soft_tokens_backward.default

MAX_SOFT_TOKENS = 2**31 - 1  # the CUDA kernels' inverse map holds positions as int32


def merge_soft_tokens(inputs_embeds: torch.Tensor, soft_tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` with row ``indices[j]`` replaced by ``soft_tokens[j]``: HF's
    ``inputs_embeds.masked_scatter(placeholder_mask, features)`` and MAX's
    ``merge_multimodal_embeddings``, without a host synchronisation.

    Args:
      inputs_embeds: [T, H] (a ragged, flattened batch) or [B, S, H]; float32, bfloat16, float16
        (float64 on the CPU).
      soft_tokens: [N, H], the vision tower's output after the projector, in placeholder order. Cast
        to ``inputs_embeds``' device and dtype first (``.to``, as HF does; differentiable).
      indices: [N] int32 or int64 on ``inputs_embeds``' device: the row of each soft token among the
        flattened rows (``b * S + s`` for [B, S, H], HF's batch-major order), e.g. from
        ``vitops.serving.soft_token_indices``. Negative indices are skipped (MAX's ``INT32_MIN``
        marks rows already processed after a prefix-cache hit, or not in this chunk of a chunked
        prefill).

    Returns:
      A fresh tensor shaped like ``inputs_embeds``. Differentiable in ``inputs_embeds`` (the gradient
      with the overwritten rows zeroed) and ``soft_tokens`` (the gradient of the row each one wrote;
      zero for skipped ones).

    Index values: the CPU kernel raises for an index >= the row count and for two positions
    addressing one row (naming the positions). The CUDA kernel cannot raise without a host
    synchronisation: it skips indices >= the row count, and of several positions addressing one row
    the largest j wins (deterministically).
    """
    soft_tokens = soft_tokens.to(inputs_embeds.device, inputs_embeds.dtype)
    return _op(inputs_embeds, soft_tokens, indices)


def _check_rows(op, arg, t):
    """merge_soft_tokens.h rows_of: the flattened row count of [T, H] / [B, S, H]."""
    fail_unless(t.dim() in (2, 3), lambda: (
        f"vitops.{op}: `{arg}` must have shape [T, H] or [B, S, H] (tokens, hidden), got {shape_str(t)}"))
    return t.shape[0] if t.dim() == 2 else checked_mul(op, "the row count B * S", t.shape[0], t.shape[1])


def _check_indices(op, indices, like_name, like):
    """merge_soft_tokens.h check_indices."""
    fail_unless(indices.dim() == 1, lambda: (
        f"vitops.{op}: `indices` must have shape [N] (one row index per soft token), got {shape_str(indices)}"))
    check_index(op, "indices", indices)
    check_same_device(op, like_name, like, "indices", indices)
    if is_concrete(indices.shape[0]):
        fail_unless(indices.shape[0] <= MAX_SOFT_TOKENS,
                    lambda: f"vitops.{op}: at most 2^31 - 1 soft tokens, got N = {indices.shape[0]}")


def _check_merge(op, inputs_embeds, soft_tokens, indices):
    """merge_soft_tokens.h check_merge, in the same order."""
    _check_rows(op, "inputs_embeds", inputs_embeds)
    check_float(op, "inputs_embeds", inputs_embeds)
    hidden = inputs_embeds.shape[-1]
    fail_unless(soft_tokens.dim() == 2 and soft_tokens.shape[1] == hidden, lambda: (
        f"vitops.{op}: `soft_tokens` must have shape [N, H] = [N, {hidden}] (one row per soft token, the hidden size "
        f"of `inputs_embeds`), got {shape_str(soft_tokens)}"))
    fail_unless(soft_tokens.dtype == inputs_embeds.dtype, lambda: (
        f"vitops.{op}: `soft_tokens` must have the dtype of `inputs_embeds` ({dtype_name(inputs_embeds.dtype)}), got "
        f"{dtype_name(soft_tokens.dtype)} (the wrapper vitops.merge_soft_tokens casts it)"))
    check_same_device(op, "inputs_embeds", inputs_embeds, "soft_tokens", soft_tokens)
    _check_indices(op, indices, "inputs_embeds", inputs_embeds)
    fail_unless(indices.shape[0] == soft_tokens.shape[0], lambda: (
        f"vitops.{op}: `indices` must have one entry per row of `soft_tokens` ([{soft_tokens.shape[0]}]), got "
        f"{shape_str(indices)}"))
    check_shape_fits(op, "the output", inputs_embeds.shape)


@torch.library.register_fake("vitops::merge_soft_tokens")
def _fake(inputs_embeds, soft_tokens, indices):
    _check_merge("merge_soft_tokens", inputs_embeds, soft_tokens, indices)
    return inputs_embeds.new_empty(inputs_embeds.shape)


@torch.library.register_fake("vitops::_merge_soft_tokens_backward")
def _backward_fake(grad_output, indices):
    op = "_merge_soft_tokens_backward"
    _check_rows(op, "grad_output", grad_output)
    check_float(op, "grad_output", grad_output)
    _check_indices(op, indices, "grad_output", grad_output)
    check_shape_fits(op, "grad_inputs_embeds", grad_output.shape)
    check_shape_fits(op, "grad_soft_tokens", (indices.shape[0], grad_output.shape[-1]))
    return grad_output.new_empty(grad_output.shape), grad_output.new_empty((indices.shape[0], grad_output.shape[-1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None
    grad_embeds, grad_soft = _backward_op(grad_output, indices)
    return (grad_embeds if ctx.needs_input_grad[0] else None), (grad_soft if ctx.needs_input_grad[1] else None), None


torch.library.register_autograd("vitops::merge_soft_tokens", _backward, setup_context=_setup_context)


# The backward is linear in grad_output and the adjoint of the forward, so its own gradient is the
# forward op applied to the incoming gradients: double backward works, with the same row rule.
def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.grad_output_shape = inputs[0].shape


def _backward_backward(ctx, grad_grad_embeds, grad_grad_soft):
    (indices,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    like = grad_grad_embeds if grad_grad_embeds is not None else grad_grad_soft
    if grad_grad_embeds is None:
        grad_grad_embeds = like.new_zeros(ctx.grad_output_shape)
    if grad_grad_soft is None:
        grad_grad_soft = like.new_zeros((indices.shape[0], like.shape[-1]))
    return _op(grad_grad_embeds, grad_grad_soft, indices), None


torch.library.register_autograd("vitops::_merge_soft_tokens_backward", _backward_backward,
                                setup_context=_setup_backward_context)

"""vitops.moe_route: Llama 4's top-1 MoE routing in one op: expert choice, sigmoid score, the
expert-input scaling and the bucketing of tokens by expert (no host synchronisation)."""

from __future__ import annotations

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

_op = torch.ops.vitops.moe_route.default
_backward_op = torch.ops.vitops._moe_route_backward.default

_MAX_TOKENS = 2**31 - 1  # expert_ends is int32 (grouped_mm's offs)


def moe_route(x: torch.Tensor, router_logits: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF ``Llama4TextMoe``'s router and input scaling, with the tokens bucketed by expert.

    Args:
      x: [N, H] token rows (any float dtype; float64 on the CPU).
      router_logits: [N, E] the router's logits (any float dtype).

    Returns:
      routed: [N, H] in x's dtype, rows grouped by expert (experts ascending, tokens in order within
        an expert): row j is ``x[t] * scores[t]`` (rounded once) for ``t = token_order[j]``, the input
        of the token's expert (HF scales the expert *input*).
      scores: [N] in x's dtype, the float32 sigmoid of each token's top logit, rounded (HF's
        ``router_scores``; float64 logits use float64).
      token_order: [N] int64, the token of each bucketed row.
      token_slot: [N] int64, each token's bucketed row (the inverse permutation).
      expert_ends: [E] int32, cumulative bucket ends: ``torch.nn.functional.grouped_mm``'s ``offs``.

    The top expert is the first maximal logit (``torch.argmax``; a NaN logit counts as the maximum);
    HF's ``topk`` leaves the order of tied logits unspecified. The bucketing is a stable counting sort
    (integer counts over fixed token chunks on CUDA): the same order on every run, no atomics, no host
    synchronisation. Differentiable in ``x`` and ``router_logits`` (the selected logit only, as HF's
    scatter of the top value); ``scores`` passes its gradient to the selected logit too.
    """
    return _op(x, router_logits)


def _check_route(op, x, router_logits):
    """csrc/ops/moe_route/moe_route.h check_route, in the same order."""
    fail_unless(x.dim() == 2, lambda: f"vitops.{op}: `x` must have shape [N, H] (tokens, hidden), got {shape_str(x)}")
    fail_unless(router_logits.dim() == 2 and router_logits.shape[0] == x.shape[0], lambda: (
        f"vitops.{op}: `router_logits` must have shape [N, E] = [{x.shape[0]}, E] (one logit per token and expert), "
        f"got {shape_str(router_logits)}"))
    check_float(op, "x", x)
    check_float_table(op, "router_logits", router_logits, allows_double(x))
    check_same_device(op, "x", x, "router_logits", router_logits)
    experts = router_logits.shape[1]
    if is_concrete(experts):
        fail_unless(experts >= 1, lambda: (
            f"vitops.{op}: `router_logits` must have at least one expert (E >= 1), got {shape_str(router_logits)}"))
    if is_concrete(x.shape[0]):
        fail_unless(x.shape[0] <= _MAX_TOKENS, lambda: (
            f"vitops.{op}: at most 2^31 - 1 tokens (expert_ends is int32, grouped_mm's offs), got N = {x.shape[0]}"))
    check_shape_fits(op, "the routed rows", (x.shape[0], x.shape[1]))
    check_shape_fits(op, "the router-logit gradient", (x.shape[0], experts))


def check_index_arg(op, arg, t, tokens, like_name, like):
    """moe_route.h check_permutation_arg: [N] int64 on the first tensor's device."""
    fail_unless(t.dim() == 1 and t.shape[0] == tokens, lambda: (
        f"vitops.{op}: `{arg}` must have shape [N] = [{tokens}] (one row index per token, from moe_route), got "
        f"{shape_str(t)}"))
    fail_unless(t.dtype == torch.int64, lambda: f"vitops.{op}: `{arg}` must be an int64 tensor, got {dtype_name(t.dtype)}")
    check_same_device(op, like_name, like, arg, t)


@torch.library.register_fake("vitops::moe_route")
def _fake(x, router_logits):
    _check_route("moe_route", x, router_logits)
    n, h = x.shape
    return (x.new_empty((n, h)), x.new_empty((n,)), x.new_empty((n,), dtype=torch.int64),
            x.new_empty((n,), dtype=torch.int64), x.new_empty((router_logits.shape[1],), dtype=torch.int32))


@torch.library.register_fake("vitops::_moe_route_backward")
def _backward_fake(grad_routed, grad_scores, x, router_logits, token_slot):
    op = "_moe_route_backward"
    _check_route(op, x, router_logits)
    n, h = x.shape
    fail_unless(grad_routed.dim() == 2 and grad_routed.shape[0] == n and grad_routed.shape[1] == h, lambda: (
        f"vitops.{op}: `grad_routed` must have shape [N, H] = [{n}, {h}], got {shape_str(grad_routed)}"))
    fail_unless(grad_routed.dtype == x.dtype, lambda: (
        f"vitops.{op}: `grad_routed` must have the dtype of `x` ({dtype_name(x.dtype)}), got "
        f"{dtype_name(grad_routed.dtype)}"))
    check_same_device(op, "x", x, "grad_routed", grad_routed)
    if grad_scores is not None:
        fail_unless(grad_scores.dim() == 1 and grad_scores.shape[0] == n and grad_scores.dtype == x.dtype, lambda: (
            f"vitops.{op}: `grad_scores` must be None or have shape [N] = [{n}] and the dtype of `x` "
            f"({dtype_name(x.dtype)}), got {shape_str(grad_scores)} {dtype_name(grad_scores.dtype)}"))
        check_same_device(op, "x", x, "grad_scores", grad_scores)
    check_index_arg(op, "token_slot", token_slot, n, "x", x)
    return x.new_empty((n, h)), router_logits.new_empty(router_logits.shape)


def _setup_context(ctx, inputs, output):
    x, router_logits = inputs
    ctx.save_for_backward(x, router_logits, output[3])
    ctx.mark_non_differentiable(output[2], output[3], output[4])


def _backward(ctx, grad_routed, grad_scores, _order, _slot, _ends):
    x, router_logits, token_slot = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:2]):
        return None, None
    if grad_routed is None:  # only the scores reached the loss
        grad_routed = x.new_zeros(x.shape)
    grad_x, grad_logits = _backward_op(grad_routed, grad_scores, x, router_logits, token_slot)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_logits if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("vitops::moe_route", _backward, setup_context=_setup_context)

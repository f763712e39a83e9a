"""vitops.qkv_norm_rope: q/k/v RMSNorm + 2-D RoPE of q and k in one op (Gemma 4 vision attention)."""

from __future__ import annotations

import torch

_op = torch.ops.vitops.qkv_norm_rope.default
_backward_op = torch.ops.vitops._qkv_norm_rope_backward.default


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    *,
    eps: float = 1e-6,
    base_frequency: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF ``Gemma4VisionAttention``'s q_norm/k_norm/v_norm + ``apply_multidimensional_rope`` + transpose.

    Args:
      q: [B, L, H, hd]; k, v: [B, L, KV, hd]. Any strides with a contiguous head dim, e.g. views of
        one fused projection output [B, L, (H + 2*KV) * hd]; they are read in place.
      q_weight, k_weight: [hd] RMSNorm weights (any float dtype, applied in float32).
      positions: [B, L, ndim] (int32/int64/float) positions; Gemma 4 uses ndim = 2 (x, y).
      eps: RMSNorm epsilon.
      base_frequency: RoPE base (theta).

    Returns:
      (q_out [B, H, L, hd], k_out [B, KV, L, hd], v_out [B, KV, L, hd]) in q's dtype: the shapes
      ``scaled_dot_product_attention`` takes, over [B, L, heads, hd] memory (the op writes each
      (b, l) row contiguously; flash/SDPA kernels read that layout natively, and it equals HF's
      ``q.transpose(1, 2)`` views). Per head row the RMSNorm runs in float32 and
      is rounded to the input dtype (as HF), then q and k are rotated with cos/sin rounded to the
      input dtype, in float32, rounded once. v is only normalised (no weight).
    """
    rows = _op(q, k, v, q_weight, k_weight, positions, float(eps), float(base_frequency))
    return tuple(t.transpose(1, 2) for t in rows)


def _attention_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The op's contiguous [B, L, N, hd] output for an input [B, L, N, hd]."""
    return t.new_empty(t.shape, dtype=dtype)


@torch.library.register_fake("vitops::qkv_norm_rope")
def _fake(q, k, v, q_weight, k_weight, positions, eps, base_frequency):
    torch._check(q.dim() == 4, lambda: f"vitops.qkv_norm_rope: `q` must be [B, L, H, hd], got {q.shape}")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "vitops.qkv_norm_rope: `k` and `v` must be [B, L, KV, hd]")
    return _attention_layout(q, q.dtype), _attention_layout(k, q.dtype), _attention_layout(v, q.dtype)


@torch.library.register_fake("vitops::_qkv_norm_rope_backward")
def _backward_fake(grad_q, grad_k, grad_v, q, k, v, q_weight, k_weight, positions, eps, base_frequency):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape, dtype=q.dtype),
        v.new_empty(v.shape, dtype=q.dtype),
        q_weight.new_empty(q_weight.shape),
        k_weight.new_empty(k_weight.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, q_weight, k_weight, positions, eps, base_frequency = inputs
    ctx.save_for_backward(q, k, v, q_weight, k_weight, positions)
    ctx.args = (eps, base_frequency)


def _backward(ctx, grad_q, grad_k, grad_v):
    q, k, v, q_weight, k_weight, positions = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:5]):
        return None, None, None, None, None, None, None, None
    # The backward kernels take the gradients as [B, N, L, hd] (any strides): transpose views of the
    # gradients of the op's [B, L, N, hd] outputs.
    grads = [None if g is None else g.transpose(1, 2) for g in (grad_q, grad_k, grad_v)]
    for i, (g, t) in enumerate(zip(grads, (q, k, v))):
        if g is None:  # an output that did not reach the loss
            grads[i] = t.new_zeros((t.shape[0], t.shape[2], t.shape[1], t.shape[3]))
    out = _backward_op(*grads, q, k, v, q_weight, k_weight, positions, *ctx.args)
    return tuple(g if need else None for g, need in zip(out, ctx.needs_input_grad[:5])) + (None, None, None)


torch.library.register_autograd("vitops::qkv_norm_rope", _backward, setup_context=_setup_context)

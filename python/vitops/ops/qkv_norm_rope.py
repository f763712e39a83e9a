"""vitops.qkv_norm_rope: per-head norms of q, k (and v) + RoPE of q and k in one op, written in the
layout attention reads. Gemma 4 vision attention is the default; the options cover the other
families' attention entries (see ``qkv_norm_rope``)."""

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
    is_finite_number,
    shape_str,
)

_op = torch.ops.vitops.qkv_norm_rope.default
_backward_op = torch.ops.vitops._qkv_norm_rope_backward.default

NORM_KINDS = ("scale", "scale_plus_one", "rms", "none")
PAIRINGS = ("half_split", "interleaved", "none")
_WEIGHTED_NORMS = ("scale", "scale_plus_one")


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    *,
    eps: float = 1e-6,
    base_frequency: float = 100.0,
    rope_dtype: torch.dtype | None = None,
    norm: str = "scale",
    v_norm: bool = True,
    pairing: str = "half_split",
    rope_freqs: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    norm_after_rope: bool = False,
    q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """HF ``Gemma4VisionAttention``'s q_norm/k_norm/v_norm + ``apply_multidimensional_rope`` + transpose.

    Args:
      q: [B, L, H, hd]; k, v: [B, L, KV, hd]. Any strides with a contiguous head dim, e.g. views of
        one fused projection output [B, L, (H + 2*KV) * hd]; they are read in place.
        v may be None (then ``v_norm`` must be False): for families whose v is not normalised
        (Llama 4, Gemma 3) attention can read v's projection view itself (SDPA takes any strides),
        and the op skips a third of its memory traffic; v_out is then None.
      q_weight, k_weight: [hd] norm weights (any float dtype, applied in float32) for the weighted
        norms; None for ``norm="rms"`` and ``norm="none"``.
      positions: [B, L, ndim] (int32/int64/float) positions; Gemma 4 uses ndim = 2 (x, y), 1-D text
        RoPE ndim = 1. Axis a drives the a-th chunk of the head dim (MaxText's N-D split: every axis
        but the last gets 2 * (hd // (2 ndim)) channels, the last the remainder).
      eps: RMSNorm epsilon.
      base_frequency: RoPE base (theta), for HF's inverse frequencies 1 / base^(2i / chunk width).
      rope_dtype: the dtype cos/sin are rounded to before the rotation (default: q's dtype). HF's
        rotary embedding casts them to the dtype of the hidden states it is given: under autocast
        that is the float32 residual stream while q is bfloat16, so the tower passes float32 there.
      norm: the per-head-row norm of q and k, r = 1 / sqrt(mean(x^2) + eps) in float32:
        ``"scale"`` (x * r) * w (Gemma 4), ``"scale_plus_one"`` (x * r) * (1 + w) (Gemma 3),
        ``"rms"`` x * r (a weightless L2 norm), ``"none"`` (q and k rotated as given).
      v_norm: normalise v with the weightless RMS norm (Gemma 4); False passes v through.
      pairing: the channels each rotation pairs within a chunk: ``"half_split"`` (i, i + w/2),
        HF's rotate_half; ``"interleaved"`` (2i, 2i + 1), complex pairs (Llama 4); ``"none"``: no
        rotation (Llama 4's NoPE layers; ``positions`` is then only shape-checked, and ``rope_freqs`` /
        ``rope_cos`` / ``rope_sin`` must be None).
      rope_freqs: [hd / 2] inverse frequencies, one per rotated pair (pairs numbered through the
        chunks), replacing HF's formula (scaled RoPE variants); any float dtype, used in float32;
        not differentiated (a buffer, as HF's inv_freq).
      rope_cos, rope_sin: precomputed cos/sin, given together, instead of evaluating the angles:
        [B or 1, L, hd / 2], one value per row and rotated pair (pairs numbered through the chunks),
        any float dtype and strides, rounded to ``rope_dtype`` like evaluated ones; not
        differentiated. A decoder computes them once per forward for all its layers, as HF's model
        does. HF's 1-D rotate-half form ``[B, L, hd]`` (both halves equal) is accepted as it comes and
        read through a view of its first half. ``positions`` still gives the number of axes; its
        values are not read. Exclusive with ``rope_freqs``.
      norm_after_rope: apply the q/k norm to the rotated row (rounded to q's dtype first, as
        apply_rotary_emb's ``type_as``) instead of the input: Llama 4's weightless L2 norm
        (``norm="rms"``) follows its RoPE, and the two do not commute bitwise.
      q_scale: [B or 1, L] factors of q's rows (any float dtype and strides, used in float32, float64
        for float64 q), applied last as HF's ``(q * attn_scales).to(q.dtype)``: Llama 4's attention
        temperature on NoPE layers; not differentiated (a function of the positions).

    Returns:
      (q_out [B, H, L, hd], k_out [B, KV, L, hd], v_out [B, KV, L, hd] or None) in q's dtype: the shapes
      ``scaled_dot_product_attention`` takes, over [B, L, heads, hd] memory (the op writes each
      (b, l) row contiguously; flash/SDPA kernels read that layout natively, and it equals HF's
      ``q.transpose(1, 2)`` views). Per head row the norm runs in float32 and is rounded to the
      input dtype (as HF), then q and k are rotated with cos/sin rounded to ``rope_dtype``, in
      float32, rounded once.
    """
    for name, t in (("rope_freqs", rope_freqs), ("rope_cos", rope_cos), ("rope_sin", rope_sin),
                    ("q_scale", q_scale)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"vitops.qkv_norm_rope: `{name}` is not differentiated; pass a tensor that does not "
                               f"require grad (e.g. {name}.detach())")
    rope_cos, rope_sin = (_first_half_of_rotate_half_table(t, q, positions, pairing) for t in (rope_cos, rope_sin))
    q_rows, k_rows, v_rows = _op(q, k, v, q_weight, k_weight, positions, float(eps), float(base_frequency),
                                 rope_dtype, norm, bool(v_norm), pairing, rope_freqs, rope_cos, rope_sin,
                                 bool(norm_after_rope), q_scale)
    # without v the op's third output is a placeholder with no heads ([B, L, 0, hd])
    return q_rows.transpose(1, 2), k_rows.transpose(1, 2), None if v is None else v_rows.transpose(1, 2)


def _first_half_of_rotate_half_table(table, q, positions, pairing):
    """HF's 1-D rotate-half cos/sin [B, L, hd] repeat their [..., :hd/2] half; the op reads that half
    (a view). Any other shape is passed on for the op's own shape check."""
    if (table is not None and pairing == "half_split" and table.dim() == 3 and positions.dim() == 3
            and positions.shape[-1] == 1 and table.shape[-1] == q.shape[-1] and q.shape[-1] % 2 == 0):
        return table[..., : q.shape[-1] // 2]
    return table


def _attention_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The op's contiguous [B, L, N, hd] output for an input [B, L, N, hd]."""
    return t.new_empty(t.shape, dtype=dtype)


def _v_or_absent(q: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """qkv_norm_rope.h v_or_absent: v, or a [B, L, 0, hd] tensor with no heads when v is None."""
    return v if v is not None else q.new_empty((q.shape[0], q.shape[1], 0, q.shape[3]))


_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_POSITION_DTYPES = (torch.int32, torch.int64) + _FLOATS
_MAX_CUDA_HEAD_DIM = 512


def _check_inputs(op, q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype, norm, v_norm,
                  pairing, rope_freqs, rope_cos=None, rope_sin=None, q_scale=None):
    """csrc/ops/qkv_norm_rope/qkv_norm_rope.h check_inputs, in the same order."""
    fail_unless(q.dim() == 4, lambda: f"vitops.{op}: `q` must have shape [B, L, H, hd], got {shape_str(q)}")
    fail_unless(k.dim() == 4, lambda: f"vitops.{op}: `k` must have shape [B, L, KV, hd], got {shape_str(k)}")
    if v is not None:
        fail_unless(v.dim() == 4, lambda: (
            f"vitops.{op}: `v` must have shape [B, L, KV, hd] or be None, got {shape_str(v)}"))
    check_float(op, "q", q)
    if v is not None:
        fail_unless(k.dtype == q.dtype and v.dtype == q.dtype, lambda: (
            f"vitops.{op}: `q`, `k` and `v` must have the same dtype, got {dtype_name(q.dtype)}, "
            f"{dtype_name(k.dtype)} and {dtype_name(v.dtype)}"))
    else:
        fail_unless(k.dtype == q.dtype, lambda: (
            f"vitops.{op}: `q` and `k` must have the same dtype, got {dtype_name(q.dtype)} and {dtype_name(k.dtype)}"))
    fail_unless(k.shape[0] == q.shape[0] and k.shape[1] == q.shape[1] and k.shape[3] == q.shape[3], lambda: (
        f"vitops.{op}: `k` shape {shape_str(k)} does not match `q` shape {shape_str(q)} "
        "(same B, L and head dim expected)"))
    if v is not None:
        fail_unless(tuple(v.shape) == tuple(k.shape), lambda: (
            f"vitops.{op}: `v` shape {shape_str(v)} must equal `k` shape {shape_str(k)}"))
    fail_unless(v is not None or not v_norm, lambda: (
        f"vitops.{op}: `v_norm` must be False when `v` is None (there is no v to normalise)"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        fail_unless(t.shape[3] <= 1 or t.stride(3) == 1, lambda: (
            f"vitops.{op}: `{name}` must have a contiguous head dim (stride 1 in its last dim), got stride "
            f"{t.stride(3)}"))
    for name, t in (("k", k), ("v", v), ("q_weight", q_weight), ("k_weight", k_weight), ("positions", positions)):
        if t is not None:
            check_same_device(op, "q", q, name, t)
    check_shape_fits(op, "the q output", q.shape)  # outputs: contiguous, shaped like the inputs
    check_shape_fits(op, "the k and v outputs", k.shape)
    fail_unless(norm in NORM_KINDS, lambda: (
        f'vitops.{op}: `norm` must be "scale" (x * w), "scale_plus_one" (x * (1 + w)), "rms" (no weight) or '
        f'"none", got "{norm}"'))
    fail_unless(pairing in PAIRINGS, lambda: (
        f'vitops.{op}: `pairing` must be "half_split", "interleaved" or "none" (no rotation), got "{pairing}"'))
    allow_double = allows_double(q)
    hd = q.shape[3]
    weighted = norm in _WEIGHTED_NORMS
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        fail_unless((w is not None) == weighted, lambda: (
            f'vitops.{op}: `{name}` must be {"given" if weighted else "None"} with norm="{norm}"'))
        if w is None:
            continue
        fail_unless(w.dim() == 1 and w.shape[0] == hd, lambda: (
            f"vitops.{op}: `{name}` must have shape [hd] = [{hd}], got {shape_str(w)}"))
        check_float_table(op, name, w, allow_double)
    fail_unless(positions.dim() == 3 and positions.shape[0] == q.shape[0] and positions.shape[1] == q.shape[1],
                lambda: (f"vitops.{op}: `positions` must have shape [B, L, ndim] = [{q.shape[0]}, {q.shape[1]}, "
                         f"ndim], got {shape_str(positions)}"))
    fail_unless(positions.dtype in _POSITION_DTYPES and (allow_double or positions.dtype != torch.float64), lambda: (
        f"vitops.{op}: `positions` must be an int32, int64 or floating tensor, got {dtype_name(positions.dtype)}"))
    fail_unless(is_finite_number(base_frequency) and base_frequency > 0, lambda: (
        f"vitops.{op}: `base_frequency` must be a positive finite number, got {base_frequency}"))
    fail_unless(is_finite_number(eps) and eps >= 0, lambda: f"vitops.{op}: `eps` must be a finite number >= 0, got {eps}")
    table_dtype = q.dtype if rope_dtype is None else rope_dtype
    fail_unless(table_dtype in _FLOATS, lambda: (
        f"vitops.{op}: `rope_dtype` must be None or a floating dtype (float32, float64, bfloat16, float16), got "
        f"{dtype_name(table_dtype)}"))
    ndim = positions.shape[2]
    fail_unless(ndim >= 1, lambda: (
        f"vitops.{op}: `positions` must have at least one axis in its last dim, got {ndim}"))
    rotate = pairing != "none"
    if not rotate:
        fail_unless(rope_freqs is None and rope_cos is None and rope_sin is None, lambda: (
            f'vitops.{op}: `rope_freqs`, `rope_cos` and `rope_sin` must be None with pairing="none" (no rotation)'))
    if rotate and is_concrete(hd, ndim):
        fail_unless(2 * (hd // 2 // ndim) > 0, lambda: (
            f"vitops.{op}: head dim {hd} of `q` leaves no channels to rotate for {ndim} position axes "
            "(need at least 2 per axis)"))
        fail_unless(hd % 2 == 0, lambda: f"vitops.{op}: the head dim of `q` must be even for RoPE, got {hd}")
        # rope::n_d_layout: the last chunk's width hd - per_axis * (ndim - 1) is even when hd is
    if rope_freqs is not None:
        check_same_device(op, "q", q, "rope_freqs", rope_freqs)
        fail_unless(rope_freqs.dim() == 1 and rope_freqs.shape[0] == hd // 2, lambda: (
            f"vitops.{op}: `rope_freqs` must have shape [hd / 2] = [{hd // 2}] (one inverse frequency per rotated "
            f"pair), got {shape_str(rope_freqs)}"))
        check_float_table(op, "rope_freqs", rope_freqs, allow_double)
    fail_unless((rope_cos is None) == (rope_sin is None), lambda: (
        f"vitops.{op}: `rope_cos` and `rope_sin` must be given together (or both None)"))
    if rope_cos is not None:
        fail_unless(rope_freqs is None, lambda: (
            f"vitops.{op}: give either `rope_freqs` or the precomputed `rope_cos` / `rope_sin`, not both"))
        b, seq_len = q.shape[0], q.shape[1]
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            check_same_device(op, "q", q, name, t)
            fail_unless(t.dim() == 3 and (t.shape[0] == b or t.shape[0] == 1) and t.shape[1] == seq_len
                        and t.shape[2] == hd // 2, lambda: (
                f"vitops.{op}: `{name}` must have shape [B or 1, L, hd / 2] = [{b} or 1, {seq_len}, {hd // 2}] "
                f"(one value per row and rotated pair), got {shape_str(t)}"))
            check_float_table(op, name, t, allow_double)
    if q_scale is not None:
        check_same_device(op, "q", q, "q_scale", q_scale)
        b, seq_len = q.shape[0], q.shape[1]
        fail_unless(q_scale.dim() == 2 and (q_scale.shape[0] == b or q_scale.shape[0] == 1)
                    and q_scale.shape[1] == seq_len, lambda: (
            f"vitops.{op}: `q_scale` must have shape [B or 1, L] = [{b} or 1, {seq_len}] (one factor per q row), "
            f"got {shape_str(q_scale)}"))
        check_float_table(op, "q_scale", q_scale, allow_double)
    if q.device.type == "cuda":
        fail_unless(hd <= _MAX_CUDA_HEAD_DIM, lambda: (
            f"vitops.{op}: the CUDA kernel supports head dims up to {_MAX_CUDA_HEAD_DIM}, got {hd} "
            "(the head dim of `q`)"))


@torch.library.register_fake("vitops::qkv_norm_rope")
def _fake(q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype=None, norm="scale", v_norm=True,
          pairing="half_split", rope_freqs=None, rope_cos=None, rope_sin=None, norm_after_rope=False, q_scale=None):
    _check_inputs("qkv_norm_rope", q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype, norm,
                  v_norm, pairing, rope_freqs, rope_cos, rope_sin, q_scale)
    v = _v_or_absent(q, v)
    return _attention_layout(q, q.dtype), _attention_layout(k, q.dtype), _attention_layout(v, q.dtype)


@torch.library.register_fake("vitops::_qkv_norm_rope_backward")
def _backward_fake(grad_q, grad_k, grad_v, q, k, v, q_weight, k_weight, positions, eps, base_frequency,
                   rope_dtype=None, norm="scale", v_norm=True, pairing="half_split", rope_freqs=None, rope_cos=None,
                   rope_sin=None, norm_after_rope=False, q_scale=None):
    op = "_qkv_norm_rope_backward"
    _check_inputs(op, q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype, norm, v_norm,
                  pairing, rope_freqs, rope_cos, rope_sin, q_scale)
    fail_unless((grad_v is None) == (v is None), lambda: (
        f"vitops.{op}: `grad_v` must be {'None' if v is None else 'given'} when `v` is "
        f"{'None' if v is None else 'given'}"))
    v = _v_or_absent(q, v)
    grad_v = v if grad_v is None else grad_v  # absent: v's empty [B, L, 0, hd]
    b, seq_len, _, hd = q.shape
    for name, g, heads in (("grad_q", grad_q, q.shape[2]), ("grad_k", grad_k, k.shape[2]),
                           ("grad_v", grad_v, v.shape[2])):
        fail_unless(g.dim() == 4 and g.shape[0] == b and g.shape[1] == seq_len and g.shape[2] == heads
                    and g.shape[3] == hd, lambda: (
            f"vitops.{op}: `{name}` must have shape [{b}, {seq_len}, {heads}, {hd}] (the output's [B, L, N, hd]), "
            f"got {shape_str(g)}"))
        fail_unless(g.dtype == q.dtype, lambda: (
            f"vitops.{op}: `{name}` must have the dtype of `q` ({dtype_name(q.dtype)}), got {dtype_name(g.dtype)}"))
        check_same_device(op, "q", q, name, g)

    def weight_grad(w):
        return q.new_empty((0,)) if w is None else w.new_empty(w.shape)

    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape, dtype=q.dtype),
        v.new_empty(v.shape, dtype=q.dtype),
        weight_grad(q_weight),
        weight_grad(k_weight),
    )


_NUM_INPUTS = 17  # the op's arguments, tensors first: q, k, v, q_weight, k_weight, then the rest


def _setup_context(ctx, inputs, output):
    q, k, v, q_weight, k_weight, positions, *args = inputs
    ctx.save_for_backward(q, k, v, q_weight, k_weight, positions)
    # eps, base_frequency, rope_dtype, norm, v_norm, pairing, rope_freqs, rope_cos, rope_sin, norm_after_rope,
    # q_scale
    ctx.args = tuple(args)


def _backward(ctx, grad_q, grad_k, grad_v):
    q, k, v, q_weight, k_weight, positions = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:5]):
        return (None,) * _NUM_INPUTS
    # The gradients of the op's [B, L, N, hd] outputs (the backward kernels read them in that layout;
    # the wrapper's transposes are ordinary views autograd already undid). An output that did not
    # reach the loss has a zero gradient.
    grads = [t.new_zeros(t.shape) if g is None else g for g, t in zip((grad_q, grad_k), (q, k))]
    if v is None:
        grads.append(None)  # the op had no v: its placeholder output has no gradient to pass
    else:
        grads.append(v.new_zeros(v.shape, dtype=q.dtype) if grad_v is None else grad_v)
    out = _backward_op(*grads, q, k, v, q_weight, k_weight, positions, *ctx.args)
    weight_needed = (q_weight is not None, k_weight is not None)
    needs = ctx.needs_input_grad
    result = [out[i] if needs[i] and (i < 2 or v is not None) else None for i in range(3)]
    result += [out[3 + i] if needs[3 + i] and weight_needed[i] else None for i in range(2)]
    return tuple(result) + (None,) * (_NUM_INPUTS - 5)


torch.library.register_autograd("vitops::qkv_norm_rope", _backward, setup_context=_setup_context)

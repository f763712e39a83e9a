"""Pure-PyTorch references of every vitops operator: the test oracle and the spec in code.

Each function computes exactly what the matching ``torch.ops.vitops`` op computes (same dtype
flow, float32 accumulation, float64 kept in float64), written with plain ATen ops and no custom
kernels. Semantics follow MaxText ``maxtext.models.gemma4_vision`` and HF ``transformers``
``models/gemma4/modeling_gemma4.py`` (see ../shared/specs/gemma4_vision.md and README "Semantics").
"""

from __future__ import annotations

import math

import torch

from .layers import acc_dtype as _acc_dtype
from .layers import rms_norm

__all__ = [
    "patchify",
    "pixel_shuffle",
    "factorized_posemb",
    "apply_multidimensional_rope",
    "avg_pool_by_positions",
    "rope_inv_freq",
    "qkv_norm_rope",
    "avg_pool_scale_standardize",
    "avg_pool_rms_norm",
    "merge_soft_tokens",
]


# --------------------------------------------------------------------------------------------
# patchify
# --------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int, channels_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """images[..., H, W, C] -> (patches[..., N, p*p*C] in (row, col, channel) order,
    positions_xy[..., N, 2] int64 with x = column and y = row in patch units, row-major).
    ``channels_first``: images[..., C, H, W], patches in (channel, row, col) order, as HF's
    Llama4UnfoldConvolution (``torch.nn.Unfold`` then a transpose)."""
    p = patch_size
    if channels_first:
        *lead, c, h, w = images.shape
        flat = images.reshape(math.prod(lead), c, h, w)
        cols = torch.nn.functional.unfold(flat, kernel_size=p, stride=p) if flat.numel() else flat.new_empty(
            flat.shape[0], c * p * p, (h // p) * (w // p))
        patches = cols.transpose(1, 2).reshape(*lead, (h // p) * (w // p), c * p * p)
    else:
        *lead, h, w, c = images.shape
        x = images.reshape(*lead, h // p, p, w // p, p, c).transpose(-4, -3)
        patches = x.reshape(*lead, (h // p) * (w // p), p * p * c)
    ys, xs = torch.meshgrid(
        torch.arange(h // p, device=images.device), torch.arange(w // p, device=images.device), indexing="ij"
    )
    pos = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    return patches, pos.expand(*lead, *pos.shape).contiguous()


# --------------------------------------------------------------------------------------------
# pixel_shuffle (Llama 4)
# --------------------------------------------------------------------------------------------
def pixel_shuffle(input_tensor: torch.Tensor, shuffle_ratio: float) -> torch.Tensor:
    """HF's Llama 4 ``pixel_shuffle`` (views and permutes), for any leading dims: [..., L, C] of a
    square grid -> [..., L r², C / r²], channels in (dh, dw, c) order."""
    *lead, length, channels = input_tensor.shape
    side = math.isqrt(length)
    n = round(1 / shuffle_ratio)
    if side * side != length or side % n or abs(n * shuffle_ratio - 1) > 1e-12:
        raise ValueError(f"pixel_shuffle: cannot shuffle L = {length} tokens with ratio {shuffle_ratio}")
    x = input_tensor.reshape(math.prod(lead), side, side, channels)
    b = x.shape[0]
    x = x.reshape(b, side, side // n, channels * n).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(b, side // n, side // n, channels * n * n).permute(0, 2, 1, 3).contiguous()
    return x.reshape(*lead, (side // n) ** 2, channels * n * n)


# --------------------------------------------------------------------------------------------
# factorized_posemb
# --------------------------------------------------------------------------------------------
def factorized_posemb(posemb: torch.Tensor, positions_xy: torch.Tensor, table_dim: int = 0) -> torch.Tensor:
    """Sum of the x-table row at x and the y-table row at y, in the table's dtype.

    posemb is [2, N_pos, D] (table_dim=0, HF) or [N_pos, 2, D] (table_dim=1, MaxText). A coordinate
    equal to -1 contributes zero; any other coordinate outside [0, N_pos) raises.
    """
    n_pos = posemb.shape[1 - table_dim]
    valid = (positions_xy >= -1) & (positions_xy < n_pos)
    if not bool(valid.all()):
        raise ValueError(f"positions_xy has coordinates outside [-1, {n_pos})")
    acc = _acc_dtype(posemb.dtype)
    out = None
    for axis in range(2):
        table = posemb.select(table_dim, axis).to(acc)
        coord = positions_xy[..., axis].long()
        rows = table[coord.clamp(min=0)]
        rows = torch.where((coord == -1).unsqueeze(-1), torch.zeros((), dtype=acc, device=rows.device), rows)
        out = rows if out is None else out + rows
    return out.to(posemb.dtype)


# --------------------------------------------------------------------------------------------
# apply_multidimensional_rope
# --------------------------------------------------------------------------------------------
def rope_inv_freq(width: int, base_frequency: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """HF's inverse frequencies for a rotated chunk of `width` channels: 1 / base^(2i/width)."""
    exponent = torch.arange(0, width, 2, dtype=torch.int64, device=device).to(dtype) / width
    return 1.0 / (base_frequency**exponent)


def _rope_chunk(x: torch.Tensor, pos: torch.Tensor, base: float, scale: float,
                table_dtype: torch.dtype | None = None, pairing: str = "half_split",
                inv_freq: torch.Tensor | None = None, cos_sin: tuple | None = None) -> torch.Tensor:
    """RoPE over the whole last dim of x[..., L, H, d]; pos is [..., L]. Pairs (i, i + d/2) for
    "half_split" (HF's rotate_half) or (2i, 2i + 1) for "interleaved" (complex pairs); inv_freq
    [d/2] defaults to HF's 1 / base^(2i/d); cos_sin: given (cos, sin) [..., L, d/2] instead of angles."""
    d = x.shape[-1]
    acc = _acc_dtype(x.dtype)
    # cos/sin are computed in float32 and rounded to the activation dtype (or table_dtype), as HF
    # does (HF: the dtype of the hidden states given to its rotary embedding); given ones likewise.
    table_dtype = x.dtype if table_dtype is None else table_dtype
    if cos_sin is not None:
        cos, sin = (t.to(table_dtype).to(acc).unsqueeze(-2) for t in cos_sin)
        return _rotate(x, cos, sin, pairing, acc)
    inv_freq = rope_inv_freq(d, base, acc, x.device) if inv_freq is None else inv_freq.to(acc)
    angle = (pos.to(acc).unsqueeze(-1) * inv_freq) * scale  # [..., L, d/2]
    if angle.numel() and not bool(torch.isfinite(angle).all()):
        raise ValueError("apply_multidimensional_rope: positions must give finite rotation angles")
    cos = angle.cos().to(table_dtype).to(acc).unsqueeze(-2)
    sin = angle.sin().to(table_dtype).to(acc).unsqueeze(-2)
    return _rotate(x, cos, sin, pairing, acc)


def _rotate(x, cos, sin, pairing, acc):
    d = x.shape[-1]
    xf = x.to(acc)
    if pairing == "interleaved":
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = xf[..., : d // 2], xf[..., d // 2 :]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.to(x.dtype)


def rope_chunks(head_dim: int, ndim: int, rotary_fraction: float | None) -> list[int]:
    """Channel widths MaxText's apply_multidimensional_rope rotates per position axis (N-D case);
    channels after their sum pass through unrotated."""
    rotated = head_dim if rotary_fraction is None else int(round(head_dim * rotary_fraction))
    per_dim = 2 * (rotated // (2 * ndim))
    if per_dim <= 0:
        raise ValueError(
            f"apply_multidimensional_rope: head dim {head_dim} with rotary_fraction={rotary_fraction} leaves no "
            f"channels to rotate for {ndim} position axes (need at least 2 per axis)"
        )
    widths = [per_dim] * ndim
    if rotary_fraction is None:
        widths[-1] = head_dim - per_dim * (ndim - 1)  # MaxText: the last chunk takes the remainder
    return widths


def apply_multidimensional_rope(
    inputs: torch.Tensor,
    positions: torch.Tensor,
    *,
    base_frequency: float,
    rotary_fraction: float | None = None,
    scale_factor: float = 1.0,
) -> torch.Tensor:
    """MaxText's apply_multidimensional_rope (== HF Gemma 4 vision RoPE for 2-D positions).

    inputs [..., L, H, hd]; positions [..., L] (1-D) or [..., L, ndim] (N-D, one chunk per axis).
    """
    hd = inputs.shape[-1]
    if positions.dim() + 2 == inputs.dim():  # 1-D positions
        rot = hd if rotary_fraction is None else int(rotary_fraction * hd)
        if rot % 2:
            raise ValueError(f"apply_multidimensional_rope: rotated width {rot} must be even")
        if rot == 0:
            return inputs.clone()
        y = _rope_chunk(inputs[..., :rot], positions, base_frequency, scale_factor)
        return torch.cat([y, inputs[..., rot:]], dim=-1) if rot < hd else y
    ndim = positions.shape[-1]
    widths = rope_chunks(hd, ndim, rotary_fraction)
    parts, start = [], 0
    for axis, w in enumerate(widths):
        if w % 2:
            raise ValueError(f"apply_multidimensional_rope: chunk width {w} for axis {axis} must be even")
        parts.append(_rope_chunk(inputs[..., start : start + w], positions[..., axis], base_frequency, scale_factor))
        start += w
    if start < hd:
        parts.append(inputs[..., start:])
    return torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------------
# avg_pool_by_positions
# --------------------------------------------------------------------------------------------
def pool_kernel_size(seq_len: int, length: int) -> int:
    """k such that k*k*length == seq_len (raises otherwise)."""
    if length <= 0:
        raise ValueError(f"avg_pool_by_positions: `length` must be positive, got {length}")
    k = math.isqrt(seq_len // length)
    if k < 1 or k * k * length != seq_len:
        raise ValueError(
            f"avg_pool_by_positions: cannot pool {seq_len} patches to length={length}: "
            f"the sequence length must be k*k*length for an integer k >= 1"
        )
    return k


def pool_slots(positions_xy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot[B, L] int64, is_padding[B, L]) with HF's per-image grid width."""
    pad = (positions_xy == -1).all(dim=-1)
    c = positions_xy.long().clamp(min=0)
    max_x = torch.where(pad, 0, c[..., 0]).amax(dim=-1, keepdim=True) + 1 if c.shape[1] else c[..., 0]
    slot = torch.div(c[..., 0], k, rounding_mode="floor") + torch.div(max_x, k, rounding_mode="floor") * torch.div(
        c[..., 1], k, rounding_mode="floor"
    )
    return slot, pad


def avg_pool_by_positions(
    x: torch.Tensor, positions_xy: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image k x k average pooling by patch position (spec §6): the sum of the patches that land
    in a slot divided by k*k, padding patches (both coordinates -1) ignored; mask marks slots that
    received at least one patch. Output in x's dtype, accumulated in float32."""
    b, seq_len, d = x.shape
    k = pool_kernel_size(seq_len, length)
    pad = (positions_xy == -1).all(dim=-1)
    if bool(((positions_xy < 0) & ~pad.unsqueeze(-1)).any()):
        raise ValueError("avg_pool_by_positions: positions_xy has negative coordinates outside padding (-1, -1)")
    slot, pad = pool_slots(positions_xy, k)
    if bool(((slot >= length) & ~pad).any()):
        raise ValueError(f"avg_pool_by_positions: a patch position maps past length={length}")
    acc = _acc_dtype(x.dtype)
    weights = torch.nn.functional.one_hot(torch.where(pad, length, slot), length + 1)[..., :length].to(acc)
    weights = weights / (k * k)
    out = weights.transpose(1, 2) @ x.to(acc)
    mask = (weights != 0).any(dim=1)
    return out.to(x.dtype), mask


# --------------------------------------------------------------------------------------------
# qkv_norm_rope (fused: HF Gemma4VisionAttention's q/k/v norms + 2-D RoPE + transpose)
# --------------------------------------------------------------------------------------------
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
    """q [B, L, H, hd], k/v [B, L, KV, hd] -> (q_out [B, H, L, hd], k_out, v_out [B, KV, L, hd]):
    q_norm/k_norm (``vitops.layers.rms_norm`` of kind `norm`, or none) and v_norm (weightless, if `v_norm`) as HF,
    N-D RoPE of q and k by positions [B, L, ndim] (chunks of rope_chunks(hd, ndim, None), each
    rotated like _rope_chunk with `pairing`, cos/sin rounded to rope_dtype, default q's dtype, and
    the chunk's slice of `rope_freqs` when given, or of the given `rope_cos` / `rope_sin` [B or 1, L,
    hd/2] (HF's rotate-half [B, L, hd] read through its first half)); pairing "none": no rotation;
    norm_after_rope: the q/k norm applied to the rotated row instead (Llama 4's apply_rotary_emb then
    Llama4TextL2Norm); q_scale [B or 1, L]: q rows times it in float32 (float64 for float64 q),
    rounded (HF's ``(q * attn_scales).to(q.dtype)``); then transpose(1, 2).contiguous(); v None:
    v_out None."""
    widths = rope_chunks(q.shape[-1], positions.shape[-1], None) if pairing != "none" else []
    hd = q.shape[-1]
    if rope_cos is not None and rope_cos.shape[-1] == hd and len(widths) == 1 and pairing == "half_split":
        rope_cos, rope_sin = rope_cos[..., : hd // 2], rope_sin[..., : hd // 2]

    def rope(x):
        if pairing == "none":
            return x
        parts, start = [], 0
        for axis, w in enumerate(widths):
            freqs = None if rope_freqs is None else rope_freqs[start // 2 : (start + w) // 2]
            tables = None if rope_cos is None else tuple(
                t[..., start // 2 : (start + w) // 2] for t in (rope_cos, rope_sin))
            parts.append(_rope_chunk(x[..., start : start + w], positions[..., axis], base_frequency, 1.0, rope_dtype,
                                     pairing, freqs, tables))
            start += w
        return torch.cat(parts, dim=-1)

    def qk_norm(x, weight):
        return x if norm == "none" else rms_norm(x, weight, eps, norm)

    def qk(x, weight):
        return qk_norm(rope(x), weight) if norm_after_rope else rope(qk_norm(x, weight))

    q_out, k_out = qk(q, q_weight), qk(k, k_weight)
    if q_scale is not None:
        acc = _acc_dtype(q.dtype)
        q_out = (q_out.to(acc) * q_scale.to(acc)[:, :, None, None]).to(q.dtype)
    if v is None:
        return q_out.transpose(1, 2).contiguous(), k_out.transpose(1, 2).contiguous(), None
    v_out = rms_norm(v, None, eps, "rms") if v_norm else v
    return tuple(t.transpose(1, 2).contiguous() for t in (q_out, k_out, v_out))


# --------------------------------------------------------------------------------------------
# avg_pool_scale_standardize (fused Gemma 4 vision exit)
# --------------------------------------------------------------------------------------------
def avg_pool_scale_standardize(
    x: torch.Tensor,
    positions_xy: torch.Tensor,
    length: int,
    scale: float,
    std_bias: torch.Tensor | None = None,
    std_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Newest HF exit: avg_pool_by_positions (pooled rounded to x's dtype), then float32
    ``pooled * scale`` and, if given, ``(y - std_bias) * std_scale`` in float32 (float64 for
    float64 x), cast to x's dtype. Returns (output [B, length, D], mask [B, length])."""
    if (std_bias is None) != (std_scale is None):
        raise ValueError("avg_pool_scale_standardize: std_bias and std_scale must be given together")
    pooled, mask = avg_pool_by_positions(x, positions_xy, length)
    acc = _acc_dtype(x.dtype)
    y = pooled.to(acc) * scale
    if std_bias is not None:
        y = (y - std_bias.to(acc)) * std_scale.to(acc)
    return y.to(x.dtype), mask



# --------------------------------------------------------------------------------------------
# avg_pool_rms_norm (Gemma 3's exit before its GEMM)
# --------------------------------------------------------------------------------------------
def avg_pool_rms_norm(x: torch.Tensor, length: int, weight: torch.Tensor | None, *, eps: float = 1e-6,
                      norm: str = "scale_plus_one") -> torch.Tensor:
    """HF Gemma3MultiModalProjector's path: [B, L, D] -> NCHW grid -> AvgPool2d(k) -> row-major tokens
    (x's dtype) -> rms_norm of kind `norm` (float32, rounded once); norm "none" stops after the pool."""
    import math

    b, seq, d = x.shape
    side, out_side = math.isqrt(seq), math.isqrt(length)
    k = side // out_side
    if d == 0:  # avg_pool2d rejects zero channels
        return x.new_empty((b, length, 0))
    grid = x.transpose(1, 2).reshape(b, d, side, side)
    pooled = torch.nn.functional.avg_pool2d(grid, k, k).flatten(2).transpose(1, 2)
    return pooled if norm == "none" else rms_norm(pooled, weight, eps, norm)


def posemb_sincos_2d(like: torch.Tensor, h: int, w: int, width: int, temperature: float = 10000.0,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """MaxText's MoCo v3 table ``[1, h * w, width]`` on ``like``'s device (the op's raw form): rows
    m = y * w + x, channels ``[sin(x f_k), cos(x f_k), sin(y f_k), cos(y f_k)]`` with
    ``f_k = 1 / temperature^(k / (width / 4 - 1))`` (``/ 1`` for width 4, where MaxText's is NaN),
    computed in float32 (as MaxText's jnp code) and cast to ``dtype`` (None: like's)."""
    if width % 4:
        raise ValueError(f"posemb_sincos_2d: `width` must be a multiple of 4, got {width}")
    device = like.device
    quarter = width // 4
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter - 1, 1)
    omega = 1.0 / (temperature**omega)
    ys = y.reshape(-1, 1).float() * omega[None]
    xs = x.reshape(-1, 1).float() * omega[None]
    table = torch.cat([torch.sin(xs), torch.cos(xs), torch.sin(ys), torch.cos(ys)], dim=1)
    return table[None].to(like.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------
# moe_route / moe_combine (Llama 4's top-1 routing)
# --------------------------------------------------------------------------------------------
def moe_route(x: torch.Tensor, router_logits: torch.Tensor):
    """HF Llama4TextMoe's router with the tokens bucketed: expert = argmax (first maximum, NaN as the
    maximum), scores = sigmoid(top logit in float32 (float64 for float64 logits)).to(x.dtype), rows
    x * score in float32 (float64 for float64 x) rounded, ordered by a stable sort on the expert.
    Returns (routed, scores, token_order, token_slot, expert_ends int32)."""
    n, e = router_logits.shape
    expert = router_logits.argmax(-1)
    top = router_logits.gather(-1, expert[:, None])[:, 0]
    sig_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    scores = torch.sigmoid(top.to(sig_dtype)).to(x.dtype)
    acc = _acc_dtype(x.dtype)
    order = torch.argsort(expert, stable=True)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n, device=x.device)
    ends = torch.cumsum(torch.bincount(expert, minlength=e), 0).to(torch.int32)
    routed = (x.to(acc) * scores.to(acc)[:, None]).to(x.dtype)[order]
    return routed, scores, order, slot, ends


def moe_combine(shared: torch.Tensor, expert_out: torch.Tensor, token_slot: torch.Tensor,
                token_order: torch.Tensor) -> torch.Tensor:
    """shared + expert_out[token_slot] in float32 (float64 for float64), rounded once."""
    acc = _acc_dtype(shared.dtype)
    return (shared.to(acc) + expert_out.to(acc)[token_slot]).to(shared.dtype)


def merge_soft_tokens(inputs_embeds: torch.Tensor, soft_tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """inputs_embeds ([T, H] or [B, S, H]) with row indices[j] of its flattened rows (batch-major, HF's
    masked_scatter order) replaced by soft_tokens[j]. Indices that are negative or >= the row count
    are skipped, and of several positions addressing one row the largest j wins: the rule of the
    CUDA kernels (the CPU kernels raise for those two instead). Differentiable in both tensors."""
    h = inputs_embeds.shape[-1]
    rows = inputs_embeds.shape[0] if inputs_embeds.dim() == 2 else inputs_embeds.shape[0] * inputs_embeds.shape[1]
    flat = inputs_embeds.reshape(rows, h)
    n = indices.shape[0]
    idx = indices.to(torch.int64)
    valid = (idx >= 0) & (idx < rows)
    # the winning position of every row (-1: none); invalid positions go to a spare slot `rows`
    positions = torch.arange(n, device=idx.device)
    winner = torch.full((rows + 1,), -1, dtype=torch.int64, device=idx.device).scatter_reduce(
        0, torch.where(valid, idx, rows), torch.where(valid, positions, -1), "amax")[:rows]
    padded = torch.cat([soft_tokens, soft_tokens.new_zeros(1, h)])  # row n: what rows without a winner gather
    merged = torch.where((winner >= 0)[:, None], padded[torch.where(winner >= 0, winner, n)], flat)
    return merged.reshape(inputs_embeds.shape)

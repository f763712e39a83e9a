"""Gemma 4 vision tower as PyTorch modules, mirroring ``maxtext.models.gemma4_vision``.

Class names and call arguments follow MaxText; numerics follow HF ``transformers``
(``models/gemma4/modeling_gemma4.py``, the reference where the two differ). Differences from
MaxText, all deliberate:

* A :class:`Gemma4VisionConfig` dataclass replaces MaxText's config + mesh.
* Weights use PyTorch layouts (``nn.Linear`` weights are ``[out, in]``); the position table keeps
  MaxText's ``[N_pos, 2, D]`` layout (HF stores the transpose; :mod:`vitops.hf` converts).
* Clipped linears, q/k/v norms, key-padding masks and HF's float32 exit are implemented
  (MaxText HEAD lacks clipping and padding).
* ``std_bias`` / ``std_scale`` live in :class:`VisionExit` (buffers, only when ``standardize``)
  so that pooling, scaling and standardization are one method a fused kernel can replace.
* Masks are ``bool`` with the batch shape of the embeddings (MaxText returns int32 ``[B*N, K]``).

Spec: ``shared/specs/gemma4_vision.md`` §2-§8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._hf_config import config_getter
from ..layers import (
    TANH_GELUS,
    ClippedLinear,
    GatedMlp,
    PackedSegments,
    RMSNorm,
    acc_dtype,
    attention_mask as _attention_mask,
    dropout as _dropout,
    dropout_active as _dropout_active,
    mask_is_redundant as _mask_is_redundant,
    packed_attention,
    rms_norm,
)
from ..ops import (
    apply_multidimensional_rope,
    avg_pool_by_positions,
    avg_pool_scale_standardize,
    factorized_posemb,
    patchify,
    qkv_norm_rope,
)

__all__ = [
    "Gemma4VisionConfig",
    "PRESETS",
    "RMSNorm",
    "ClippedLinear",
    "MlpBlock",
    "VisionEntry",
    "VisionExit",
    "Gemma4VisionRotaryEmbedding",
    "Gemma4Attention",
    "Gemma4EncoderBlock",
    "Gemma4VisionEncoderLayer",
    "Gemma4VisionProjector",
    "encode_videos",
    "mark_static_axes",
    "rms_norm",
    "strip_padding",
    # functional ops, re-exported like MaxText's module does
    "patchify",
    "factorized_posemb",
    "apply_multidimensional_rope",
    "avg_pool_by_positions",
]

# The released models use gelu_pytorch_tanh; HF's other names of the tanh GELU are accepted and
# computed as HF writes them (vitops.layers.ACTIVATIONS).
_ACTIVATIONS = TANH_GELUS


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Gemma4VisionConfig:
    """Hyper-parameters of the Gemma 4 vision tower (+ projector into the text model).

    ``output_length=None`` derives the pooled length from the (padded) patch count as HF does
    (``L // pooling_kernel_size**2``); an int fixes it as MaxText's ``vision_output_length`` does
    (then ``L`` must equal ``k*k*output_length``). ``text_hidden_size`` is only needed by
    :class:`Gemma4VisionProjector`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 16
    num_heads: int = 12
    num_kv_heads: int | None = None
    head_dim: int | None = None
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    use_clipped_linears: bool = False
    standardize: bool = False
    output_length: int | None = None
    text_hidden_size: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    # Dropout, active in training only (see _dropout_active): on the attention probabilities (HF's
    # attention_dropout, KerasHub's dropout), on the MLP's gated hidden activations with one mask
    # shared along the sequence (MaxText's dropout_rate), and on the attention and MLP branches
    # after their post-norms (KerasHub's dropout).
    attention_dropout: float = 0.0
    dropout_rate: float = 0.0
    residual_dropout: float = 0.0

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "patch_size", "pooling_kernel_size", "position_embedding_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Gemma4VisionConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Gemma4VisionConfig: num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 4:
            # 2-D RoPE rotates hd/2 channels per axis with a half split: hd must be a multiple of 4.
            raise ValueError(f"Gemma4VisionConfig: head_dim must be divisible by 4 (2-D RoPE), got {self.head_dim}")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(
                f"Gemma4VisionConfig: hidden_activation must be a tanh-approximated GELU {_ACTIVATIONS}, "
                f"got {self.hidden_activation!r}"
            )
        if self.output_length is not None and (not isinstance(self.output_length, int) or self.output_length <= 0):
            raise ValueError(f"Gemma4VisionConfig.output_length must be None or a positive int, got {self.output_length!r}")
        if self.text_hidden_size is not None and self.text_hidden_size <= 0:
            raise ValueError(f"Gemma4VisionConfig.text_hidden_size must be positive, got {self.text_hidden_size!r}")
        for name in ("attention_dropout", "dropout_rate", "residual_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                raise ValueError(f"Gemma4VisionConfig.{name} must be in [0, 1), got {v!r}")

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def replace(self, **changes) -> "Gemma4VisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Gemma4VisionConfig":
        """A released configuration: one of ``PRESETS`` ("gemma4-e2b", "gemma4-e4b", "gemma4-26b-a4b", "gemma4-31b")."""
        key = name.lower().replace("_", "-")
        if not key.startswith("gemma4-"):
            key = "gemma4-" + key
        if key not in PRESETS:
            raise ValueError(f"unknown Gemma 4 vision preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "Gemma4VisionConfig":
        """From an HF ``Gemma4Config`` (uses its ``vision_config`` and ``text_config.hidden_size``),
        a ``Gemma4VisionConfig``, or the ``to_dict()`` of either."""
        get = config_getter(hf_config)
        vision, text = hf_config, None
        if get("vision_config") is not None:
            vision = get("vision_config")
            text = get("text_config")
        elif get("model_type") == "gemma4":
            raise ValueError("HF Gemma4Config has no vision_config (text/audio-only model)")
        v = config_getter(vision)
        if v("model_type") not in (None, "gemma4_vision"):
            raise ValueError(f"expected an HF gemma4 / gemma4_vision config, got model_type={v('model_type')!r}")
        rope = v("rope_parameters") or {}
        rope_type = rope.get("rope_type", "axial")
        if rope_type not in ("axial", "default"):
            raise ValueError(f"Gemma 4 vision supports only axial (2-D) RoPE, got rope_type={rope_type!r}")
        kwargs = dict(
            hidden_size=v("hidden_size"),
            intermediate_size=v("intermediate_size"),
            num_layers=v("num_hidden_layers"),
            num_heads=v("num_attention_heads"),
            num_kv_heads=v("num_key_value_heads"),
            head_dim=v("head_dim"),
            patch_size=v("patch_size"),
            pooling_kernel_size=v("pooling_kernel_size"),
            position_embedding_size=v("position_embedding_size"),
            rope_theta=float(rope.get("rope_theta", 100.0)),
            rms_norm_eps=v("rms_norm_eps"),
            use_clipped_linears=bool(v("use_clipped_linears")),
            standardize=bool(v("standardize")),
            hidden_activation=v("hidden_activation"),
            attention_dropout=v("attention_dropout"),
        )
        if text is not None:
            kwargs["text_hidden_size"] = config_getter(text)("hidden_size")
        kwargs = {k: val for k, val in kwargs.items() if val is not None}
        kwargs.update(overrides)
        return cls(**kwargs)


_SMALL = dict(hidden_size=768, intermediate_size=3072, num_layers=16, num_heads=12, head_dim=64,
              use_clipped_linears=True, standardize=False)
_LARGE = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, head_dim=72,
              use_clipped_linears=False, standardize=True)
PRESETS: dict[str, Gemma4VisionConfig] = {
    "gemma4-e2b": Gemma4VisionConfig(**_SMALL, text_hidden_size=1536),
    "gemma4-e4b": Gemma4VisionConfig(**_SMALL, text_hidden_size=2560),
    "gemma4-26b-a4b": Gemma4VisionConfig(**_LARGE, text_hidden_size=2816),
    "gemma4-31b": Gemma4VisionConfig(**_LARGE, text_hidden_size=5376),
}


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class MlpBlock(GatedMlp):
    """Gated tanh-GELU MLP ``wo(gelu_tanh(wi_0(x)) * wi_1(x))`` (MaxText names: wi_0 = gate, wi_1 = up);
    in training, MaxText's ``dropout_rate`` drops gated activations (one mask along the sequence)."""

    def __init__(self, config: Gemma4VisionConfig, *, device=None, dtype=None):
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_activation, config.dropout_rate,
                         config.use_clipped_linears, device=device, dtype=dtype)


def _default_positions(batch: int, seq_len: int, device) -> torch.Tensor:
    """(x, y) of a square, row-major patch grid (MaxText's no-positions pooling branch)."""
    width = math.isqrt(seq_len)
    if width * width != seq_len:
        raise ValueError(f"VisionExit: without positions_xy the sequence length ({seq_len}) must be a perfect square")
    idx = torch.arange(seq_len, device=device)
    return torch.stack([idx % width, idx // width], dim=-1).expand(batch, seq_len, 2)


def _positions_for(positions_xy: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``[B*N, L, 2]`` positions for patches ``[B, (N,) L, P]``: positions shaped like the patches'
    leading dims, or ``[L, 2]`` shared by every image (broadcast, no copy)."""
    if positions_xy.dim() == 2:
        positions_xy = positions_xy.expand(*patches.shape[:-1], positions_xy.shape[-1])
    if (positions_xy.dim() != patches.dim() or positions_xy.shape[:-1] != patches.shape[:-1]
            or positions_xy.shape[-1] != 2):
        raise ValueError(
            f"Gemma4VisionEncoderLayer: image_position_ids must be [L, 2] or [..., L, 2] matching the patches "
            f"{tuple(patches.shape)} (one (x, y) per patch), got shape {tuple(positions_xy.shape)}")
    return positions_xy.reshape(-1, *positions_xy.shape[-2:])


def _padding(positions_xy: torch.Tensor) -> torch.Tensor:
    """True for padding patches: both coordinates are -1 (HF / processor convention)."""
    return (positions_xy == -1).all(dim=-1)


def mark_static_axes(inputs: torch.Tensor | None = None, image_position_ids: torch.Tensor | None = None) -> None:
    """Marks the fixed-size axes of the tower's inputs static for ``torch.compile(dynamic=True)``:
    the (x, y) axis of the positions and the last axis of the images (3 channels) or patches (3p^2).

    Under ``dynamic=True`` dynamo gives input dims of equal size one symbol ("duck shaping") and
    guards that they stay equal: a first batch of 2 ties the batch size to the (x, y) axis, a first
    raw-image batch of 3 to the channel axis, and the next batch size recompiles. Marked axes stay
    out of that. :class:`vitops.preprocess.Gemma4ImageProcessor` marks its outputs, and
    :meth:`Gemma4VisionEncoderLayer.compile` marks every call's inputs; call this on inputs from
    elsewhere before passing them to ``torch.compile(tower, dynamic=True)``. (A batch of 1 is still
    compiled apart: torch specialises size-1 dims.)"""
    for t in (inputs, image_position_ids):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and not torch.compiler.is_compiling():
            torch._dynamo.mark_static(t, t.dim() - 1)


def strip_padding(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's flattened output ``[sum_i n_i, D]`` from padded ``[..., length, D]`` + mask.
    The size depends on the mask values, so this synchronises with the host (unlike the padded form)."""
    return embeddings[mask]


# ---------------------------------------------------------------------------------------------
# Entry / exit / RoPE
# ---------------------------------------------------------------------------------------------
class VisionEntry(nn.Module):
    """Patch embedding: ``input_projection(2 * (patches - 0.5)) + factorized_posemb(positions)``.

    ``pos_emb_param`` is ``[N_pos, 2, D]`` (MaxText layout, ``pos_emb_shape_yx = (N_pos, 2)``).
    """

    def __init__(self, d_model: int, patch_size: int, pos_emb_shape_yx: tuple[int, int],
                 normalize_input_range: bool = False, *, device=None, dtype=None, matmul_precision=None):
        super().__init__()
        if len(pos_emb_shape_yx) != 2 or pos_emb_shape_yx[-1] != 2:
            raise ValueError(f"VisionEntry: pos_emb_shape_yx must be (N_pos, 2), got {pos_emb_shape_yx}")
        self.d_model = d_model
        self.patch_size = patch_size
        self.pos_emb_shape_yx = tuple(pos_emb_shape_yx)
        self.normalize_input_range = normalize_input_range
        self.input_projection = nn.Linear(3 * patch_size * patch_size, d_model, bias=False, device=device, dtype=dtype)
        self.pos_emb_param = nn.Parameter(torch.empty(*pos_emb_shape_yx, d_model, device=device, dtype=dtype))
        nn.init.normal_(self.pos_emb_param, std=0.02)

    def forward(self, images_or_patches: torch.Tensor, positions_xy: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[..., H, W, 3]`` (patchified here) or patches ``[B, L, 3p^2]`` + ``positions_xy``
        (``[B, L, 2]`` or ``[L, 2]``). Returns ``(embeddings [B, L, D], positions_xy [B, L, 2])``."""
        if positions_xy is None:
            patches, positions_xy = patchify(images_or_patches, self.patch_size)
        else:
            patches = images_or_patches
            if patches.dim() != 3:
                raise ValueError(f"VisionEntry: patches must be [B, L, 3p^2], got shape {tuple(patches.shape)}")
            if positions_xy.dim() == 2:
                positions_xy = positions_xy.expand(patches.shape[0], *positions_xy.shape)
        if self.normalize_input_range:
            # Gemma 4 has no processor normalisation: [0, 1] pixels map to [-1, 1] here, in the input
            # dtype (float32 from the processor), before the cast to the weight dtype (HF's order).
            patches = 2 * (patches - 0.5)
        x = self.input_projection(patches.to(self.input_projection.weight.dtype))
        pos_embed = factorized_posemb(self.pos_emb_param, positions_xy, layout="maxtext")
        # No cast (HF's `hidden_states + position_embeddings`): under autocast the projection is
        # bfloat16 and the float32 table makes the residual stream float32, as in HF.
        return x + pos_embed, positions_xy


class VisionExit(nn.Module):
    """Per-image k x k average pooling by position, ``x sqrt(d_model)`` and optional standardize.

    Scaling and standardization run in float32 (newest HF: the scaled activations overflow
    float16 and ``std_bias`` cancels large values); the result is cast to the input dtype.
    ``output_length=None`` pools to ``L // pooling_kernel_size**2`` slots (HF).
    """

    def __init__(self, d_model: int, output_length: int | tuple[int, ...] | None = None, *,
                 pooling_kernel_size: int = 3, standardize: bool = False, precision=None, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.output_length = output_length
        self.pooling_kernel_size = pooling_kernel_size
        self.standardize = standardize
        self.precision = precision
        self.root_d_model = d_model**0.5  # a Python float, multiplied like HF's root_hidden_size
        if standardize:
            # Persistent buffers as in HF (loaded from the checkpoint, never trained).
            self.register_buffer("std_bias", torch.zeros(d_model, device=device, dtype=dtype))
            self.register_buffer("std_scale", torch.ones(d_model, device=device, dtype=dtype))

    def pool_scale_standardize(self, x: torch.Tensor, positions_xy: torch.Tensor, length: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole exit: pooling by positions, x sqrt(D), standardize (one fused op).

        Returns ``(embeddings [B, length, D] in x.dtype, mask [B, length] bool)``; mask is True
        for slots that received at least one patch.
        """
        k = self.pooling_kernel_size
        if length is None:
            length = x.shape[1] // (k * k)
        std_bias = self.std_bias if self.standardize else None
        std_scale = self.std_scale if self.standardize else None
        if length != x.shape[1]:
            # One fused op: pooling (padding never read), rounding to x's dtype, x sqrt(D) and
            # standardize in float32, as newest HF.
            return avg_pool_scale_standardize(x, positions_xy, length, self.root_d_model, std_bias, std_scale)
        # As many slots as patches: nothing to pool, whatever pooling_kernel_size says. HF and MaxText
        # then skip the pooling and keep the patches in input order.
        padding = _padding(positions_xy)
        # Zero padded rows (HF): their attention outputs are garbage, possibly non-finite.
        x = x.masked_fill(padding.unsqueeze(-1), 0.0)
        mask = ~padding  # MaxText's (correct) mask; HF's k == 1 branch inverts it
        acc = acc_dtype(x.dtype)
        h = x.to(acc) * self.root_d_model
        if self.standardize:
            h = (h - std_bias.to(acc)) * std_scale.to(acc)
        return h.to(x.dtype), mask

    def _single_call(self, x, *, positions_xy=None, length=None):
        if positions_xy is None:
            positions_xy = _default_positions(x.shape[0], x.shape[1], x.device)
        return self.pool_scale_standardize(x, positions_xy, length)

    def forward(self, x: torch.Tensor, *, positions_xy: torch.Tensor | None = None,
                output_length_overrides: tuple[int, ...] | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """One ``(embeddings, mask)`` pair per requested output length (MaxText's contract)."""
        lens = output_length_overrides if output_length_overrides is not None else self.output_length
        if lens is None or isinstance(lens, int):
            lens = (lens,)
        return tuple(self._single_call(x, positions_xy=positions_xy, length=n) for n in lens)


class Gemma4VisionRotaryEmbedding(nn.Module):
    """2-D axial RoPE: channels [0, hd/2) rotated by x, [hd/2, hd) by y, half-split in each."""

    def __init__(self, base_frequency: float, rotary_fraction: float | None = None, scale_factor: float = 1.0):
        super().__init__()
        self.base_frequency = base_frequency
        self.rotary_fraction = rotary_fraction
        self.scale_factor = scale_factor

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_multidimensional_rope(inputs, positions, base_frequency=self.base_frequency,
                                           rotary_fraction=self.rotary_fraction, scale_factor=self.scale_factor)


# ---------------------------------------------------------------------------------------------
# Attention / block
# ---------------------------------------------------------------------------------------------
class Gemma4Attention(nn.Module):
    """Bidirectional self-attention with q/k RMSNorm (scaled), v RMSNorm (unscaled), 2-D RoPE,
    logit scale 1.0 (q and k are normalised), GQA, key-padding mask."""

    def __init__(self, config: Gemma4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        c = config
        self.num_query_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.dropout_rate = c.attention_dropout
        kw = dict(device=device, dtype=dtype)
        self.query = ClippedLinear(c.hidden_size, c.num_heads * c.head_dim, c.use_clipped_linears, **kw)
        self.key = ClippedLinear(c.hidden_size, c.num_kv_heads * c.head_dim, c.use_clipped_linears, **kw)
        self.value = ClippedLinear(c.hidden_size, c.num_kv_heads * c.head_dim, c.use_clipped_linears, **kw)
        self.out = ClippedLinear(c.num_heads * c.head_dim, c.hidden_size, c.use_clipped_linears, **kw)
        self.query_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw)
        self.key_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw)
        self.value_norm = RMSNorm(c.head_dim, c.rms_norm_eps, with_scale=False, **kw)
        self.rope_theta = c.rope_theta  # the fused op computes the RoPE (Gemma4VisionRotaryEmbedding's math)

    def norm_and_rope(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                      rope_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q/k RMSNorm + 2-D RoPE and v RMSNorm in one fused op. Takes ``[B, L, heads, hd]`` views
        of the projections (no copies) and returns the attention layout ``[B, heads, L, hd]``;
        ``rope_dtype`` is the dtype cos/sin are rounded to (default: the projections')."""
        return qkv_norm_rope(query, key, value, self.query_norm.scale, self.key_norm.scale, positions,
                             eps=self.query_norm.eps, base_frequency=self.rope_theta,
                             rope_dtype=rope_dtype)

    def forward(self, inputs_q: torch.Tensor, inputs_kv: torch.Tensor | None = None,
                inputs_positions: torch.Tensor | None = None, *, decoder_segment_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, deterministic: bool | None = None,
                segments: PackedSegments | None = None, attention_backend: str = "sdpa"
                ) -> tuple[torch.Tensor, None]:
        """``inputs_q [B, L, D]``, ``inputs_positions [B, L, 2]`` (x, y). Either ``attention_mask``
        ``[B, L]`` (True = valid key; padded queries still attend, their outputs are discarded
        later) or MaxText's ``decoder_segment_ids`` ``[B, L]`` (attend within a segment); neither
        means full attention. ``segments``: images packed back to back in one sequence (B = 1),
        attending within their segment without padding FLOPs (:func:`vitops.layers.packed_attention`,
        ``attention_backend`` "sdpa" or "varlen"). Returns ``(output [B, L, D], None)`` like MaxText."""
        if inputs_kv is not None and inputs_kv is not inputs_q:
            raise ValueError("Gemma4Attention is self-attention: inputs_kv must be None or inputs_q")
        if inputs_positions is None:
            raise ValueError("Gemma4Attention needs inputs_positions ([B, L, 2] patch coordinates) for its 2-D RoPE")
        b, length, _ = inputs_q.shape
        q = self.query(inputs_q).view(b, length, self.num_query_heads, self.head_dim)
        k = self.key(inputs_q).view(b, length, self.num_kv_heads, self.head_dim)
        v = self.value(inputs_q).view(b, length, self.num_kv_heads, self.head_dim)
        # cos/sin in the dtype of the attention's input (the residual stream), as HF's rotary embedding
        # gets the hidden states: float32 under autocast while q, k, v are bfloat16 there.
        q, k, v = self.norm_and_rope(q, k, v, inputs_positions, rope_dtype=inputs_q.dtype)

        dropout_p = self.dropout_rate if _dropout_active(self, deterministic) else 0.0
        if segments is not None:
            if attention_mask is not None or decoder_segment_ids is not None:
                raise ValueError("Gemma4Attention: packed `segments` take no attention_mask or decoder_segment_ids "
                                 "(packed images have no padding and attend within their segment)")
            out = packed_attention(q, k, v, segments, scale=1.0, dropout_p=dropout_p, backend=attention_backend)
            return self.out(out), None
        mask = _attention_mask(b, length, attention_mask, decoder_segment_ids)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p,
            scale=1.0, enable_gqa=self.num_query_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(b, length, self.num_query_heads * self.head_dim)
        return self.out(out), None


class Gemma4EncoderBlock(nn.Module):
    """Pre-norm transformer block with "sandwich" norms (4 RMSNorms with scale)."""

    def __init__(self, config: Gemma4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_attention_norm = RMSNorm(d, eps, **kw)
        self.attention = Gemma4Attention(config, **kw)
        self.post_attention_norm = RMSNorm(d, eps, **kw)
        self.pre_ffw_norm = RMSNorm(d, eps, **kw)
        self.mlp = MlpBlock(config, **kw)
        self.post_ffw_norm = RMSNorm(d, eps, **kw)
        self.residual_dropout = config.residual_dropout

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, deterministic: bool | None = None,
                decoder_segment_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                segments: PackedSegments | None = None, attention_backend: str = "sdpa") -> torch.Tensor:
        active = _dropout_active(self, deterministic)
        h, _ = self.attention(self.pre_attention_norm(x), inputs_positions=positions, attention_mask=attention_mask,
                              decoder_segment_ids=decoder_segment_ids, deterministic=not active, segments=segments,
                              attention_backend=attention_backend)
        x = x + _dropout(self.post_attention_norm(h), self.residual_dropout, active)
        h = self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x), deterministic=not active))
        return x + _dropout(h, self.residual_dropout, active)


# ---------------------------------------------------------------------------------------------
# Whole tower + projector
# ---------------------------------------------------------------------------------------------
class Gemma4VisionEncoderLayer(nn.Module):
    """The Gemma 4 vision tower: entry -> blocks -> exit (pool, x sqrt(D), standardize).

    Called like MaxText's: ``(images)`` -> ``[B, N, K, D]`` for images ``[B, (N,) H, W, 3]``
    (patchified inside, full grid, no padding); ``(patches, image_position_ids=positions)`` ->
    ``(embeddings [B, (N,) K, D], mask [B, (N,) K] bool)`` for HF-style padded patches. The
    padded form never synchronises with the host; :meth:`forward_flat` gives HF's ``[sum n_i, D]``.
    """

    def __init__(self, config: Gemma4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.vision_entry = VisionEntry(config.hidden_size, config.patch_size, (config.position_embedding_size, 2),
                                        normalize_input_range=True, **kw)
        for i in range(config.num_layers):
            self.add_module(f"layer_{i}", Gemma4EncoderBlock(config, **kw))
        self.vision_exit = VisionExit(config.hidden_size, config.output_length,
                                      pooling_kernel_size=config.pooling_kernel_size,
                                      standardize=config.standardize, **kw)

    @property
    def layers(self) -> list[Gemma4EncoderBlock]:
        return [getattr(self, f"layer_{i}") for i in range(self.config.num_layers)]

    @property
    def std_bias(self) -> torch.Tensor | None:
        return getattr(self.vision_exit, "std_bias", None)

    @property
    def std_scale(self) -> torch.Tensor | None:
        return getattr(self.vision_exit, "std_scale", None)

    def encode(self, patches: torch.Tensor, positions_xy: torch.Tensor | None = None, *, masked: bool = True,
               deterministic: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry + blocks: ``(hidden [B, L, D], positions_xy)``. ``masked=False`` drops the
        key-padding mask (valid only when nothing is padded; saves the masked attention path)."""
        x, positions_xy = self.vision_entry(patches, positions_xy)
        attention_mask = ~_padding(positions_xy) if masked else None
        if attention_mask is not None and _mask_is_redundant(attention_mask):
            attention_mask = None
        for layer in self.layers:
            x = layer(x, positions_xy, deterministic, attention_mask=attention_mask)
        return x, positions_xy

    def forward(self, inputs: torch.Tensor, deterministic: bool | None = None,
                image_position_ids: torch.Tensor | None = None, *, output_length: int | None = None):
        """``deterministic``: MaxText's flag (False applies dropout); None follows ``self.training``."""
        length = output_length if output_length is not None else self.config.output_length
        if image_position_ids is None:
            # MaxText contract (A): raw images, full grids, no padding -> no attention mask.
            if inputs.dim() not in (4, 5):
                raise ValueError(f"Gemma4VisionEncoderLayer: images must be [B, H, W, 3] or [B, N, H, W, 3], got "
                                 f"shape {tuple(inputs.shape)} (pass image_position_ids for pre-patchified input)")
            images = inputs if inputs.dim() == 5 else inputs.unsqueeze(1)
            b, n = images.shape[:2]
            x, pos = self.encode(images.flatten(0, 1), None, masked=False, deterministic=deterministic)
            out, _ = self.vision_exit.pool_scale_standardize(x, pos, length)
            return out.unflatten(0, (b, n))
        # Contract (B): pre-patchified, padded patches [B, (N,) L, 3p^2] + positions [B, (N,) L, 2], or
        # positions [L, 2] shared by every image.
        if inputs.dim() < 3:
            raise ValueError(f"Gemma4VisionEncoderLayer: patches must be [B, (N,) L, 3p^2], got shape "
                             f"{tuple(inputs.shape)}")
        lead = inputs.shape[:-2]
        patches = inputs.reshape(-1, *inputs.shape[-2:])
        pos = _positions_for(image_position_ids, inputs)
        x, pos = self.encode(patches, pos, deterministic=deterministic)
        out, mask = self.vision_exit.pool_scale_standardize(x, pos, length)
        return out.reshape(*lead, *out.shape[1:]), mask.reshape(*lead, mask.shape[-1])

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` (compile this module in place), with :func:`mark_static_axes` applied
        to every call's inputs outside the compiled region, so that ``dynamic=True`` compiles one
        graph for every batch size (but 1)."""
        super().compile(*args, **kwargs)
        compiled = self._compiled_call_impl

        def call(inputs, *rest, **kw):
            mark_static_axes(inputs, kw.get("image_position_ids", rest[1] if len(rest) > 1 else None))
            return compiled(inputs, *rest, **kw)

        self._compiled_call_impl = call

    def forward_packed(self, patches: torch.Tensor, positions_xy: torch.Tensor, segments: PackedSegments, *,
                       deterministic: bool | None = None, attention_backend: str = "sdpa"
                       ) -> tuple[torch.Tensor, PackedSegments]:
        """Images of any sizes packed back to back in one sequence (beyond HF, which pads every image
        to one budget): ``patches [P, 3p^2]`` and ``positions_xy [P, 2]`` hold each image's patches
        (no padding rows), ``segments`` their patch counts (``P = segments.total``, each a full patch
        grid whose sides are multiples of ``pooling_kernel_size``).

        The projections, norms and MLPs run once over all ``P`` patches; each image attends to its own
        patches only (:func:`vitops.layers.packed_attention`, no padding FLOPs) and is pooled on its own
        grid. Returns ``(embeddings [N, D], token_segments)``: every image's soft tokens in image order
        (``N = P / k^2``; the rows each image gives when encoded alone, HF's flattened order) and
        their counts per image. The packing is host metadata: nothing here reads the device."""
        k2 = self.config.pooling_kernel_size**2
        if not isinstance(segments, PackedSegments):
            segments = PackedSegments(tuple(segments))
        p = self.config.patch_dim
        if patches.dim() != 2 or patches.shape[0] != segments.total or patches.shape[1] != p:
            raise ValueError(f"Gemma4VisionEncoderLayer.forward_packed: patches must be [{segments.total}, {p}] (the "
                             f"packed patch count, 3 * patch_size**2), got {tuple(patches.shape)}")
        if positions_xy.shape != (segments.total, 2):
            raise ValueError(f"Gemma4VisionEncoderLayer.forward_packed: positions_xy must be [{segments.total}, 2], "
                             f"got {tuple(positions_xy.shape)}")
        token_segments = segments.scaled_down(k2)
        x, pos = self.vision_entry(patches.unsqueeze(0), positions_xy.unsqueeze(0))
        for layer in self.layers:
            x = layer(x, pos, deterministic, segments=segments, attention_backend=attention_backend)
        pooled = []
        for start, count, n in segments.runs:
            rows = slice(start, start + count * n)
            out, _ = self.vision_exit.pool_scale_standardize(x[0, rows].reshape(count, n, -1),
                                                             pos[0, rows].reshape(count, n, 2), n // k2)
            pooled.append(out.reshape(count * (n // k2), -1))
        return (pooled[0] if len(pooled) == 1 else torch.cat(pooled)), token_segments

    def forward_flat(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:
        """HF ``Gemma4VisionModel`` output: ``[sum_i n_i, D]`` with padding slots removed (syncs)."""
        out, mask = self(pixel_values, image_position_ids=pixel_position_ids)
        return strip_padding(out, mask)


class Gemma4VisionProjector(nn.Module):
    """Into the text model: RMSNorm without scale, then a bias-free linear ``D -> text_hidden_size``."""

    def __init__(self, config: Gemma4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        if config.text_hidden_size is None:
            raise ValueError("Gemma4VisionProjector needs config.text_hidden_size (the text model's hidden size)")
        self.config = config
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False, device=device, dtype=dtype)
        self.projection = nn.Linear(config.hidden_size, config.text_hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(x))


# ---------------------------------------------------------------------------------------------
# Video soft tokens for the text model: HF's Gemma4Model.get_video_features
# ---------------------------------------------------------------------------------------------
def encode_videos(tower: Gemma4VisionEncoderLayer, projector: Gemma4VisionProjector | None,
                  pixel_values_videos: torch.Tensor, video_position_ids: torch.Tensor,
                  num_soft_tokens_per_video: list[int] | None = None, *, deterministic: bool | None = None,
                  attention_backend: str = "sdpa") -> list[torch.Tensor]:
    """Videos to soft tokens, HF's ``get_video_features``: ``[V, F, L, 3p^2]`` + ``[V, F, L, 2]`` (the
    video processor's outputs) -> per video ``[F * n_v, text_hidden]`` (the tower's ``[F * n_v, D]``
    when ``projector`` is None): every frame an independent image, padding slots dropped, each
    video's frames' rows in order (what fills its ``<|video|>`` tokens).

    All frames of all videos are encoded in one packed call (:func:`vitops.serving.encode_packed`:
    no padding rows, block-diagonal attention per frame). ``num_soft_tokens_per_video`` (the
    processor's per-frame counts) keeps the packing on the host: nothing reads the device. Without
    it the counts are read from the positions (one host read, as HF's split sizes)."""
    from ..serving.packed import PackedImages, encode_packed

    if pixel_values_videos.dim() != 4:
        raise ValueError(f"encode_videos: pixel_values_videos must be [V, F, L, 3p^2], got shape "
                         f"{tuple(pixel_values_videos.shape)}")
    if video_position_ids.shape != (*pixel_values_videos.shape[:-1], 2):
        raise ValueError(f"encode_videos: video_position_ids must be [V, F, L, 2] = "
                         f"{[*pixel_values_videos.shape[:-1], 2]}, got shape {tuple(video_position_ids.shape)}")
    videos, frames = pixel_values_videos.shape[:2]
    k2 = tower.config.pooling_kernel_size**2
    if num_soft_tokens_per_video is None:
        per_frame = ((video_position_ids != -1).all(-1).sum(-1) // k2).reshape(-1).tolist()
    else:
        counts = list(num_soft_tokens_per_video)
        if len(counts) != videos:
            raise ValueError(f"encode_videos: num_soft_tokens_per_video has {len(counts)} counts for {videos} videos")
        per_frame = [int(n) for n in counts for _ in range(frames)]
    packed = PackedImages.from_padded(pixel_values_videos, video_position_ids, per_frame,
                                      tower.config.pooling_kernel_size)
    encoded = encode_packed(tower, packed, embedder=projector, deterministic=deterministic,
                            attention_backend=attention_backend)
    per_video = [sum(per_frame[v * frames:(v + 1) * frames]) for v in range(videos)]
    return list(torch.split(encoded.soft_tokens, per_video))

"""Gemma 3, mirroring ``maxtext.models.gemma3`` (PyTorch form: a config object instead of config + mesh).

The vision part (SigLIP So400m/14 and its exit) with HF ``transformers``' numerics: NHWC images
``[B, N, H, W, 3]`` -> 14x14 stride-14 patch embedding (with bias) -> + position table (learned, or
MaxText's "sincos2d") -> encoder blocks (pre-LayerNorm, bidirectional attention with biases, tanh-GELU
MLP) -> LayerNorm -> :class:`VisionExit` (square average pooling to ``mm_tokens_per_image``, row
major) -> ``[B, N, 256, D]``. :class:`VisionEmbedder` is the projector into the text model: Gemma's
RMSNorm ``x * (1 + w)`` in float32, rounded to the activation dtype, then ``x @ W``.

The decoder's layer-pattern helpers are here too; the decoder layers build on ``vitops.layers`` and
the ``vitops.ops`` kernels (``qkv_norm_rope`` with ``norm="scale_plus_one"`` computes the text
attention's q/k norms and RoPE).

Differences from MaxText, all deliberate: a :class:`Gemma3VisionConfig` replaces config + mesh;
weights use PyTorch layouts (``nn.Linear`` ``[out, in]``, ``nn.Conv2d`` ``[out, in, kh, kw]``); the
projector norm stores HF's ``w`` (applied as ``1 + w``, as HF and KerasHub do) where MaxText stores
``1 + w``; ``deterministic=None`` follows ``module.training``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (
    AttentionType,
    DecoderKVCache,
    GatedMlp,
    RMSNorm,
    RopeTables,
    broadcast_dropout,
    check_attention_heads,
    check_decoder_call,
    decoder_attend,
    decoder_positions_for,
    image_block_ids,
    run_decoder_layers,
)
from ..layers import dropout as _dropout
from ..layers import dropout_active as _dropout_active
from ..ops import avg_pool_rms_norm, patchify, qkv_norm_rope
from ..ops import posemb_sincos_2d as _posemb_sincos_2d_op

__all__ = [
    "GEMMA3_ATTENTION_PATTERN",
    "DecoderKVCache",
    "Einsum",
    "Encoder",
    "Encoder1DBlock",
    "Gemma3DecoderConfig",
    "Gemma3DecoderLayer",
    "Gemma3ScannableBlock",
    "Gemma3SelfAttention",
    "Gemma3VisionConfig",
    "Gemma3VisionEncoderLayer",
    "MlpBlockViT",
    "VisionEmbedder",
    "VisionExit",
    "get_attention_type",
    "encode_images",
    "get_query_pre_attn_scalar",
    "posemb_sincos_2d",
]

# Five sliding-window layers, then one global layer (HF: "sliding_attention" if (i + 1) % 6 else
# "full_attention").
GEMMA3_ATTENTION_PATTERN = (AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,)


def get_attention_type(layer_id: int) -> AttentionType:
    """The attention kind of the 0-based layer ``layer_id``: ``GEMMA3_ATTENTION_PATTERN[layer_id % 6]``."""
    return GEMMA3_ATTENTION_PATTERN[layer_id % len(GEMMA3_ATTENTION_PATTERN)]


def _field(config: Any, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def get_query_pre_attn_scalar(config: Any) -> float:
    """The multiplier applied to q before attention (MaxText's; HF's ``query_pre_attn_scalar ** -0.5``
    for the released models): ``head_dim ** -0.5`` for gemma3-4b and gemma3-12b,
    ``(base_emb_dim // base_num_query_heads) ** -0.5`` (168 ** -0.5) for gemma3-27b; any other
    ``config.model_name`` raises ``ValueError`` as MaxText does. ``config``: an object or a dict."""
    model_name = _field(config, "model_name")
    if model_name in ("gemma3-4b", "gemma3-12b"):
        return _field(config, "head_dim") ** -0.5
    if model_name == "gemma3-27b":
        return (_field(config, "base_emb_dim") // _field(config, "base_num_query_heads")) ** -0.5
    raise ValueError(f"Unsupported model name: {model_name}")


# ---------------------------------------------------------------------------------------------
# Vision tower (SigLIP) and its exit
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Gemma3VisionConfig:
    """Hyper-parameters of the Gemma 3 vision tower (+ projector into the text model).

    Defaults are the released 4B / 12B / 27B values (HF's ``SiglipVisionConfig`` defaults are
    siglip-base and unusable here). MaxText names in brackets: hidden_size [hidden_size_for_vit],
    intermediate_size [intermediate_size_for_vit], num_layers [num_hidden_layers_for_vit], num_heads
    [num_attention_heads_for_vit], image_size [image_size_for_vit], patch_size [patch_size_for_vit,
    conv_stride_for_vit], layer_norm_eps [normalization_layer_epsilon], posemb
    [posemb_type_for_vit], dropout [dropout_rate], mm_tokens_per_image [VisionExit output_length],
    text_hidden_size [emb_dim].
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    posemb: str = "learn"  # "learn" (the released checkpoints) or "sincos2d" (MaxText's MoCo v3 table)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    mm_tokens_per_image: int = 256
    text_hidden_size: int | None = None  # the projector's output width; None: no projector

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"Gemma3VisionConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"Gemma3VisionConfig: image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(f'Gemma3VisionConfig: posemb must be "learn" or "sincos2d", got {self.posemb!r}')
        if self.posemb == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"Gemma3VisionConfig: posemb \"sincos2d\" needs hidden_size % 4 == 0, got "
                             f"{self.hidden_size}")
        side = self.image_size // self.patch_size
        out_side = math.isqrt(self.mm_tokens_per_image)
        if out_side * out_side != self.mm_tokens_per_image or out_side == 0 or side % out_side:
            raise ValueError(f"Gemma3VisionConfig: mm_tokens_per_image {self.mm_tokens_per_image} must be a square "
                             f"whose side divides the patch grid side {side}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "Gemma3VisionConfig":
        return dataclasses.replace(self, **changes)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class MlpBlockViT(nn.Module):
    """``Dense_1(dropout(gelu_tanh(Dense_0(x))))`` (HF SiglipMLP: fc1, gelu_pytorch_tanh, fc2)."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.dropout_rate = config.dropout
        self.Dense_0 = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.Dense_1 = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        h = F.gelu(self.Dense_0(x), approximate="tanh")
        return self.Dense_1(_dropout(h, self.dropout_rate, _dropout_active(self, deterministic)))


class MultiHeadDotProductAttention(nn.Module):
    """Bidirectional multi-head attention with biases, scale ``head_dim ** -0.5`` (HF SiglipAttention), SDPA."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = self.head_dim**-0.5  # HF's value (1 / sqrt(hd) can differ in the last bit)
        self.dropout_rate = config.attention_dropout
        self.query = nn.Linear(d, d, **kw)
        self.key = nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, **kw)
        self.out = nn.Linear(d, d, **kw)

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        rate = self.dropout_rate if _dropout_active(self, deterministic) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=rate, scale=self.scale)
        return self.out(out.transpose(1, 2).reshape(b, length, -1))


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm block: ``h = x + dropout(attn(LN_0(x)))``, ``out = h + dropout(mlp(LN_1(h)))``."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d = config.hidden_size
        self.dropout_rate = config.dropout
        self.LayerNorm_0 = nn.LayerNorm(d, eps=config.layer_norm_eps, **kw)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(config, **kw)
        self.LayerNorm_1 = nn.LayerNorm(d, eps=config.layer_norm_eps, **kw)
        self.MlpBlockViT_0 = MlpBlockViT(config, **kw)

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        active = _dropout_active(self, deterministic)
        h = x + _dropout(self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), deterministic),
                         self.dropout_rate, active)
        return h + _dropout(self.MlpBlockViT_0(self.LayerNorm_1(h), deterministic), self.dropout_rate, active)


class Encoder(nn.Module):
    """``encoderblock_{i}`` for each layer, then ``encoder_norm`` (HF's post_layernorm)."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_layers = config.num_layers
        for i in range(config.num_layers):
            self.add_module(f"encoderblock_{i}", Encoder1DBlock(config, **kw))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        for i in range(self.num_layers):
            x = getattr(self, f"encoderblock_{i}")(x, deterministic)
        return self.encoder_norm(x)


class VisionExit(nn.Module):
    """Average pooling of the square row-major token grid ``[B, L, D]`` to ``output_length`` tokens
    (HF Gemma3MultiModalProjector's AvgPool2d; MaxText's NHWC avg_pool): identity when
    ``L == output_length``. ``pool_size`` instead pools fixed ``pool_size x pool_size`` windows
    (KerasHub's AveragePooling2D: a grid side it does not divide drops its last rows and columns).

    Pooling that tiles the grid runs as ``vitops.avg_pool_rms_norm(norm="none")``, which reads the
    token-major input in place (AvgPool2d needs it as an NCHW grid); KerasHub's floor pooling keeps
    ``F.avg_pool2d``."""

    def __init__(self, output_length: int = 256, *, pool_size: int | None = None):
        super().__init__()
        self.output_length = output_length
        self.pool_size = pool_size

    def pooled_length(self, length: int) -> int | None:
        """Tokens out for ``length`` tokens in when the windows tile the grid (the fused ops'
        geometry); None for KerasHub's floor pooling of a side the pool does not divide. Raises for a
        grid this exit cannot pool."""
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"VisionExit: {length} tokens are not a square grid")
        if self.pool_size is not None:
            k = self.pool_size
            if k > side:
                raise ValueError(f"VisionExit: pool_size {k} is larger than the {side}x{side} token grid")
            return (side // k) ** 2 if side % k == 0 else None
        out_side = math.isqrt(self.output_length)
        if out_side * out_side != self.output_length or side % out_side:
            raise ValueError(f"VisionExit: {length} tokens do not pool to {self.output_length} (both must be "
                             "squares, the output side dividing the input side)")
        return self.output_length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        out_length = self.pooled_length(length)
        if out_length == length:
            return x
        if out_length is not None:
            return avg_pool_rms_norm(x, out_length, None, norm="none")
        side, k = math.isqrt(length), self.pool_size
        grid = x.transpose(1, 2).reshape(b, d, side, side)
        return F.avg_pool2d(grid, kernel_size=k, stride=k).flatten(2).transpose(1, 2)


class Einsum(nn.Module):
    """A weight ``w`` of ``shape`` applied with an einsum equation (MaxText's Einsum)."""

    def __init__(self, shape: tuple[int, ...], *, device=None, dtype=None):
        super().__init__()
        self.w = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        nn.init.normal_(self.w, std=shape[0] ** -0.5)

    def forward(self, eqn: str, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum(eqn, x, self.w)


class VisionEmbedder(nn.Module):
    """The projector into the text model: ``mm_soft_embedding_norm`` (Gemma RMSNorm ``x * (1 + w)``
    in float32, rounded to x's dtype, as HF's Gemma3RMSNorm) then ``mm_input_projection`` (``x @ W``,
    ``W [D, text_hidden_size]``, HF's ``mm_input_projection_weight``); the result in x's dtype."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        if config.text_hidden_size is None:
            raise ValueError("VisionEmbedder needs config.text_hidden_size (the text model's hidden size)")
        kw = dict(device=device, dtype=dtype)
        self.mm_soft_embedding_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_eps, plus_one=True, **kw)
        self.mm_input_projection = Einsum((config.hidden_size, config.text_hidden_size), **kw)

    def forward(self, x: torch.Tensor, eqn: str = "...tm,md->...td") -> torch.Tensor:
        return self.mm_input_projection(eqn, self.mm_soft_embedding_norm(x)).to(x.dtype)

    def pool_and_embed(self, x: torch.Tensor, length: int, eqn: str = "...tm,md->...td") -> torch.Tensor:
        """``self(VisionExit(length)(x))`` for token grids ``x [..., L, D]``, the pooling and the norm in
        one op (``vitops.avg_pool_rms_norm``, HF's projector up to its GEMM): x is read once."""
        norm = self.mm_soft_embedding_norm
        lead = x.shape[:-2]
        grid = x.reshape(-1, *x.shape[-2:])
        normed = avg_pool_rms_norm(grid, length, norm.scale, eps=norm.eps, norm=norm.kind)
        return self.mm_input_projection(eqn, normed.reshape(*lead, length, normed.shape[-1])).to(x.dtype)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10000.0, *, dtype=torch.float32,
                     device=None) -> torch.Tensor:
    """MaxText's MoCo v3 table ``[1, h * w, width]`` (``vitops.posemb_sincos_2d``, one kernel): rows
    m = y * w + x, channels ``[sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)]`` with
    ``w_k = 1 / temperature^(k / (width / 4 - 1))``, computed in float32 (as MaxText's jnp code) and
    cast to ``dtype``."""
    return _posemb_sincos_2d_op(h, w, width, temperature, dtype=dtype, device=device)


class Gemma3VisionEncoderLayer(nn.Module):
    """The vision tower: NHWC images ``[B, N, H, W, C]`` (or ``[B, H, W, C]``, N = 1) ->
    ``[B, N, mm_tokens_per_image, D]``.

    ``embedding``: the patch convolution (``nn.Conv2d``, kernel = stride = patch size, with bias);
    ``pos_embedding`` ``[1, L, D]`` (a parameter for ``posemb="learn"``; ``"sincos2d"`` has none);
    ``Transformer``: :class:`Encoder`; ``VisionExit``: :class:`VisionExit`. Images are cast to the
    convolution's dtype first (as HF's SigLIP embeddings do); ``patch_embedding`` (attribute, default
    ``"auto"``) picks how the convolution runs (:meth:`embed_patches`). ``deterministic``: MaxText's flag (False
    applies dropout; None follows ``module.training``); ``train``: MaxText's argument, which its
    vision encoder does not read either."""

    def __init__(self, config: Gemma3VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.dropout_rate = config.dropout
        self.embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, **kw)
        n = config.patches_per_side**2
        if config.posemb == "learn":
            self.pos_embedding = nn.Parameter(torch.empty(1, n, d, **kw))
            nn.init.normal_(self.pos_embedding, std=d**-0.5)
        else:
            self.pos_embedding = None
        self.Transformer = Encoder(config, **kw)
        self.VisionExit = VisionExit(config.mm_tokens_per_image)
        self.patch_embedding = "auto"  # "conv" | "patchify" | "auto": see embed_patches

    def forward(self, inputs: torch.Tensor, deterministic: bool | None = None, train: bool = False) -> torch.Tensor:
        x = self.encode(inputs, deterministic)
        b, n = x.shape[:2]
        x = self.VisionExit(x.flatten(0, 1))
        return x.reshape(b, n, *x.shape[1:])

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """The patch convolution of NHWC ``images [N, H, W, C]`` -> ``[N, L, D]`` (with its bias).

        ``patch_embedding="patchify"`` computes it as ``vitops.patchify`` (the NHWC images read in
        place, patches in (row, col, channel) order) + one GEMM with the convolution's weight in that
        order; ``"conv"`` runs ``nn.Conv2d`` on the NCHW view. ``"auto"`` picks what measured faster
        (benchmarks/NOTES.md entry 11): the GEMM for bfloat16 on the CPU (6.96 vs 9.30 ms at 896², the
        same error against float64), the convolution otherwise (float32: 13.2 vs 29.3 ms; float16 equal;
        CUDA not measured yet)."""
        weight = self.embedding.weight
        images = images.to(weight.dtype)
        mode = self.patch_embedding
        if mode not in ("auto", "conv", "patchify"):
            raise ValueError(f'Gemma3VisionEncoderLayer: `patch_embedding` must be "auto", "conv" or "patchify", '
                             f"got {mode!r}")
        if mode == "auto":
            mode = "patchify" if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else "conv"
        if mode == "patchify":
            patches, _ = patchify(images, self.config.patch_size)
            gemm_weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # [D, (row, col, channel)]
            return F.linear(patches, gemm_weight, self.embedding.bias)
        return self.embedding(images.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)

    def encode(self, inputs: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        """The tower up to its exit: ``[B, N, L, D]`` (L = patches per image, row major)."""
        c = self.config
        if inputs.dim() == 4:
            inputs = inputs.unsqueeze(1)
        if inputs.dim() != 5 or inputs.shape[-1] != c.num_channels or inputs.shape[2:4] != (c.image_size,) * 2:
            raise ValueError(f"Gemma3VisionEncoderLayer: `inputs` must be NHWC images [B, N, {c.image_size}, "
                             f"{c.image_size}, {c.num_channels}] or [B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}], got {list(inputs.shape)}")
        b, n = inputs.shape[:2]
        x = self.embed_patches(inputs.reshape(b * n, *inputs.shape[2:]))  # [BN, L, D], token l = row * side + col
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        else:
            side = c.patches_per_side
            x = x + posemb_sincos_2d(side, side, c.hidden_size, dtype=x.dtype, device=x.device)
        x = _dropout(x, self.dropout_rate, _dropout_active(self, deterministic))
        x = self.Transformer(x, deterministic)
        return x.reshape(b, n, *x.shape[1:])


def encode_images(tower: Gemma3VisionEncoderLayer, embedder: VisionEmbedder | None, inputs: torch.Tensor,
                  deterministic: bool | None = None) -> torch.Tensor:
    """Images to soft tokens, HF's ``get_image_features``: ``embedder(tower(inputs))``
    ``[B, N, mm_tokens_per_image, text_hidden_size]`` (``tower(inputs)`` when ``embedder`` is None),
    with the tower's exit pooling and the embedder's norm fused into one op where the pooling tiles
    the grid (:meth:`VisionEmbedder.pool_and_embed`)."""
    if embedder is None:
        return tower(inputs, deterministic)
    x = tower.encode(inputs, deterministic)
    length = tower.VisionExit.pooled_length(x.shape[2])
    if length is None:
        b, n = x.shape[:2]
        return embedder(tower.VisionExit(x.flatten(0, 1)).reshape(b, n, -1, x.shape[-1]))
    return embedder.pool_and_embed(x, length)


# ---------------------------------------------------------------------------------------------
# Text decoder (MaxText Gemma3DecoderLayer / Gemma3ScannableBlock; HF Gemma3DecoderLayer's math)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Gemma3DecoderConfig:
    """Hyper-parameters of the Gemma 3 text decoder layers. Defaults: the released 4B text model.
    MaxText names in brackets: hidden_size [emb_dim], intermediate_size [mlp_dim], num_heads
    [num_query_heads], num_kv_heads, head_dim, query_pre_attn_scalar (HF's; MaxText's
    :func:`get_query_pre_attn_scalar` is its ``** -0.5``), sliding_window [sliding_window_size],
    rope_local_base_freq / rope_theta / rope_linear_factor (local layers: theta 1e4; global layers:
    theta 1e6 with linear scaling, HF's ``rope_parameters``), dropout_rate, attention_dropout."""

    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 1024
    rms_norm_eps: float = 1e-6
    rope_local_base_freq: float = 10000.0
    rope_theta: float = 1000000.0
    rope_linear_factor: float | None = 8.0  # global layers' linear RoPE scaling (None: none)
    hidden_activation: str = "gelu_pytorch_tanh"
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        check_attention_heads("Gemma3DecoderConfig", self.num_heads, self.num_kv_heads, self.head_dim)
        if self.sliding_window < 1:
            raise ValueError(f"Gemma3DecoderConfig: sliding_window must be >= 1, got {self.sliding_window}")
        if self.rope_linear_factor is not None and not self.rope_linear_factor > 0:
            raise ValueError(f"Gemma3DecoderConfig: rope_linear_factor must be > 0 or None, got "
                             f"{self.rope_linear_factor}")

    def replace(self, **changes) -> "Gemma3DecoderConfig":
        return dataclasses.replace(self, **changes)


class Gemma3SelfAttention(nn.Module):
    """Gemma 3 text self-attention (MaxText ``Attention`` with ``use_qk_norm=True``): q/k/v projections
    (``query``, ``key``, ``value``, bias-free), the q/k Gemma RMSNorm ``x * (1 + w)`` over the head dim
    before rotate-half RoPE (cos/sin rounded to the activation dtype), ``query_pre_attn_scalar ** -0.5``
    logit scale, GQA, the layer's mask (causal, sliding window, image blocks, segments) and ``out``.
    The norms and RoPE are one ``vitops.qkv_norm_rope`` call (norm ``"scale_plus_one"``, 1-D positions)."""

    def __init__(self, config: Gemma3DecoderConfig, attention_type: AttentionType, *, device=None, dtype=None):
        super().__init__()
        c = config
        if attention_type not in (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL):
            raise ValueError(f"Gemma3SelfAttention: attention_type must be LOCAL_SLIDING or GLOBAL, got "
                             f"{attention_type}")
        self.config = c
        self.attention_type = attention_type
        kw = dict(device=device, dtype=dtype)
        self.query = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False, **kw)
        self.key = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False, **kw)
        self.value = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False, **kw)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, **kw)
        self.query_norm = RMSNorm(c.head_dim, c.rms_norm_eps, plus_one=True, **kw)
        self.key_norm = RMSNorm(c.head_dim, c.rms_norm_eps, plus_one=True, **kw)
        local = attention_type == AttentionType.LOCAL_SLIDING
        self.rope_theta = c.rope_local_base_freq if local else c.rope_theta
        self.rope_linear_factor = None if local else c.rope_linear_factor

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                image_blocks: torch.Tensor | None = None, kv_cache: DecoderKVCache | None = None,
                deterministic: bool | None = None, rope_tables: RopeTables | None = None
                ) -> tuple[torch.Tensor, DecoderKVCache]:
        """``inputs [B, L, D]``, ``positions [B, L]`` absolute (int); returns ``(out [B, L, D], cache)``,
        the cache holding every key so far (``kv_cache`` followed by these tokens). ``rope_tables``:
        the forward's shared cos/sin of ``positions`` (a block passes one to all its layers)."""
        c = self.config
        b, length, _ = inputs.shape
        q = self.query(inputs).view(b, length, c.num_heads, c.head_dim)
        k = self.key(inputs).view(b, length, c.num_kv_heads, c.head_dim)
        v = self.value(inputs).view(b, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        tables = rope_tables if rope_tables is not None else RopeTables(positions)
        cos, sin = tables.get(c.head_dim, self.rope_theta, linear_factor=self.rope_linear_factor)
        q, k, _ = qkv_norm_rope(q, k, None, self.query_norm.scale, self.key_norm.scale, positions[..., None],
                                eps=c.rms_norm_eps, base_frequency=self.rope_theta, rope_dtype=inputs.dtype,
                                norm="scale_plus_one", v_norm=False, rope_cos=cos, rope_sin=sin)
        out, cache = decoder_attend(q, k, v, positions, self.attention_type, kv_cache,
                                    scale=c.query_pre_attn_scalar ** -0.5, dropout_p=c.attention_dropout if _dropout_active(self, deterministic) else 0.0,
                                    window=c.sliding_window, segment_ids=segment_ids, image_blocks=image_blocks)
        return self.out(out), cache


class Gemma3DecoderLayer(nn.Module):
    """One Gemma 3 text decoder layer (MaxText ``Gemma3DecoderLayer``; HF ``Gemma3DecoderLayer``):

        h = x + post_self_attention_norm(self_attention(pre_self_attention_norm(x)))
        y = dropout(h + post_ffw_norm(mlp(pre_ffw_norm(h))))

    with Gemma RMSNorms ``x * (1 + w)`` in float32 and the tanh-GeGLU MLP (``wi_0`` gate, ``wi_1`` up,
    ``wo`` down). ``forward(inputs, decoder_segment_ids, decoder_positions, deterministic, model_mode,
    bidirectional_mask=None, kv_cache=None, ...)`` returns ``(output, kv_cache)`` as MaxText's:

    * ``model_mode="train"``: a full-sequence forward; packed sequences attend within their segment
      (``decoder_segment_ids [B, L]``); returns ``(y, None)``.
    * ``"prefill"``: the same, returning the layer's :class:`DecoderKVCache`.
    * ``"autoregressive"``: new tokens after ``kv_cache`` (positions default to following it);
      returns the extended cache. A step's outputs equal a full forward over the same tokens.

    ``bidirectional_mask [B, L]`` (True = image token): tokens of one contiguous image block attend to
    each other both ways (HF's ``token_type_ids``). ``decoder_positions [B, L]``: absolute positions
    (RoPE, causality, window). MaxText's ``previous_chunk``, ``page_state``, ``slot`` and
    ``attention_metadata`` (paged attention) are accepted and must be None."""

    def __init__(self, config: Gemma3DecoderConfig, attention_type: AttentionType = AttentionType.LOCAL_SLIDING, *,
                 device=None, dtype=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        self.config = c
        self.attention_type = attention_type
        self.pre_self_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True, **kw)
        self.self_attention = Gemma3SelfAttention(c, attention_type, **kw)
        self.post_self_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True, **kw)
        self.pre_ffw_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True, **kw)
        self.mlp = GatedMlp(c.hidden_size, c.intermediate_size, c.hidden_activation, c.dropout_rate, **kw)
        self.post_ffw_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True, **kw)

    def forward(self, inputs: torch.Tensor, decoder_segment_ids: torch.Tensor | None = None,
                decoder_positions: torch.Tensor | None = None, deterministic: bool | None = None,
                model_mode: str = "train", previous_chunk=None, page_state=None, slot=None,
                bidirectional_mask: torch.Tensor | None = None, kv_cache: DecoderKVCache | None = None,
                attention_metadata=None, rope_tables: RopeTables | None = None
                ) -> tuple[torch.Tensor, DecoderKVCache | None]:
        check_decoder_call("Gemma3DecoderLayer", inputs, model_mode, kv_cache,
                           hidden_size=self.config.hidden_size, decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions, bidirectional_mask=bidirectional_mask,
                           previous_chunk=previous_chunk, page_state=page_state, slot=slot,
                           attention_metadata=attention_metadata)
        positions = decoder_positions_for(inputs, decoder_positions, kv_cache)
        blocks = None
        if bidirectional_mask is not None:
            blocks = image_block_ids(bidirectional_mask, None if kv_cache is None else kv_cache.image_blocks)
        elif kv_cache is not None and kv_cache.image_blocks is not None:
            blocks = torch.zeros_like(positions)  # text tokens after cached image blocks
        attn, cache = self.self_attention(self.pre_self_attention_norm(inputs), positions,
                                          segment_ids=decoder_segment_ids, image_blocks=blocks, kv_cache=kv_cache,
                                          deterministic=deterministic, rope_tables=rope_tables)
        h = inputs + self.post_self_attention_norm(attn)
        y = h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h), deterministic))
        y = broadcast_dropout(y, self.config.dropout_rate, _dropout_active(self, deterministic))
        return y, (None if model_mode == "train" else cache)


class Gemma3ScannableBlock(nn.Module):
    """``num_of_layers`` decoder layers ``layers_{i}`` with ``get_attention_type(i)`` on the block-local
    index (MaxText ``Gemma3ScannableBlock``: blocks of 6 repeat the 5:1 pattern). ``forward`` takes the
    layer arguments; returns ``y`` (``model_mode="train"``) or ``(y, [per-layer caches])``; with
    ``kv_cache`` (a list, one per layer) it runs the autoregressive step."""

    def __init__(self, config: Gemma3DecoderConfig, num_of_layers: int = 1, *, device=None, dtype=None):
        super().__init__()
        if num_of_layers < 1:
            raise ValueError(f"Gemma3ScannableBlock: num_of_layers must be >= 1, got {num_of_layers}")
        self.config = config
        self.num_of_layers = num_of_layers
        for i in range(num_of_layers):
            self.add_module(f"layers_{i}", Gemma3DecoderLayer(config, get_attention_type(i), device=device,
                                                               dtype=dtype))

    def forward(self, inputs: torch.Tensor, decoder_segment_ids: torch.Tensor | None = None,
                decoder_positions: torch.Tensor | None = None, deterministic: bool | None = None,
                model_mode: str = "train", slot=None, page_state=None, previous_chunk=None,
                bidirectional_mask: torch.Tensor | None = None, kv_cache: list | None = None):
        return run_decoder_layers(self, inputs, model_mode, kv_cache, decoder_positions,
                                  lambda layer, y, cache, positions, tables: layer(
            y, decoder_segment_ids, positions, deterministic, model_mode, previous_chunk, page_state, slot,
            bidirectional_mask, cache, rope_tables=tables))

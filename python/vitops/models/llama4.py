"""Llama 4 vision model as PyTorch modules, mirroring ``maxtext.models.llama4`` (PyTorch form: a
config object instead of config + mesh), with HF ``transformers``' numerics (the reference where
MaxText and HF differ; spec: ``shared/specs/llama4_gemma3_vision.md`` part A and
``facts_transformers_5_18.md``).

Data flow of :class:`Llama4VisionModel` per 336² tile: unfold patches (``patchify`` with
``channels_first``, (c, ph, pw) order) -> linear -> CLS appended last -> + position table ->
LayerNorm -> encoder layers (LayerNorm, attention with the interleaved 2-D RoPE of
``qkv_norm_rope(norm="none", pairing="interleaved")``, LayerNorm, exact-GELU MLP) -> LayerNorm ->
drop CLS -> ``pixel_shuffle`` -> the adapter MLP (GELU after both linears).

Differences from MaxText, all deliberate: a :class:`Llama4VisionConfig` replaces config + mesh;
weights use PyTorch layouts (``nn.Linear`` weights are ``[out, in]``); ``deterministic=None``
follows ``module.training``. The decoder's layer-pattern helpers live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (
    ACTIVATIONS,
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
    rms_norm,
    run_decoder_layers,
)
from ..layers import dropout as _dropout
from ..layers import dropout_active as _dropout_active
from ._hf_config import config_getter, square_side
from ..ops import moe_combine, moe_route, patchify, pixel_shuffle, qkv_norm_rope  # pixel_shuffle: MaxText's function

__all__ = [
    "Llama4DecoderConfig",
    "Llama4DecoderLayer",
    "Llama4MoEBlock",
    "Llama4MultiModalProjector",
    "Llama4ScannableBlock",
    "Llama4TextAttention",
    "Llama4UnfoldConvolution",
    "Llama4VisionConfig",
    "Llama4VisionEncoder",
    "Llama4VisionEncoderLayer",
    "Llama4VisionMLP",
    "Llama4VisionMLP2",
    "Llama4VisionModel",
    "Llama4VisionPixelShuffleMLP",
    "determine_is_moe_layer",
    "determine_is_nope_layer",
    "pixel_shuffle",
    "vision_positions",
]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Llama4VisionConfig:
    """Hyper-parameters of the Llama 4 vision model (+ projector into the text model).

    Defaults are the released Scout / Maverick values (HF's class defaults are not, and are not
    self-consistent). MaxText names in brackets: hidden_size [hidden_size_for_vit], intermediate_size
    [intermediate_size_for_vit], num_layers [num_hidden_layers_for_vit], num_heads
    [num_attention_heads_for_vit], image_size [image_size_for_vit = tile_size_for_vit], patch_size
    [patch_size_for_vit], rope_theta [rope_theta_for_vit], pixel_shuffle_ratio
    [pixel_shuffle_ratio_for_vit], projector_input_dim / projector_output_dim / vision_output_dim
    [..._for_vit], projector_dropout [projector_dropout_for_vit], norm_eps [normalization_layer_epsilon],
    text_hidden_size [base_emb_dim].
    """

    hidden_size: int = 1408
    intermediate_size: int = 5632
    num_layers: int = 34
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    # HF hard-codes nn.LayerNorm's default 1e-5 and ignores its config's norm_eps; MaxText uses
    # normalization_layer_epsilon (1e-5 in the Llama 4 configs)
    norm_eps: float = 1e-5
    text_hidden_size: int | None = 5120

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_heads", "num_channels", "image_size", "patch_size",
                     "projector_input_dim", "projector_output_dim", "vision_output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Llama4VisionConfig: `{name}` must be a positive int, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"Llama4VisionConfig: `num_layers` must be an int >= 0, got {self.num_layers!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"Llama4VisionConfig: hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be a head "
                "dim divisible by 4 (its 2-D RoPE gives each axis half of the complex pairs)")
        if self.image_size % self.patch_size:
            raise ValueError(f"Llama4VisionConfig: image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        n = round(1 / self.pixel_shuffle_ratio) if self.pixel_shuffle_ratio > 0 else 0
        if n < 1 or abs(n * self.pixel_shuffle_ratio - 1) > 1e-12 or self.grid_side % n:
            raise ValueError(
                f"Llama4VisionConfig: pixel_shuffle_ratio ({self.pixel_shuffle_ratio}) must be 1/n with the patch grid "
                f"side ({self.grid_side}) a multiple of n")
        if self.hidden_size * n * n != self.intermediate_size:
            # HF sizes the adapter's fc1 input by intermediate_size; the pixel shuffle produces hidden / r²
            raise ValueError(
                f"Llama4VisionConfig: the pixel-shuffled width hidden_size / pixel_shuffle_ratio**2 = "
                f"{self.hidden_size * n * n} must equal intermediate_size ({self.intermediate_size}), as HF's adapter "
                "assumes")
        if self.projector_input_dim != self.projector_output_dim:
            raise ValueError(
                f"Llama4VisionConfig: projector_input_dim ({self.projector_input_dim}) must equal projector_output_dim "
                f"({self.projector_output_dim}): HF's adapter fc2 takes projector_output_dim inputs")
        for name in ("projector_dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"Llama4VisionConfig: `{name}` must be in [0, 1), got {rate}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile (without CLS)."""
        return self.grid_side**2

    @property
    def tokens_per_tile(self) -> int:
        """Soft tokens per tile after the pixel shuffle (144 for the released models)."""
        n = round(1 / self.pixel_shuffle_ratio)
        return self.num_patches // (n * n)

    def replace(self, **changes) -> "Llama4VisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "Llama4VisionConfig":
        """From an HF ``Llama4Config`` (vision_config + text_config) or ``Llama4VisionConfig`` (object or dict)."""
        get = config_getter(hf_config)
        vision = get("vision_config")
        text = get("text_config")
        v = config_getter(vision if vision is not None else hf_config)
        rope = v("rope_parameters") or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        kwargs = dict(
            hidden_size=v("hidden_size"), intermediate_size=v("intermediate_size"), num_layers=v("num_hidden_layers"),
            num_heads=v("num_attention_heads"), num_channels=v("num_channels"), image_size=_side(v("image_size")),
            patch_size=_side(v("patch_size")), rope_theta=theta if theta is not None else v("rope_theta"),
            pixel_shuffle_ratio=v("pixel_shuffle_ratio"), projector_input_dim=v("projector_input_dim"),
            projector_output_dim=v("projector_output_dim"), vision_output_dim=v("vision_output_dim"),
            projector_dropout=v("projector_dropout"), attention_dropout=v("attention_dropout"),
        )
        kwargs = {k: val for k, val in kwargs.items() if val is not None}
        for name in ("projector_dropout", "attention_dropout", "rope_theta", "pixel_shuffle_ratio"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        kwargs["text_hidden_size"] = config_getter(text)("hidden_size") if text is not None else None
        kwargs.update(overrides)
        return cls(**kwargs)


def _side(size):
    return square_side(size, "Llama4VisionConfig")


# ---------------------------------------------------------------------------------------------
# Layer-pattern helpers of the decoder (MaxText semantics)
# ---------------------------------------------------------------------------------------------
def determine_is_nope_layer(layer_id: int, nope_layer_interval: int | None) -> bool:
    """True if the 0-based layer ``layer_id`` uses no RoPE (NoPE): every ``nope_layer_interval``-th
    layer, i.e. ``(layer_id + 1) % interval == 0`` (interval 4: layers 3, 7, 11, ...). None or an
    interval <= 0 means no NoPE layer (MaxText's ``base.yml`` default is -1). The polarity is the
    inverse of HF's ``no_rope_layers[i]`` (1 = RoPE)."""
    return nope_layer_interval is not None and nope_layer_interval > 0 and (layer_id + 1) % nope_layer_interval == 0


def determine_is_moe_layer(layer_id: int, interleave_moe_layer_step: int | None) -> bool:
    """True if the 0-based layer ``layer_id`` is an MoE layer: step 1 makes every layer MoE, step 2
    layers 1, 3, 5, ... (``(layer_id + 1) % step == 0``, HF's ``range(step - 1, L, step)``). None or a
    step <= 0 means no MoE layer (HF raises instead)."""
    return (interleave_moe_layer_step is not None and interleave_moe_layer_step > 0
            and (layer_id + 1) % interleave_moe_layer_step == 0)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def vision_positions(grid_side: int, device=None) -> torch.Tensor:
    """The 2-D RoPE coordinates of a tile's tokens ``[side² + 1, 2]`` int32: 1-based (column, row)
    of each patch, row-major, then (0, 0) for the CLS token (angle 0: unrotated, as HF masks its
    frequencies)."""
    idx = torch.arange(grid_side * grid_side, device=device, dtype=torch.int32)
    pos = torch.stack([idx % grid_side + 1, idx // grid_side + 1], dim=-1)
    return torch.cat([pos, torch.zeros(1, 2, dtype=torch.int32, device=device)])


class Llama4UnfoldConvolution(nn.Module):
    """Patch embedding: unfold the NCHW tile into (channel, row, col) patches, then a bias-free linear
    (HF ``patch_embedding``; MaxText ``vit_unfold_linear``)."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.patch_size = config.patch_size
        self.vit_unfold_linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False,
                                           device=device, dtype=dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [B, C, H, W]`` -> ``[B, (H/p)(W/p), D]``."""
        patches, _ = patchify(inputs, self.patch_size, channels_first=True)
        return self.vit_unfold_linear(patches)


class Llama4VisionMLP(nn.Module):
    """Encoder MLP: ``fc2(gelu(fc1(x)))`` with biases and the exact (erf) GELU."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.vit_encoder_layer_mlp_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.vit_encoder_layer_mlp_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.vit_encoder_layer_mlp_fc2(F.gelu(self.vit_encoder_layer_mlp_fc1(h)))


class Llama4VisionMLP2(nn.Module):
    """Adapter MLP: ``gelu(fc2(dropout(gelu(fc1(x)))))``, bias-free, exact GELU after both linears."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.dropout_rate = config.projector_dropout
        self.vit_pixel_shuffle_mlp_fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False,
                                                   **kw)
        self.vit_pixel_shuffle_mlp_fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim,
                                                   bias=False, **kw)

    def forward(self, h: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        h = F.gelu(self.vit_pixel_shuffle_mlp_fc1(h))
        h = _dropout(h, self.dropout_rate, _dropout_active(self, deterministic))
        return F.gelu(self.vit_pixel_shuffle_mlp_fc2(h))


class Llama4VisionPixelShuffleMLP(nn.Module):
    """``pixel_shuffle`` then :class:`Llama4VisionMLP2` (HF ``vision_adapter``)."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.pixel_shuffle_mlp = Llama4VisionMLP2(config, device=device, dtype=dtype)

    def forward(self, encoded_patches: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        return self.pixel_shuffle_mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio), deterministic)


class Llama4MultiModalProjector(nn.Module):
    """Into the text model: a bias-free linear ``vision_output_dim -> text_hidden_size``;
    ``[b, t, c, d]`` (or any leading dims) in, ``[b, t, c, text_hidden_size]`` out."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        if config.text_hidden_size is None:
            raise ValueError("Llama4MultiModalProjector needs config.text_hidden_size (the text model's hidden size)")
        self.vit_multi_modal_projector = nn.Linear(config.vision_output_dim, config.text_hidden_size, bias=False,
                                                   device=device, dtype=dtype)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.vit_multi_modal_projector(image_features)


class Llama4VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and Llama 4's 2-D RoPE (interleaved complex
    pairs, the first half of the pairs by the column, the second by the row, float32 cos/sin), scale
    head_dim^-0.5, SDPA."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.dropout_rate = config.attention_dropout
        self.query = nn.Linear(d, d, **kw)
        self.key = nn.Linear(d, d, **kw)
        self.value = nn.Linear(d, d, **kw)
        self.out = nn.Linear(d, d, **kw)

    def forward(self, inputs_q: torch.Tensor, positions: torch.Tensor, deterministic: bool | None = None
                ) -> torch.Tensor:
        """``inputs_q [B, L, D]``, ``positions [B, L, 2]`` (:func:`vision_positions`)."""
        b, length, _ = inputs_q.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q, k, v = (proj(inputs_q).view(shape) for proj in (self.query, self.key, self.value))
        # HF rotates in float32 with float32 cos/sin and rounds once (vision_apply_rotary_emb). v is
        # not transformed: SDPA reads its projection view (as HF's value_states.transpose(1, 2)), so
        # the op skips it
        q, k, _ = qkv_norm_rope(q, k, None, None, None, positions, base_frequency=self.rope_theta,
                                rope_dtype=torch.float32, norm="none", v_norm=False, pairing="interleaved")
        v = v.transpose(1, 2)
        active = _dropout_active(self, deterministic)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_rate if active else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, length, -1))


class Llama4VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm block: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, **kw)
        self.self_attention_vision = Llama4VisionAttention(config, **kw)
        self.post_attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, **kw)
        self.mlp = Llama4VisionMLP(config, **kw)

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor, deterministic: bool | None = None
                ) -> torch.Tensor:
        h = hidden_states + self.self_attention_vision(self.input_layer_norm(hidden_states), positions, deterministic)
        return h + self.mlp(self.post_attention_layer_norm(h))


class Llama4VisionEncoder(nn.Module):
    """The encoder layers ``layers_{i}`` (MaxText's names)."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.num_layers = config.num_layers
        for i in range(config.num_layers):
            self.add_module(f"layers_{i}", Llama4VisionEncoderLayer(config, device=device, dtype=dtype))

    @property
    def layers(self) -> list[Llama4VisionEncoderLayer]:
        return [getattr(self, f"layers_{i}") for i in range(self.num_layers)]

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor, deterministic: bool | None = None
                ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions, deterministic)
        return hidden_states


class Llama4VisionModel(nn.Module):
    """The Llama 4 vision model (HF ``Llama4VisionModel``): tiles ``[b, t, C, H, W]`` -> ``[b, t, 144,
    vision_output_dim]`` (MaxText), or HF's ``[B, C, H, W]`` -> ``[B, 144, vision_output_dim]``."""

    def __init__(self, config: Llama4VisionConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        d = config.hidden_size
        self.unfold_convolution = Llama4UnfoldConvolution(config, **kw)
        scale = d**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(d, device=device, dtype=dtype))
        self.positional_embedding_vlm = nn.Parameter(scale * torch.randn(config.num_patches + 1, d, device=device,
                                                                         dtype=dtype))
        self.layernorm_pre = nn.LayerNorm(d, eps=config.norm_eps, **kw)
        self.layernorm_post = nn.LayerNorm(d, eps=config.norm_eps, **kw)
        self.encoder = Llama4VisionEncoder(config, **kw)
        self.pixel_shuffle_mlp = Llama4VisionPixelShuffleMLP(config, **kw)

    def positions(self, batch: int, device) -> torch.Tensor:
        """The tokens' RoPE coordinates ``[batch, side² + 1, 2]`` (:func:`vision_positions`; made per call,
        not a buffer, so that a module loaded from the meta device has no tensor left without data)."""
        return vision_positions(self.config.grid_side, device).expand(batch, -1, -1)

    def encode(self, tiles: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        """``[B, C, H, W]`` tiles -> the encoder output after ``layernorm_post``, ``[B, side² + 1, D]``
        (CLS last)."""
        c = self.config
        if tiles.dim() != 4 or tiles.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(
                f"Llama4VisionModel: tiles must be [B, {c.num_channels}, {c.image_size}, {c.image_size}] (NCHW), got "
                f"shape {tuple(tiles.shape)}")
        x = self.unfold_convolution(tiles.to(self.unfold_convolution.vit_unfold_linear.weight.dtype))
        # HF's dtype flow: the CLS row joins in torch.cat's promoted dtype (under autocast the bf16
        # patch rows meet the float32 parameter: float32), then the table is cast to that dtype
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        x = self.encoder(x, self.positions(x.shape[0], x.device), deterministic)
        return self.layernorm_post(x)

    def forward(self, pixel_values: torch.Tensor, output_attentions=None, output_hidden_states=None,
                return_dict=None, deterministic: bool | None = None) -> torch.Tensor:
        """``pixel_values [b, t, C, H, W]`` -> ``[b, t, 144, vision_output_dim]``; ``[B, C, H, W]`` ->
        ``[B, 144, vision_output_dim]``. ``output_attentions`` / ``output_hidden_states`` /
        ``return_dict`` are MaxText's signature and must stay unset (SDPA computes no attention maps)."""
        if output_attentions or output_hidden_states or return_dict:
            raise NotImplementedError("Llama4VisionModel returns the adapter output only (MaxText's tensor result)")
        if pixel_values.dim() not in (4, 5):
            raise ValueError(f"Llama4VisionModel: pixel_values must be [b, t, C, H, W] or [B, C, H, W], got shape "
                             f"{tuple(pixel_values.shape)}")
        tiles = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        x = self.encode(tiles, deterministic)[:, :-1]  # drop CLS
        out = self.pixel_shuffle_mlp(x, deterministic)
        return out.unflatten(0, pixel_values.shape[:2]) if pixel_values.dim() == 5 else out


# ---------------------------------------------------------------------------------------------
# Text decoder (MaxText Llama4DecoderLayer / Llama4ScannableBlock; HF Llama4TextDecoderLayer's math)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Llama4DecoderConfig:
    """Hyper-parameters of the Llama 4 text decoder layers. Defaults: Scout 17B-16E (Maverick:
    ``num_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None``).
    ``rope_scaling``: HF's llama3 dict (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``) or None. MaxText hard-codes the temperature tuning's
    ``attn_scale`` 0.1 and ``floor_scale`` 8192; HF reads them from its config, as here."""

    hidden_size: int = 5120
    intermediate_size: int = 8192  # every expert and the shared expert
    intermediate_size_mlp: int = 16384  # the dense layers
    num_heads: int = 40
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = dataclasses.field(default_factory=lambda: dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
    num_experts: int = 16
    use_qk_norm: bool = True
    attention_chunk_size: int = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    nope_layer_interval: int | None = 4
    interleave_moe_layer_step: int | None = 1
    hidden_act: str = "silu"
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        check_attention_heads("Llama4DecoderConfig", self.num_heads, self.num_kv_heads, self.head_dim)
        if self.attention_chunk_size < 1:
            raise ValueError(f"Llama4DecoderConfig: attention_chunk_size must be >= 1, got {self.attention_chunk_size}")
        if self.num_experts < 1:
            raise ValueError(f"Llama4DecoderConfig: num_experts must be >= 1, got {self.num_experts}")

    def replace(self, **changes) -> "Llama4DecoderConfig":
        return dataclasses.replace(self, **changes)


class Llama4TextAttention(nn.Module):
    """Llama 4 text self-attention (MaxText ``Attention`` of ``Llama4DecoderLayer``): bias-free
    ``query``/``key``/``value``/``out``, GQA, logit scale ``head_dim ** -0.5``.

    * RoPE layers: interleaved complex-pair RoPE of q and k in float32 with llama3-scaled
      frequencies, then (``use_qk_norm``) the weightless L2 norm of the rotated rows (HF order; it
      does not commute bitwise): one ``qkv_norm_rope`` call (``pairing="interleaved"``,
      ``norm_after_rope=True``) reading the forward's shared cos/sin (:class:`RopeTables`); chunked
      causal attention.
    * NoPE layers: no RoPE, no q/k norm; with ``attn_temperature_tuning`` q is scaled by
      ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` in float32 on the absolute positions
      (MaxText's ``decoder_positions``; HF's cache positions, equal without left padding), the op's
      ``q_scale`` with ``pairing="none"``; full causal attention."""

    def __init__(self, config: Llama4DecoderConfig, is_nope_layer: bool = False, *, device=None, dtype=None):
        super().__init__()
        c = config
        self.config = c
        self.is_nope_layer = is_nope_layer
        self.use_qk_norm = c.use_qk_norm and not is_nope_layer
        self.attention_type = AttentionType.GLOBAL if is_nope_layer else AttentionType.CHUNK
        kw = dict(device=device, dtype=dtype)
        self.query = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False, **kw)
        self.key = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False, **kw)
        self.value = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False, **kw)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, **kw)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                kv_cache: DecoderKVCache | None = None, deterministic: bool | None = None,
                rope_tables: RopeTables | None = None) -> tuple[torch.Tensor, DecoderKVCache]:
        c = self.config
        b, length, _ = inputs.shape
        q = self.query(inputs).view(b, length, c.num_heads, c.head_dim)
        k = self.key(inputs).view(b, length, c.num_kv_heads, c.head_dim)
        v = self.value(inputs).view(b, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if not self.is_nope_layer:
            # interleaved RoPE in float32 (HF's complex product), then the weightless L2 norm of the
            # rotated rows (HF's Llama4TextL2Norm after apply_rotary_emb), in one op
            tables = rope_tables if rope_tables is not None else RopeTables(positions)
            cos, sin = tables.get(c.head_dim, c.rope_theta, llama3_scaling=c.rope_scaling)
            q, k, _ = qkv_norm_rope(q, k, None, None, None, positions[..., None], eps=c.rms_norm_eps,
                                    base_frequency=c.rope_theta, rope_dtype=torch.float32,
                                    norm="rms" if self.use_qk_norm else "none", v_norm=False, pairing="interleaved",
                                    rope_cos=cos, rope_sin=sin, norm_after_rope=True)
        else:
            scale = None
            if c.attn_temperature_tuning:  # HF's float32 temperature of the absolute positions
                scale = torch.log1p(torch.floor((positions.float() + 1.0) / c.floor_scale)) * c.attn_scale + 1.0
            q, k, _ = qkv_norm_rope(q, k, None, None, None, positions[..., None], norm="none", v_norm=False,
                                    pairing="none", q_scale=scale)
        out, cache = decoder_attend(q, k, v, positions, self.attention_type, kv_cache, scale=c.head_dim ** -0.5,
                                    dropout_p=c.attention_dropout if _dropout_active(self, deterministic) else 0.0,
                                    chunk=c.attention_chunk_size, segment_ids=segment_ids)
        return self.out(out), cache


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is enabled for ``device_type``, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class Llama4MoEBlock(nn.Module):
    """Llama 4's routed + shared MoE (MaxText ``RoutedAndSharedMoE``, HF ``Llama4TextMoe``): the top-1
    router ``gate`` (bias-free ``[E, H]``), the sigmoid of the selected logit (float32, rounded to the
    activation dtype) scaling the expert's *input*, experts ``wi [E, H, 2I]`` (gate columns first,
    then up: HF's ``gate_up_proj``) and ``wo [E, I, H]`` used as ``x @ W``, SwiGLU ``up * silu(gate)``,
    plus ``shared_experts`` (a SwiGLU MLP) on every token.

    Each token runs only its selected expert: exact, because HF's unselected experts get an all-zero
    input and, with no bias and silu(0) * 0 = 0, contribute exact zeros. ``vitops.moe_route`` picks the
    experts, scales the rows and buckets them by expert (a stable counting sort, no host sync);
    ``vitops.moe_combine`` scatters the experts' rows back onto the shared expert's output. The
    experts run over their buckets as two grouped GEMMs (``torch.nn.functional.grouped_mm`` with the
    bucket ends as a device tensor); on the CPU in bf16 / fp16 as two batched GEMMs over the buckets
    padded to the largest; for float64 / unaligned widths as one GEMM per expert (bucket ends read on
    the host); under torch.compile every expert runs on every bucketed row, each row keeping its own
    expert's result (E x the FLOPs, as HF, but no data-dependent shapes). Ties between router logits
    go to the lowest expert index (HF's ``topk`` leaves them unspecified)."""

    def __init__(self, config: Llama4DecoderConfig, *, device=None, dtype=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        self.num_experts = c.num_experts
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False, **kw)
        self.wi = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, 2 * c.intermediate_size, **kw))
        self.wo = nn.Parameter(torch.empty(c.num_experts, c.intermediate_size, c.hidden_size, **kw))
        nn.init.normal_(self.wi, std=c.hidden_size ** -0.5)
        nn.init.normal_(self.wo, std=c.intermediate_size ** -0.5)
        self.shared_experts = GatedMlp(c.hidden_size, c.intermediate_size, c.hidden_act, c.dropout_rate, **kw)
        self.activation = c.hidden_act

    def _expert(self, x: torch.Tensor, e, wi: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ wi[e]).chunk(2, dim=-1)
        return (up * ACTIVATIONS[self.activation](gate)) @ wo[e]

    def _grouped_gemm_ok(self, x: torch.Tensor) -> bool:
        # torch's grouped GEMM takes float32 / bf16 / fp16 with row strides a multiple of 16 bytes.
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not hasattr(F, "grouped_mm"):
            return False
        align = 16 // x.element_size()
        return all(n % align == 0 for n in (self.wi.shape[1], self.wi.shape[2], self.wo.shape[1], self.wo.shape[2]))

    def _routed_experts(self, routed: torch.Tensor, expert_ends: torch.Tensor, wi: torch.Tensor,
                        wo: torch.Tensor) -> torch.Tensor:
        """The experts over their own tokens only (``routed``'s rows bucketed by expert, ascending;
        ``expert_ends`` the int32 bucket ends); ``wi`` / ``wo``: the expert weights in the compute
        dtype."""
        if routed.device.type == "cpu" and routed.dtype in (torch.bfloat16, torch.float16) and routed.shape[0]:
            return self._padded_batched_experts(routed, expert_ends, wi, wo)
        if self._grouped_gemm_ok(routed):
            return self._grouped_experts(routed, expert_ends, wi, wo)
        # float64 or unaligned widths: one GEMM per expert, the bucket ends read on the host.
        pieces, start = [], 0
        for e, end in enumerate(expert_ends.tolist()):
            if end > start:
                pieces.append(self._expert(routed[start:end], e, wi, wo))
            start = end
        return torch.cat(pieces) if pieces else routed.new_zeros(routed.shape)

    def _grouped_experts(self, routed: torch.Tensor, expert_ends: torch.Tensor, wi: torch.Tensor,
                         wo: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM per projection; the group ends are a device tensor, so no host sync."""
        gate, up = F.grouped_mm(routed, wi, offs=expert_ends).chunk(2, dim=-1)
        return F.grouped_mm((up * ACTIVATIONS[self.activation](gate)).contiguous(), wo, offs=expert_ends)

    @staticmethod
    def _expert_of_row(expert_ends: torch.Tensor, rows: int) -> torch.Tensor:
        """The expert of each bucketed row, from the bucket ends."""
        return torch.bucketize(torch.arange(rows, device=expert_ends.device), expert_ends.long(), right=True)

    def _padded_batched_experts(self, routed: torch.Tensor, expert_ends: torch.Tensor, wi: torch.Tensor,
                                wo: torch.Tensor) -> torch.Tensor:
        """CPU bf16 / fp16: the buckets padded to the largest (its size read on the host, which costs
        nothing on the CPU) and the experts run as two batched GEMMs. On CPUs with bf16 matrix units
        a batched GEMM over [E, largest bucket, H] runs at the dense rate where grouped_mm's ~32-row
        groups run at a third of it (benchmarks/NOTES.md entry 18); padded rows are zeros and stay
        zeros (no bias, silu(0) * 0 = 0), and the rows are gathered back unchanged."""
        ends = expert_ends.long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        expert_of_row = self._expert_of_row(expert_ends, routed.shape[0])
        place = torch.arange(routed.shape[0], device=routed.device) - (ends - counts)[expert_of_row]
        padded = routed.new_zeros(self.num_experts, int(counts.max()), routed.shape[1])
        padded[expert_of_row, place] = routed
        gate, up = torch.bmm(padded, wi).chunk(2, dim=-1)
        return torch.bmm(up * ACTIVATIONS[self.activation](gate), wo)[expert_of_row, place]

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # top-1 expert, sigmoid score scaling the expert input, tokens bucketed by expert (stable)
        logits = self.gate(flat)
        routed, _, token_order, token_slot, expert_ends = moe_route(flat, logits)
        wi, wo = self.wi, self.wo
        if logits.dtype != flat.dtype:
            # autocast (the router Linear ran in the autocast dtype while x is the float32 residual):
            # HF's router_scores are in the logits' dtype (sigmoid in float32, rounded) and scale x in
            # the promoted dtype; the op rounds the score to x's dtype, so the scaling is redone here
            # (the routing itself is the op's). The selected logit alone gets a gradient, as HF's.
            expert = self._expert_of_row(expert_ends, routed.shape[0])[token_slot]
            score = torch.sigmoid(logits.gather(1, expert[:, None]).float()).to(logits.dtype)
            routed = (flat * score)[token_order]
        compute_dtype = _autocast_dtype(flat.device.type)
        if compute_dtype is not None:
            # what autocast does to HF's expert bmm operands (grouped_mm is not on autocast's list)
            routed, wi, wo = routed.to(compute_dtype), wi.to(compute_dtype), wo.to(compute_dtype)
        if torch.compiler.is_compiling():
            # torch.compile traces neither the host-read bucket ends nor (on the CPU, float32)
            # grouped_mm: every expert runs on every bucketed row instead, each row keeping its own
            # expert's result (the same values: rows are independent; E x the FLOPs, as HF)
            expert_of_row = self._expert_of_row(expert_ends, routed.shape[0])
            expert_out = torch.zeros_like(routed)
            for e in range(self.num_experts):
                expert_out = torch.where((expert_of_row == e)[:, None], self._expert(routed, e, wi, wo), expert_out)
        else:
            expert_out = self._routed_experts(routed, expert_ends, wi, wo)
        # the inverse scatter, added to the shared expert's output (HF's out.add_(routed_out))
        out = moe_combine(self.shared_experts(flat, deterministic), expert_out, token_slot, token_order)
        return out.view(shape)


class Llama4DecoderLayer(nn.Module):
    """One Llama 4 text decoder layer (MaxText ``Llama4DecoderLayer(config, is_nope_layer,
    is_moe_layer)``; HF ``Llama4TextDecoderLayer``):

        h = x + self_attention(pre_self_attention_layer_norm(x))
        y = dropout(h + ffn(post_self_attention_layer_norm(h)))

    with Llama-order RMSNorms (normalised in float32, cast, then ``* w``), ``ffn`` the MoE block
    (``Llama4MoEBlock_0``, the ``moe_block`` property) or a dense SwiGLU ``mlp``
    (``intermediate_size_mlp``). The call form and model modes are :class:`Gemma3DecoderLayer`'s
    (train / prefill / autoregressive with a :class:`DecoderKVCache`, segment ids), returning
    ``(output, kv_cache)``."""

    def __init__(self, config: Llama4DecoderConfig, is_nope_layer: bool = False, is_moe_layer: bool = False, *,
                 device=None, dtype=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        self.config = c
        self.is_nope_layer = is_nope_layer
        self.is_moe_layer = is_moe_layer
        self.pre_self_attention_layer_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attention = Llama4TextAttention(c, is_nope_layer, **kw)
        self.post_self_attention_layer_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        if is_moe_layer:
            self.Llama4MoEBlock_0 = Llama4MoEBlock(c, **kw)
        else:
            self.mlp = GatedMlp(c.hidden_size, c.intermediate_size_mlp, c.hidden_act, c.dropout_rate, **kw)

    @property
    def moe_block(self) -> "Llama4MoEBlock | None":
        return self.Llama4MoEBlock_0 if self.is_moe_layer else None

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm.scale, norm.eps, "scale_after_cast")

    def forward(self, inputs: torch.Tensor, decoder_segment_ids: torch.Tensor | None = None,
                decoder_positions: torch.Tensor | None = None, deterministic: bool | None = None,
                model_mode: str = "train", previous_chunk=None, slot=None, kv_cache: DecoderKVCache | None = None,
                attention_metadata=None, rope_tables: RopeTables | None = None
                ) -> tuple[torch.Tensor, DecoderKVCache | None]:
        check_decoder_call("Llama4DecoderLayer", inputs, model_mode, kv_cache,
                           hidden_size=self.config.hidden_size, decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions, previous_chunk=previous_chunk, slot=slot,
                           attention_metadata=attention_metadata)
        positions = decoder_positions_for(inputs, decoder_positions, kv_cache)
        attn, cache = self.self_attention(self._norm(self.pre_self_attention_layer_norm, inputs), positions,
                                          segment_ids=decoder_segment_ids, kv_cache=kv_cache,
                                          deterministic=deterministic, rope_tables=rope_tables)
        h = inputs + attn
        ffn = self.Llama4MoEBlock_0 if self.is_moe_layer else self.mlp
        y = h + ffn(self._norm(self.post_self_attention_layer_norm, h), deterministic)
        y = broadcast_dropout(y, self.config.dropout_rate, _dropout_active(self, deterministic))
        return y, (None if model_mode == "train" else cache)


class Llama4ScannableBlock(nn.Module):
    """Layers ``layers_{j}`` with :func:`determine_is_nope_layer` / :func:`determine_is_moe_layer` on
    the block-local ``j`` (MaxText ``Llama4ScannableBlock(config, nope_layer_interval,
    interleave_moe_layer_step)``; MaxText's constructor defaults (1, 1) make every layer NoPE and
    MoE, as here). ``num_of_layers``: the block length (default: the least common multiple of the two
    intervals, MaxText's ``inhomogeneous_layer_cycle_interval`` (4 for the released models); the
    whole decoder for a full stack). Returns ``y`` (train) or ``(y, [per-layer caches])``."""

    def __init__(self, config: Llama4DecoderConfig, nope_layer_interval: int | None = 1,
                 interleave_moe_layer_step: int | None = 1, num_of_layers: int | None = None, *, device=None,
                 dtype=None):
        super().__init__()
        import math

        if num_of_layers is None:
            steps = [s for s in (nope_layer_interval, interleave_moe_layer_step) if s is not None and s > 0]
            num_of_layers = math.lcm(*steps) if steps else 1
        if num_of_layers < 1:
            raise ValueError(f"Llama4ScannableBlock: num_of_layers must be >= 1, got {num_of_layers}")
        self.config = config
        self.num_of_layers = num_of_layers
        for j in range(num_of_layers):
            self.add_module(f"layers_{j}", Llama4DecoderLayer(
                config, determine_is_nope_layer(j, nope_layer_interval),
                determine_is_moe_layer(j, interleave_moe_layer_step), device=device, dtype=dtype))

    def forward(self, inputs: torch.Tensor, decoder_segment_ids: torch.Tensor | None = None,
                decoder_positions: torch.Tensor | None = None, deterministic: bool | None = None,
                model_mode: str = "train", previous_chunk=None, slot=None, kv_cache: list | None = None):
        return run_decoder_layers(self, inputs, model_mode, kv_cache, decoder_positions,
                                  lambda layer, y, cache, positions, tables: layer(
            y, decoder_segment_ids, positions, deterministic, model_mode, previous_chunk, slot, cache,
            rope_tables=tables))

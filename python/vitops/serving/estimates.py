"""Memory estimates for serving the vision towers, from an HF config (MAX's planner functions).

* :func:`estimate_vision_cache_entry_bytes`: the bytes of one image's soft tokens in the worst case,
  what a :class:`vitops.serving.VisionEncoderCache` entry holds (``[tokens, text hidden]``);
  :func:`vision_cache_entry_shape` gives the ``(tokens, hidden)`` row shape behind it.
* :func:`estimate_activation_memory`: the peak memory of encoding ``batch`` worst-case images with
  the vitops tower + projector in inference, beyond the weights and the input pixels.

Each reads an HF config of any of the three families (``Gemma4Config``, ``Gemma3Config`` /
``SiglipVisionConfig``, ``Llama4Config``: an object, its ``to_dict()``, a ``config.json`` path or a
checkpoint directory) through the family's reader (``vitops.hf.<family>.config_from_hf``), or a
vitops config (``Gemma4VisionConfig``, ``Gemma3VisionConfig``, ``Llama4VisionConfig``).

Worst cases (the facts file's table, MAX's formula for Gemma 4):

* Gemma 4: ``position_embedding_size // pooling_kernel_size**2`` tokens (1137 for the released
  configs, above the processor's largest budget of 1120), or ``max_soft_tokens`` when given;
* Gemma 3: ``mm_tokens_per_image`` (256) per image or pan-and-scan crop (each is an image of its own);
* Llama 4: ``max_tiles`` local tiles (the processor's ``max_patches``, 16) plus the global tile, of
  ``(image_size / patch_size)**2 * pixel_shuffle_ratio**2`` tokens (144) each.

The activation model follows the towers' code (``vitops.models``) tensor by tensor: which outputs are
alive together at each step of a block (the residual stream and the block's input, the norms' float32
temporaries, q/k/v before and after the fused norm + RoPE op, the attention output, the MLP
intermediates, clipped linears' clamped copies) and the entry, exit and projector around the blocks;
the estimate is the largest of those live sets. It assumes a fused attention kernel (SDPA's CPU flash
kernel, CUDA flash or memory-efficient attention: no ``L x L`` score matrix); SDPA's math fallback
(float64 on CUDA, bfloat16 on GPUs older than sm80) materialises ``B x heads x L x L`` scores and
needs more. Against the peak of live tensors measured during the forward on the CPU
(tests/test_serving_estimates.py) the estimate is 1.000 to 1.028 times it on seeded small configs of
the three families (every dtype, clipped linears, GQA, every activation, pooling 1 to 3, 0 to 2
layers) and 1.0000 to 1.0003 at the released widths and lengths; kernel-internal scratch (SDPA's
per-thread blocks on the CPU) is not in either number.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ..layers import ACTIVATIONS, acc_dtype
from ..models._hf_config import config_getter

__all__ = ["estimate_activation_memory", "estimate_vision_cache_entry_bytes", "vision_cache_entry_shape"]

# Llama 4's processor: at most 16 local tiles (HF's max_patches), plus the global tile.
LLAMA4_MAX_TILES = 16

# The processors' pixel dtypes (vitops.preprocess, as HF's): the towers cast them to their weights' dtype.
_PIXEL_DTYPES = {"gemma4": torch.float32, "gemma3": torch.float32, "llama4": torch.bfloat16}

# Peak of an activation call in units of its output size, the input included (the argument is alive
# while it runs): one fused kernel holds input + output; HF's Python tanh formulas (vitops.layers.
# ACTIVATIONS, computed as HF writes them) hold more temporaries at once.
_ACTIVATION_PEAK = {"gelu_pytorch_tanh": 2, "gelu": 2, "silu": 2, "gelu_new": 4, "gelu_python_tanh": 4,
                    "gelu_fast": 5}
assert set(_ACTIVATION_PEAK) == set(ACTIVATIONS)


# ---------------------------------------------------------------------------------------------
# Reading the config
# ---------------------------------------------------------------------------------------------
_FAMILY_OF_MODEL_TYPE = {"gemma4": "gemma4", "gemma4_vision": "gemma4", "gemma3": "gemma3",
                         "siglip_vision_model": "gemma3", "llama4": "llama4", "llama4_vision_model": "llama4"}
_VITOPS_CONFIGS = {("vitops.models.gemma4_vision", "Gemma4VisionConfig"): "gemma4",
                   ("vitops.models.gemma3", "Gemma3VisionConfig"): "gemma3",
                   ("vitops.models.llama4", "Llama4VisionConfig"): "llama4"}


def _vitops_config(config: Any) -> str | None:
    """The family of a vitops config dataclass, None for anything else."""
    if not dataclasses.is_dataclass(config):
        return None
    key = (type(config).__module__, type(config).__name__)
    family = _VITOPS_CONFIGS.get(key)
    return family if family is not None and isinstance(config, getattr(sys.modules[key[0]], key[1])) else None


def _read(hf_config: Any) -> tuple[str, Any]:
    """``(family, vitops config)`` of an HF config (object, dict, path) or a vitops config."""
    family = _vitops_config(hf_config)
    if family is not None:
        return family, hf_config
    from ..hf._checkpoint import read_config

    data = read_config(hf_config)
    if data is None or not (isinstance(data, dict) or hasattr(data, "model_type")):
        raise TypeError(f"hf_config must be an HF config (object, dict, config.json path or directory) or a vitops "
                        f"vision config, got {type(hf_config).__name__}")
    get = config_getter(data)
    vision_type = config_getter(get("vision_config"))("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(get("model_type")) or _FAMILY_OF_MODEL_TYPE.get(vision_type)
    if family is None:
        raise ValueError(f"hf_config: unsupported model_type {get('model_type')!r} (vision_config model_type "
                         f"{vision_type!r}); expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}")
    if family == "gemma4":
        # MAX raises when either sub-config is missing (a text/audio-only Gemma 4 has no vision_config)
        if get("model_type") == "gemma4" and get("vision_config") is None:
            raise ValueError("hf_config: this Gemma 4 config has no vision_config (a text/audio-only model)")
        from ..hf.gemma4 import config_from_hf
    elif family == "gemma3":
        from ..hf.gemma3 import config_from_hf
    else:
        from ..hf.llama4 import config_from_hf
    return family, config_from_hf(data)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_dtype(name: str, dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`{name}` must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


def _family_options(family: str, max_soft_tokens: int | None, max_tiles: int | None) -> tuple[int | None, int]:
    """The Gemma 4 budget and the Llama 4 tile count, each accepted only by its family."""
    if max_soft_tokens is not None:
        if family != "gemma4":
            raise ValueError(f"`max_soft_tokens` is Gemma 4's per-image budget; this is a {family} config")
        _check_int("max_soft_tokens", max_soft_tokens, 1)
    if max_tiles is not None:
        if family != "llama4":
            raise ValueError(f"`max_tiles` is Llama 4's tile count; this is a {family} config")
        _check_int("max_tiles", max_tiles, 1)
    return max_soft_tokens, LLAMA4_MAX_TILES if max_tiles is None else max_tiles


def _gemma4_tokens(config, max_soft_tokens: int | None) -> int:
    if max_soft_tokens is not None:
        return max_soft_tokens
    # MAX's bound: as many patches as the position table has rows, pooled k x k
    return config.position_embedding_size // config.pooling_kernel_size**2


def _llama4_tiles(max_tiles: int) -> int:
    """Tiles of a worst-case image: ``max_tiles`` local tiles, plus the global one when there is more than one."""
    return max_tiles + 1 if max_tiles > 1 else 1


def _text_hidden(family: str, config) -> int:
    if config.text_hidden_size is None:
        raise ValueError(f"hf_config: the soft tokens' width is the text model's hidden size, and this {family} "
                         "config has no text_config")
    return config.text_hidden_size


# ---------------------------------------------------------------------------------------------
# Cache entries
# ---------------------------------------------------------------------------------------------
def vision_cache_entry_shape(hf_config: Any, *, max_soft_tokens: int | None = None,
                             max_tiles: int | None = None) -> tuple[int, int]:
    """``(tokens, hidden)``: the soft-token rows of one worst-case image (MAX's vision-cache row spec).

    ``max_soft_tokens`` (Gemma 4 only) replaces the bound ``position_embedding_size //
    pooling_kernel_size**2`` with a budget (70 ... 1120); ``max_tiles`` (Llama 4 only, default 16)
    is the processor's most local tiles. Raises ``ValueError`` when the config has no
    ``vision_config`` or ``text_config`` (MAX's behaviour)."""
    family, config = _read(hf_config)
    max_soft_tokens, max_tiles = _family_options(family, max_soft_tokens, max_tiles)
    hidden = _text_hidden(family, config)
    if family == "gemma4":
        tokens = _gemma4_tokens(config, max_soft_tokens)
    elif family == "gemma3":
        tokens = config.mm_tokens_per_image
    else:
        tokens = _llama4_tiles(max_tiles) * config.tokens_per_tile
    return tokens, hidden


def estimate_vision_cache_entry_bytes(hf_config: Any, dtype: torch.dtype = torch.bfloat16, *,
                                      max_soft_tokens: int | None = None, max_tiles: int | None = None) -> int:
    """Bytes of one worst-case image's soft tokens in ``dtype``: ``tokens * text hidden * itemsize``
    (:func:`vision_cache_entry_shape`). Released configs in bfloat16: Gemma 4 E2B 3,492,864, E4B
    5,821,440, 26B-A4B 6,403,584, 31B 12,225,024 (1137 tokens); Gemma 3 4B 1,310,720, 12B 1,966,080,
    27B 2,752,512; Llama 4 Scout / Maverick 25,067,520 (17 tiles of 144 tokens)."""
    _check_dtype("dtype", dtype)
    tokens, hidden = vision_cache_entry_shape(hf_config, max_soft_tokens=max_soft_tokens, max_tiles=max_tiles)
    return tokens * hidden * dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Activation memory
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Sizes:
    """Byte sizes of one dtype flow: activations of ``s`` bytes, float accumulation of ``f``, input
    pixels of ``pixel`` bytes (``cast_pixels``: the tower converts them to its dtype first)."""

    s: int  # the activation (weight) dtype's itemsize
    f: int  # the accumulation dtype's (float32; float64 for float64 runs)
    pixel: int
    cast_pixels: bool

    @property
    def mixed(self) -> bool:
        return self.s != self.f

    def rms_norm(self, rows: int, width: int, scaled: bool = True) -> int:
        """Peak of ``vitops.layers.rms_norm`` over ``rows x width`` values, its output included: in a
        low-precision dtype the float32 copy, ``x * r`` and ``* w`` are alive together (3 float
        copies, and the weight's float copy; ``x * r`` then the cast without a weight); in float32 /
        float64 the copy is the input itself, so ``x * r`` and ``* w`` (the output). Plus the per-row
        statistics."""
        n = rows * width
        if self.mixed:
            body = 3 * n * self.f + width * self.f if scaled else 2 * n * self.f + n * self.s
        else:
            body = 2 * n * self.f if scaled else n * self.f
        return body + 2 * rows * self.f

    def layer_norm(self, rows: int, width: int) -> int:
        """``nn.LayerNorm``: its output and float mean / rstd per row."""
        return rows * width * self.s + 2 * rows * self.f

    def linear(self, tokens: int, width_in: int, width_out: int, clipped: bool) -> int:
        """A (clipped) linear's new tensors at its peak: the clamped input and the product before the
        output clamp, plus the clamped output; or just the product."""
        if not clipped:
            return tokens * width_out * self.s
        return tokens * width_in * self.s + 2 * tokens * width_out * self.s


def _gemma4_peak(c, batch: int, tokens: int, sz: _Sizes, projector: bool) -> int:
    """vitops.models.gemma4_vision: ``tower(patches, image_position_ids=...)`` then the projector, for
    ``batch`` images padded to ``tokens * k**2`` patches (Gemma4ImageProcessor's layout)."""
    s, f = sz.s, sz.f
    k = c.pooling_kernel_size
    n = batch * tokens * k * k  # patches in the batch
    d, inner, clip = c.hidden_size, c.intermediate_size, c.use_clipped_linears
    aq, akv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    nd, ni = n * d * s, n * inner * s
    # VisionEntry: patches in the processor's dtype; 2 * (p - 0.5) (two temporaries), the cast to the
    # weights' dtype and the projection, the position embedding and the sum
    patches = n * c.patch_dim * sz.pixel
    cast = n * c.patch_dim * s if sz.cast_pixels else 0
    peaks = [2 * patches, patches + cast + nd, patches + 3 * nd]
    # The blocks: the block's input x0 (the caller holds it) and the key mask (bool) stay alive
    base = nd + n
    norm = sz.rms_norm(n, d)
    # attention: pre-norm output n1, q/k/v projections, the fused q/k/v norm + RoPE's outputs, SDPA
    # (its output, float log-sum-exp and the float key mask), the output projection; q/k/v stay alive
    # to the end of the forward
    qkv = n * (aq + 2 * akv) * s
    peaks += [
        base + norm,
        base + nd + n * aq * s + n * akv * s + sz.linear(n, d, akv, clip),  # the value projection
        base + nd + 2 * qkv,  # qkv_norm_rope: inputs and outputs
        base + nd + qkv + n * s + n * aq * s + n * c.num_heads * f,  # SDPA
        base + nd + qkv + n * aq * s + sz.linear(n, aq, d, clip),  # output projection
    ]
    # h (the attention output) is alive until the MLP's result replaces it; x1 = x0 + norm(h)
    peaks += [base + nd + norm, base + 3 * nd, base + 2 * nd + norm]
    # the gated MLP on n3 = pre_ffw_norm(x1): act(wi_0(x)) * wi_1(x), then wo
    mlp = base + 3 * nd
    act = _ACTIVATION_PEAK[c.hidden_activation] * ni
    peaks += [
        mlp + sz.linear(n, d, inner, clip),
        mlp + act,
        mlp + ni + sz.linear(n, d, inner, clip),  # wi_1 while act(wi_0) is alive
        mlp + 3 * ni,  # the product
        mlp + ni + sz.linear(n, inner, d, clip),  # wo
        base + 3 * nd + norm,  # post_ffw_norm of the MLP output while h, x1 are alive
    ]
    # VisionExit: pooled [B, tokens, D] (one fused op) while the last hidden state is alive; with k = 1
    # nothing is pooled: padding zeroed (a copy) and the mask, then x sqrt(D) in float (the float copy
    # and the product), or x sqrt(D) and standardize (three float tensors at once)
    pooled = batch * tokens * d * s
    if k == 1:
        scale = 3 if c.standardize else (2 if sz.mixed else 1)
        peaks.append(nd + n + nd + scale * n * d * f)
    else:
        peaks.append(nd + pooled + batch * tokens)
    if projector:
        # Gemma4VisionProjector: weightless RMSNorm, then the linear into the text width
        text = batch * tokens * c.text_hidden_size * s
        peaks += [pooled + sz.rms_norm(batch * tokens, d, scaled=False), pooled + pooled + text]
    return max(peaks)


def _gemma3_peak(c, batch: int, sz: _Sizes, projector: bool) -> int:
    """vitops.models.gemma3: ``encode_images(tower, embedder, images)`` for ``batch`` NHWC images."""
    s = sz.s
    side = c.patches_per_side
    n = batch * side * side
    d, inner = c.hidden_size, c.intermediate_size
    nd, ni = n * d * s, n * inner * s
    # the cast of the pixels, then the patch embedding: nn.Conv2d, or (bfloat16 on the CPU) patchify +
    # a GEMM with the weight permuted into (row, col, channel) order; + the position table
    image = batch * c.image_size**2 * c.num_channels
    cast = image * s if sz.cast_pixels else 0
    patch_dim = c.num_channels * c.patch_size**2
    patchify = n * patch_dim * s + n * 2 * 8 + d * patch_dim * s
    peaks = [cast + patchify + nd, 2 * nd]
    # Encoder1DBlock: its input x0 (held by the Encoder's loop) and, from the second block on, the
    # Encoder's input (held by the tower's encode); LN, q/k/v projections (alive to the end of the
    # attention), SDPA's output and float log-sum-exp, the output projection; then h = x0 + attn, LN,
    # fc1 and its GELU, fc2
    base = nd + (nd if c.num_layers > 1 else 0)
    ln = sz.layer_norm(n, d)
    if c.num_layers:
        peaks += [
            base + ln + 3 * nd + nd + batch * c.num_heads * side * side * sz.f,
            base + ln + 3 * nd + nd + nd,
            base + nd + ln + 2 * ni,
            base + nd + ln + ni + nd,
        ]
    # encoder_norm (the Encoder's input still held), then the fused exit pooling + projector norm and
    # the projection, the last hidden state alive
    tokens = batch * c.mm_tokens_per_image
    peaks.append(base + ln)
    if projector:
        peaks.append(nd + tokens * d * s + tokens * c.text_hidden_size * s)
    else:
        peaks.append(nd + tokens * d * s)
    return max(peaks)


def _llama4_peak(c, batch: int, tiles: int, sz: _Sizes, projector: bool) -> int:
    """vitops.models.llama4: ``projector(model(tiles))`` for ``batch`` images of ``tiles`` tiles each."""
    s = sz.s
    t = batch * tiles
    patches_per_tile = c.grid_side**2
    n = t * (patches_per_tile + 1)  # tokens with CLS
    d, inner = c.hidden_size, c.intermediate_size
    nd, ni = n * d * s, n * inner * s
    np_ = t * patches_per_tile
    # the cast of the tiles, patchify (patches + int64 positions) and the unfold linear; CLS appended,
    # the position table added, layernorm_pre
    image = t * c.num_channels * c.image_size**2
    cast = image * s if sz.cast_pixels else 0
    patch_dim = c.num_channels * c.patch_size**2
    peaks = [cast + np_ * patch_dim * s + np_ * 2 * 8 + np_ * d * s, np_ * d * s + nd, 2 * nd,
             nd + sz.layer_norm(n, d)]
    # Llama4VisionEncoderLayer: its input x0 (held by the encoder's loop) and, from the second layer on,
    # the encoder's input (held by the model's encode), the RoPE positions; LN, q/k/v projections, the
    # RoPE'd q/k (v is not transformed), SDPA's output and float log-sum-exp, the output projection;
    # h = x0 + attn, LN, fc1 and its GELU, fc2
    base = nd + (nd if c.num_layers > 1 else 0) + (patches_per_tile + 1) * 2 * 4
    ln = sz.layer_norm(n, d)
    lse = t * c.num_heads * (patches_per_tile + 1) * sz.f
    if c.num_layers:
        peaks += [
            base + ln + 5 * nd,  # qkv_norm_rope: q, k, v and the rotated q, k
            base + ln + 3 * nd + nd + lse,  # SDPA
            base + ln + 3 * nd + 2 * nd,  # output projection
            base + nd + ln + 2 * ni,
            base + nd + ln + ni + nd,
        ]
    # layernorm_post (the encoder's input still held), CLS dropped (a view), pixel_shuffle, the adapter
    # MLP (GELU after both linears) while the encoder output is alive; then the projector
    peaks.append(base + ln)
    tokens = t * c.tokens_per_tile
    shuffled = tokens * c.intermediate_size * s
    hidden = tokens * c.projector_input_dim * s
    out = tokens * c.projector_output_dim * s
    peaks += [nd + shuffled + 2 * hidden, nd + shuffled + hidden + 2 * out]
    if projector:
        peaks.append(out + tokens * c.text_hidden_size * s)
    return max(peaks)


def estimate_activation_memory(hf_config: Any, batch: int, *, dtype: torch.dtype = torch.bfloat16,
                               pixel_dtype: torch.dtype | None = None, max_soft_tokens: int | None = None,
                               max_tiles: int | None = None, projector: bool = True) -> int:
    """Peak bytes of the tensors the vitops vision tower (+ projector) creates while encoding
    ``batch`` worst-case images in inference (``torch.no_grad`` / ``inference_mode``), in ``dtype``
    (the modules' dtype, no autocast). The weights and the input pixels (``pixel_dtype``: the
    family's processor dtype by default, float32 for Gemma 4 and Gemma 3, bfloat16 for Llama 4) are
    not included; the soft-token output is, when the peak comes last.

    ``batch`` counts images as the tower sees them: Gemma 4 images padded to the budget (worst case
    as :func:`vision_cache_entry_shape`), Gemma 3 images and pan-and-scan crops, Llama 4 images of
    ``max_tiles`` + 1 tiles. ``projector=False`` stops at the tower's output. See the module
    docstring for what the model covers (fused attention kernels)."""
    _check_int("batch", batch, 0)
    _check_dtype("dtype", dtype)
    family, config = _read(hf_config)
    max_soft_tokens, max_tiles = _family_options(family, max_soft_tokens, max_tiles)
    pixel_dtype = _check_dtype("pixel_dtype", pixel_dtype if pixel_dtype is not None else _PIXEL_DTYPES[family])
    if projector:
        _text_hidden(family, config)
    if batch == 0:
        return 0
    sizes = _Sizes(dtype.itemsize, acc_dtype(dtype).itemsize, pixel_dtype.itemsize, pixel_dtype != dtype)
    if family == "gemma4":
        return _gemma4_peak(config, batch, _gemma4_tokens(config, max_soft_tokens), sizes, projector)
    if family == "gemma3":
        return _gemma3_peak(config, batch, sizes, projector)
    return _llama4_peak(config, batch, _llama4_tiles(max_tiles), sizes, projector)

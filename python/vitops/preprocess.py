"""Gemma 4 image preprocessing: aspect-ratio resize, rescale, patchify, pad (HF-compatible).

Reproduces the output of HF transformers' ``Gemma4ImageProcessorPil`` (pinned: transformers 5.18,
``models/gemma4/image_processing_pil_gemma4.py``; spec: ``shared/specs/gemma4_vision.md`` §1):

1. RGB conversion (PIL: ``Image.convert("RGB")``; arrays/tensors: 1 channel repeated, alpha dropped),
2. resize to ``get_aspect_ratio_preserving_size`` (skipped when the size already matches),
3. rescale by ``1/255`` (no normalization; the model maps [0, 1] to [-1, 1] itself),
4. patchify in (row, col, channel) order with (x, y) patch positions (``vitops.patchify``),
5. pad every image to ``max_soft_tokens * pooling_kernel_size**2`` patches with zero pixels and
   position (-1, -1).

Which resize runs depends on the input type:

* **PIL images and numpy arrays** take the *PIL path*: PIL's own resampling on the uint8 RGB image,
  exactly as HF's PIL backend, so uint8 inputs match HF bitwise. Float numpy arrays are resized per
  channel as PIL mode ``"F"`` images (same filter, no uint8 rounding) and clamped to [0, 1].
* **torch tensors** take the *torch path* (stays on the tensor's device, e.g. CUDA): a separable
  antialiased ``F.interpolate`` in float32. PIL's antialias
  bicubic uses a = -0.5, which is also what torch uses when ``antialias=True``, so the filters are the
  same. Like PIL it runs two 1-D passes (order: see ``_pass_sizes``); for uint8 tensors each pass is
  rounded to integers (half up) and clamped to [0, 255] as PIL stores its passes in uint8, float
  tensors are clamped to [0, 1] after each pass. The remaining difference from the PIL path
  comes from PIL's fixed-point weights (and, for float inputs, from not rounding to uint8). Measured
  against the PIL path on uint8 data (the bundled demo image and noisy synthetic images of 480x640,
  1000x700, 37x53 and 50x3000, all five budgets): uint8 tensors differ by at most 2/255 with at most
  ~1.1% of values differing at all; float tensors (and float numpy arrays on the PIL path) by at most
  1.11/255, mean 0.32/255 (tests/test_preprocess.py enforces these bounds with a small margin).
  Pass ``backend="pil"`` to send tensors through the PIL path instead (CPU, exact HF parity for
  uint8).

Value conventions: uint8 inputs hold [0, 255]; floating inputs hold [0, 1] already (they are *not*
rescaled again; HF would rescale a float image a second time) and are checked to be in range.
Other dtypes are rejected.

Layout rule for arrays/tensors: ``[H, W]`` (grayscale), ``[H, W, C]`` or ``[C, H, W]`` with C in
{1, 3, 4}, or a batch of those with a leading dimension. ``channels_last=None`` infers the layout
when exactly one of the first/last axes has a channel-like size (1, 3 or 4) and raises otherwise;
pass ``channels_last=True/False`` to decide explicitly (e.g. for a 3x3x3 image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SUPPORTED_SOFT_TOKENS",
    "Gemma4ImageProcessor",
    "Gemma4Preprocessed",
    "demo_image",
    "get_aspect_ratio_preserving_size",
    "preprocess_gemma4",
]

# Soft-token budgets the released checkpoints were trained with; HF refuses anything else.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

_RESAMPLE = ("bicubic", "bilinear")
_BACKENDS = ("auto", "pil", "torch")
_CHANNEL_SIZES = (1, 3, 4)

# HF rescales as float32(float64(v) * (1/255)); a table of those 256 values gives the same bits on
# every device without float64 arithmetic on the GPU.
_UINT8_TO_UNIT = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)


def get_aspect_ratio_preserving_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """Target (height, width) in pixels for an image of ``height`` x ``width``.

    Same rule as HF's function of the same name: scale the area to ``max_patches * patch_size**2``
    (up or down), then round each side *down* to a multiple of ``pooling_kernel_size * patch_size``
    so the patch grid pools evenly. A side that rounds to zero is set to one pooling block and the
    other side becomes ``floor(long/short)`` blocks capped at the budget. The float operations are
    done in the same order as HF so the floors agree on every input.
    """
    if height <= 0 or width <= 0:
        # HF would divide by zero here; say what is wrong instead.
        raise ValueError(f"image must have a positive size, got {height}x{width}")
    block = pooling_kernel_size * patch_size
    budget_px = max_patches * patch_size**2
    scale = math.sqrt(budget_px / (height * width))
    out_h = int(math.floor(scale * height / block)) * block
    out_w = int(math.floor(scale * width / block)) * block
    if out_h == 0 and out_w == 0:
        raise ValueError(
            f"resizing {height}x{width} to the budget of {max_patches} patches gives a 0 x 0 image "
            f"(sides must be multiples of pooling_kernel_size * patch_size = {block})"
        )
    longest = (max_patches // pooling_kernel_size**2) * block
    if out_h == 0:
        out_h, out_w = block, min(int(math.floor(width / height)) * block, longest)
    elif out_w == 0:
        out_h, out_w = min(int(math.floor(height / width)) * block, longest), block
    if out_h * out_w > budget_px:
        raise ValueError(
            f"resizing {height}x{width} to {out_h}x{out_w} exceeds {max_patches} patches of size {patch_size}"
        )
    return out_h, out_w


@dataclass
class Gemma4Preprocessed:
    """Output of :class:`Gemma4ImageProcessor`.

    pixel_values: float32 [B, max_patches, 3 * p * p] in [0, 1]; padding rows are zero.
    pixel_position_ids: int64 [B, max_patches, 2], (x, y) patch indices; padding rows (-1, -1).
        (HF's processor calls this ``image_position_ids``; both keys work with ``out[key]``.)
    num_soft_tokens_per_image: tokens each image yields after k x k pooling.
    patch_grid_hw: per image (Hp, Wp), the patch grid before padding (both multiples of k).
    resized_hw: per image (height, width) in pixels after the resize.
    """

    pixel_values: torch.Tensor
    pixel_position_ids: torch.Tensor
    num_soft_tokens_per_image: list[int]
    patch_grid_hw: list[tuple[int, int]] = field(default_factory=list)
    resized_hw: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        # The (x, y) and patch axes are fixed sizes: kept out of torch.compile(dynamic=True)'s
        # duck shaping, which would tie them to a batch (or sequence) of the same size.
        from .models.gemma4_vision import mark_static_axes

        mark_static_axes(self.pixel_values, self.pixel_position_ids)

    def __getitem__(self, key: str) -> Any:
        if key == "image_position_ids":
            return self.pixel_position_ids
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return ("pixel_values", "pixel_position_ids", "num_soft_tokens_per_image", "patch_grid_hw", "resized_hw")

    def to(self, device: torch.device | str) -> "Gemma4Preprocessed":
        return Gemma4Preprocessed(self.pixel_values.to(device), self.pixel_position_ids.to(device),
                                  list(self.num_soft_tokens_per_image), list(self.patch_grid_hw),
                                  list(self.resized_hw))


# ---------------------------------------------------------------------------------------------
# input normalisation: everything becomes a list of ("pil", PIL.Image RGB) / ("np", HxWx3 array) /
# ("torch", 3xHxW tensor)
# ---------------------------------------------------------------------------------------------
def _is_pil(obj: Any) -> bool:
    # PIL is optional for the tensor path, so check without importing it.
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert") and hasattr(obj, "resize")


def _check_dtype(dtype_is_uint8: bool, dtype_is_float: bool, dtype: Any) -> None:
    if not (dtype_is_uint8 or dtype_is_float):
        raise TypeError(f"images must be uint8 ([0, 255]) or floating point ([0, 1]), got dtype {dtype}")


def _layout(shape: Sequence[int], channels_last: bool | None) -> bool:
    """True when a 3-D shape is [H, W, C]; False for [C, H, W]."""
    first, last = shape[0] in _CHANNEL_SIZES, shape[-1] in _CHANNEL_SIZES
    if channels_last is None:
        if first == last:
            what = "both" if first else "neither"
            raise ValueError(
                f"cannot infer the channel axis of an image of shape {tuple(shape)}: {what} of the first and "
                f"last axes have a channel-like size {_CHANNEL_SIZES}; pass channels_last=True or False"
            )
        channels_last = last
    c = shape[-1] if channels_last else shape[0]
    if c not in _CHANNEL_SIZES:
        raise ValueError(f"image of shape {tuple(shape)} has {c} channels; expected one of {_CHANNEL_SIZES}")
    return channels_last


def _split(images: Any, channels_last: bool | None) -> list[Any]:
    """Flattens the accepted input forms into a list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given")
        out: list[Any] = []
        for im in images:
            if isinstance(im, (list, tuple)):
                raise TypeError("nested lists of images are not supported; pass a flat list")
            out.extend(_split(im, channels_last))
        return out
    if _is_pil(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return [images[i] for i in range(images.shape[0])]
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(
            f"expected an image [H, W], [H, W, C], [C, H, W] or a batch [B, ...] of those, got shape {tuple(images.shape)}"
        )
    raise TypeError(f"unsupported image type {type(images).__name__}; use PIL images, numpy arrays or torch tensors")


def _to_hwc_numpy(a: np.ndarray, channels_last: bool | None) -> np.ndarray:
    _check_dtype(a.dtype == np.uint8, np.issubdtype(a.dtype, np.floating), a.dtype)
    if a.ndim == 2:
        a = a[..., None]
    elif not _layout(a.shape, channels_last):
        a = a.transpose(1, 2, 0)
    return _rgb_channels(a, axis=-1)


def _to_chw_tensor(t: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
    _check_dtype(t.dtype == torch.uint8, t.is_floating_point(), t.dtype)
    if t.ndim == 2:
        t = t[None]
    elif _layout(t.shape, channels_last):
        t = t.permute(2, 0, 1)
    return _rgb_channels(t, axis=0)


def _rgb_channels(x, axis: int):
    """1 channel -> repeated (what PIL's L -> RGB does); 4 -> alpha dropped (PIL's RGBA -> RGB)."""
    c = x.shape[axis]
    idx = [slice(None)] * x.ndim
    if c == 1:
        idx[axis] = [0, 0, 0]
        return x[tuple(idx)]
    if c == 4:
        idx[axis] = slice(0, 3)
        return x[tuple(idx)]
    return x


def _check_unit_range(x, name: str) -> None:
    if (x.size if isinstance(x, np.ndarray) else x.numel()) == 0:
        return  # empty images are rejected later with a clearer message
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"floating-point {name} must hold values in [0, 1] (got [{lo}, {hi}]); pass uint8 for [0, 255] data"
        )


def _size_hw(x) -> tuple[int, int]:
    return (x.size[1], x.size[0]) if _is_pil(x) else (x.shape[0], x.shape[1]) if isinstance(x, np.ndarray) else (x.shape[1], x.shape[2])


# ---------------------------------------------------------------------------------------------
# resizing
# ---------------------------------------------------------------------------------------------
def _pil_filter(resample: str):
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resample]


def _pass_sizes(h: int, w: int, th: int, tw: int) -> list[tuple[int, int]]:
    """Intermediate and final sizes of the two 1-D resampling passes, in Pillow's order.

    Pillow 13 runs the vertical pass first when the height shrinks and the width grows (measured:
    the other order leaves ~30% of values off by up to 8-19 levels there) and the horizontal pass
    first otherwise. The measured choice for some shrink-both cases does not follow this rule; the
    aspect-preserving resize rarely shrinks the two sides by very different factors, and the
    tolerance tests cover what is left.
    """
    if th < h and tw > w:
        sizes = [(th, w), (th, tw)]
    else:
        sizes = [(h, tw), (th, tw)]
    return [s for s, prev in zip(sizes, [(h, w)] + sizes) if s != prev]


def _resize_pil_path(img, th: int, tw: int, resample: str) -> torch.Tensor:
    """PIL image (RGB) or HxWx3 numpy -> float32 [th, tw, 3] in [0, 1]."""
    from PIL import Image

    if _is_pil(img) or img.dtype == np.uint8:
        pil = img if _is_pil(img) else Image.fromarray(np.ascontiguousarray(img))
        if (pil.size[1], pil.size[0]) != (th, tw):
            pil = pil.resize((tw, th), resample=_pil_filter(resample))
        u8 = torch.from_numpy(np.array(pil, dtype=np.uint8))
        return _UINT8_TO_UNIT[u8.long()]
    # Float arrays: PIL has no float RGB mode, so each channel is a mode "F" (float32) image. Same
    # filter as the uint8 path without its rounding; clamping mirrors uint8 saturation.
    # One 1-D pass at a time (in the uint8 path's order) so values saturate between passes as
    # they do in uint8.
    a = np.ascontiguousarray(img, dtype=np.float32)
    for ph, pw in _pass_sizes(a.shape[0], a.shape[1], th, tw):
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize((pw, ph), resample=_pil_filter(resample)))
                 for c in range(3)]
        a = np.clip(np.stack(chans, axis=-1), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _resize_torch_path(t: torch.Tensor, th: int, tw: int, resample: str) -> torch.Tensor:
    """3xHxW tensor -> float32 [th, tw, 3] in [0, 1] on the tensor's device."""
    is_u8 = t.dtype == torch.uint8
    h, w = t.shape[1], t.shape[2]
    if (h, w) == (th, tw):
        out = _UINT8_TO_UNIT.to(t.device)[t.long()] if is_u8 else t.to(torch.float32)
        return out.permute(1, 2, 0).contiguous()
    x = t[None].to(torch.float32)

    def settle(y: torch.Tensor) -> torch.Tensor:
        # PIL keeps each pass in uint8: round half up and saturate. Float images only saturate.
        return torch.floor(y + 0.5).clamp_(0, 255) if is_u8 else y.clamp_(0, 1)

    # Two 1-D passes in PIL's order; the rounding between them matters for uint8.
    for size in _pass_sizes(h, w, th, tw):
        x = settle(F.interpolate(x, size=size, mode=resample, antialias=True, align_corners=False))
    x = x[0].permute(1, 2, 0)
    if is_u8:
        return _UINT8_TO_UNIT.to(x.device)[x.long()].contiguous()
    return x.contiguous()


def _patchify(img_hwc: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import vitops
    from vitops import _loader

    key = "CUDA" if img_hwc.is_cuda else "CPU"
    if img_hwc.device.type in ("cpu", "cuda") and _loader.has_kernel("patchify", key):
        return vitops.patchify(img_hwc, patch_size)
    # A device without a vitops kernel (or a build without CUDA): same layout, pure PyTorch.
    return vitops.reference.patchify(img_hwc, patch_size)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
class Gemma4ImageProcessor:
    """Turns images into Gemma 4 vision-tower inputs, like HF's ``Gemma4ImageProcessorPil``.

    Args:
      patch_size: pixels per patch side (16 in all released checkpoints).
      pooling_kernel_size: k of the k x k soft-token pooling (3); resized sides are multiples of k*p.
      max_soft_tokens: budget per image, one of 70, 140, 280, 560, 1120; images are padded to
        ``max_soft_tokens * k**2`` patches.
      resample: "bicubic" (HF's choice) or "bilinear".
      backend: "auto" (PIL path for PIL/numpy inputs, torch path for tensors), "pil" or "torch";
        see the module docstring for what each does.

    Call :meth:`preprocess` (or the instance itself) with one image or a list / batch of images.
    """

    def __init__(
        self,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        max_soft_tokens: int = 280,
        resample: str = "bicubic",
        backend: str = "auto",
    ) -> None:
        for name, v in (("patch_size", patch_size), ("pooling_kernel_size", pooling_kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_budget(max_soft_tokens)
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {_RESAMPLE}, got {resample!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.patch_size = patch_size
        self.pooling_kernel_size = pooling_kernel_size
        self.max_soft_tokens = max_soft_tokens
        self.resample = resample
        self.backend = backend

    def max_patches(self, max_soft_tokens: int | None = None) -> int:
        return (max_soft_tokens or self.max_soft_tokens) * self.pooling_kernel_size**2

    def target_size(self, height: int, width: int, max_soft_tokens: int | None = None) -> tuple[int, int]:
        """Resized (height, width) in pixels for an image of the given size."""
        return get_aspect_ratio_preserving_size(
            height, width, self.patch_size, self.max_patches(max_soft_tokens), self.pooling_kernel_size
        )

    def num_soft_tokens(self, height: int, width: int, max_soft_tokens: int | None = None) -> int:
        """Soft tokens an image of this size yields (without touching pixels); what a text
        processor needs to expand the image placeholder."""
        th, tw = self.target_size(height, width, max_soft_tokens)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size**2

    def __call__(self, images: Any, **kwargs: Any) -> Gemma4Preprocessed:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        *,
        max_soft_tokens: int | None = None,
        channels_last: bool | None = None,
        device: torch.device | str | None = None,
    ) -> Gemma4Preprocessed:
        """Preprocesses one image, a list of images (sizes may differ) or a 4-D batch.

        Args:
          images: PIL image(s), numpy array(s) or torch tensor(s); see the module docstring.
          max_soft_tokens: overrides the instance budget for this call (must be supported).
          channels_last: layout of 3-D arrays/tensors; None infers it (module docstring).
          device: where the outputs go; default: the first tensor input's device, else CPU.
        """
        budget = self.max_soft_tokens if max_soft_tokens is None else _check_budget(max_soft_tokens)
        p, k = self.patch_size, self.pooling_kernel_size
        max_patches = budget * k * k
        items = _split(images, channels_last)

        prepared = []
        for im in items:
            use_torch = isinstance(im, torch.Tensor) and self.backend != "pil"
            use_torch = use_torch or (self.backend == "torch" and not isinstance(im, torch.Tensor))
            if _is_pil(im):
                # HF converts every non-RGB mode (L, LA, P, RGBA, CMYK, I;16...) with PIL itself.
                im = im if im.mode == "RGB" else im.convert("RGB")
                if use_torch:
                    im = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
            elif isinstance(im, torch.Tensor):
                im = _to_chw_tensor(im, channels_last)
                if im.is_floating_point():
                    _check_unit_range(im, "tensors")
                if not use_torch:
                    im = im.detach().cpu().permute(1, 2, 0).numpy()
            else:
                im = _to_hwc_numpy(im, channels_last)
                if np.issubdtype(im.dtype, np.floating):
                    _check_unit_range(im, "arrays")
                if use_torch:
                    im = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
            prepared.append((use_torch, im))

        if device is None:
            devs = [im.device for use_t, im in prepared if use_t]
            device = devs[0] if devs else torch.device("cpu")
        device = torch.device(device)

        batch = len(prepared)
        pixel_values = torch.zeros(batch, max_patches, 3 * p * p, dtype=torch.float32, device=device)
        positions = torch.full((batch, max_patches, 2), -1, dtype=torch.int64, device=device)
        tokens, grids, sizes = [], [], []
        for i, (use_torch, im) in enumerate(prepared):
            h, w = _size_hw(im)
            th, tw = get_aspect_ratio_preserving_size(h, w, p, max_patches, k)
            img = _resize_torch_path(im, th, tw, self.resample) if use_torch else _resize_pil_path(im, th, tw, self.resample)
            patches, pos = _patchify(img, p)
            n = patches.shape[0]
            pixel_values[i, :n] = patches.to(device)
            positions[i, :n] = pos.to(device)
            tokens.append(n // (k * k))
            grids.append((th // p, tw // p))
            sizes.append((th, tw))
        return Gemma4Preprocessed(pixel_values, positions, tokens, grids, sizes)


def _check_budget(max_soft_tokens: Any) -> int:
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")
    return int(max_soft_tokens)


def preprocess_gemma4(
    images: Any,
    *,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    max_soft_tokens: int = 280,
    resample: str = "bicubic",
    backend: str = "auto",
    channels_last: bool | None = None,
    device: torch.device | str | None = None,
) -> Gemma4Preprocessed:
    """Functional form of :class:`Gemma4ImageProcessor` (same arguments and output)."""
    proc = Gemma4ImageProcessor(patch_size, pooling_kernel_size, max_soft_tokens, resample, backend)
    return proc.preprocess(images, channels_last=channels_last, device=device)


def demo_image():
    """The bundled 640x480 RGB demo picture as a PIL image (needs Pillow).

    A synthetic landscape rendered by ``tools/make_demo_image.py`` (numpy only, deterministic), so
    examples and tests have a natural-looking input without downloading anything.
    """
    from importlib.resources import files

    from PIL import Image

    with files("vitops").joinpath("assets", "demo_640x480.png").open("rb") as f:
        img = Image.open(f)
        img.load()  # read now: the file closes when the block ends
    return img.convert("RGB")

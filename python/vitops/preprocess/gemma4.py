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
  same. Like PIL it runs two 1-D passes (order: see ``vitops.preprocess._images.pass_sizes``); for uint8 tensors each pass is
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
from typing import Any

import torch

from ._images import (
    BACKENDS,
    RESAMPLE,
    demo_image,
    prepare_image,
    resize_pil_path,
    resize_torch_path,
    size_hw,
    split_images,
)

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
        from ..models.gemma4_vision import mark_static_axes

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
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        items = split_images(images, channels_last)

        prepared = [prepare_image(im, channels_last, self.backend) for im in items]

        if device is None:
            devs = [im.device for use_t, im in prepared if use_t]
            device = devs[0] if devs else torch.device("cpu")
        device = torch.device(device)

        batch = len(prepared)
        pixel_values = torch.zeros(batch, max_patches, 3 * p * p, dtype=torch.float32, device=device)
        positions = torch.full((batch, max_patches, 2), -1, dtype=torch.int64, device=device)
        tokens, grids, sizes = [], [], []
        for i, (use_torch, im) in enumerate(prepared):
            h, w = size_hw(im)
            th, tw = get_aspect_ratio_preserving_size(h, w, p, max_patches, k)
            img = resize_torch_path(im, th, tw, self.resample) if use_torch else resize_pil_path(im, th, tw, self.resample)
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

"""Llama 4 image preprocessing: best-fit tile canvas, resize, pad, normalize, tiles (HF-compatible).

Reproduces HF transformers' ``Llama4ImageProcessor`` (torchvision backend, pinned: transformers 5.18,
``models/llama4/image_processing_llama4.py``):

1. RGB conversion (PIL ``convert("RGB")``; arrays/tensors: 1 channel repeated, alpha dropped);
2. the best-fit canvas among the ``max_patches``-tile resolutions (tiles of ``size`` = 336), the
   smallest upscale (or the largest downscale) that fits without distortion, ties to the least area;
   upscaling is limited to ``size`` unless ``resize_to_max_canvas``;
3. resize without distortion (bilinear, antialiased: torchvision's ``resize``, as HF, computed with
   ``F.interpolate`` on the same dtype path), pad bottom/right with zeros to the canvas;
4. rescale by 1/255 and normalize with mean = std = 0.5 **in bfloat16** (HF's override "as in the
   original implementation"), so ``pixel_values`` are bfloat16 in [-1, 1];
5. split into tiles row-major; with more than one tile a global ``size``² resize (distorting) of the
   whole image is appended last.

uint8 inputs (PIL, numpy, tensors) match HF bit for bit. Floating inputs hold [0, 1] already (they are
not rescaled again; HF would rescale them a second time): they are resized in float32 without HF's
uint8 rounding, then normalized in bfloat16 like the uint8 path; that lands within two uint8 levels of
HF's output for the same image as uint8 (measured at most 1.5 levels, tests/test_preprocess_llama4.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._images import check_unit_range, is_pil, split_images, to_chw_tensor, to_hwc_numpy

__all__ = ["Llama4ImageProcessor", "Llama4Preprocessed", "get_best_fit", "supported_resolutions"]


@lru_cache(maxsize=16)
def supported_resolutions(max_num_chunks: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) canvas of at most ``max_num_chunks`` tiles, in HF's order (grouped by
    aspect ratio in the order each ratio first appears, from the most chunks down)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunks in range(max_num_chunks, 0, -1):
        for h in sorted(d for d in range(1, chunks + 1) if chunks % d == 0):
            by_ratio[h / (chunks // h)].append((h, chunks // h))
    return tuple((h * tile_size, w * tile_size) for group in by_ratio.values() for h, w in group)


def get_best_fit(image_hw: tuple[int, int], resolutions: tuple[tuple[int, int], ...],
                 resize_to_max_canvas: bool = False) -> torch.Tensor:
    """HF's best-fit canvas, as an int64 tensor [height, width]: per canvas the limiting scale
    min(th / h, tw / w) in float32; the smallest scale >= 1 (the largest with
    ``resize_to_max_canvas``), else the largest below 1; ties go to the smallest area, then to the
    first canvas."""
    res = torch.tensor(resolutions, dtype=torch.int64)
    scale_w = res[:, 1] / image_hw[1]
    scale_h = res[:, 0] / image_hw[0]
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        selected = up.max() if resize_to_max_canvas else up.min()
    else:
        selected = scales[scales < 1].max()
    chosen = res[scales == selected]
    return chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]


def _resize_target(image_hw: tuple[int, int], canvas: torch.Tensor, tile: int, to_max_canvas: bool
                   ) -> tuple[int, int]:
    """The size the image is resized to before padding to ``canvas``: the largest that keeps its aspect
    ratio within the canvas, upscaling limited to ``tile`` unless ``to_max_canvas``. The arithmetic
    types follow HF's (the canvas entries are int64 tensors, so some scales are float32, others
    float64): the sizes it picks near rounding boundaries depend on them."""
    h, w = image_hw
    if to_max_canvas:
        th, tw = canvas[0], canvas[1]
    else:
        th, tw = min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1])
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(h * scale_w), th), tw
    else:
        new_h, new_w = th, min(math.floor(w * scale_h), tw)
    return max(int(new_h), 1), max(int(new_w), 1)


def _native_uint8_resize(device: torch.device) -> bool:
    """torchvision resizes uint8 images natively (no float round trip) on CPUs with AVX2/AVX-512 or Arm."""
    import platform

    if device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _resize(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``resize`` (bilinear, antialias) of a [C, H, W] uint8 or float tensor, same dtype path."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    x = image[None]
    if image.dtype == torch.uint8 and _native_uint8_resize(image.device):
        return F.interpolate(x, size=list(hw), mode="bilinear", align_corners=False, antialias=True)[0]
    y = F.interpolate(x.to(torch.float32), size=list(hw), mode="bilinear", align_corners=False, antialias=True)
    if image.dtype == torch.uint8:
        return y.round_().to(torch.uint8)[0]
    return y[0]


_MEAN = _STD = (0.5, 0.5, 0.5)


def _normalize(image: torch.Tensor) -> torch.Tensor:
    """HF's bfloat16 rescale and normalize: bf16(x) * (1/255) (uint8), then (x - mean) / std in bfloat16."""
    x = image.to(torch.bfloat16)
    if image.dtype == torch.uint8:
        x = x * (1 / 255)
    mean = torch.as_tensor(_MEAN, dtype=torch.bfloat16, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(_STD, dtype=torch.bfloat16, device=x.device).view(-1, 1, 1)
    return x.sub(mean).div_(std)


@dataclass
class Llama4Preprocessed:
    """``pixel_values [T, 3, size, size]`` bfloat16 (every image's tiles, row-major, then its global
    tile when it has more than one), ``aspect_ratios [N, 2]`` int64 (tile rows and columns per
    image, HF's) and ``tiles_per_image`` (local tiles + global)."""

    pixel_values: torch.Tensor
    aspect_ratios: torch.Tensor
    tiles_per_image: list[int]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return ("pixel_values", "aspect_ratios", "tiles_per_image")

    def to(self, device) -> "Llama4Preprocessed":
        return Llama4Preprocessed(self.pixel_values.to(device), self.aspect_ratios.to(device),
                                  list(self.tiles_per_image))


class Llama4ImageProcessor:
    """Turns images into Llama 4 vision-model tiles, like HF's ``Llama4ImageProcessor``.

    Args:
      max_patches: the most local tiles per image (16 in the released processor).
      size: the tile side (336).
      resize_to_max_canvas: pick the canvas with the largest upscale (HF's option).
    """

    def __init__(self, max_patches: int = 16, size: int = 336, resize_to_max_canvas: bool = False):
        for name, value in (("max_patches", max_patches), ("size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Llama4ImageProcessor: `{name}` must be a positive int, got {value!r}")
        self.max_patches = max_patches
        self.size = size
        self.resize_to_max_canvas = bool(resize_to_max_canvas)

    def _to_tensor(self, im: Any, channels_last: bool | None, device) -> torch.Tensor:
        """One image as a [3, H, W] uint8 or float32 tensor on ``device``."""
        if is_pil(im):
            t = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        elif isinstance(im, np.ndarray):
            a = to_hwc_numpy(im, channels_last)
            if np.issubdtype(a.dtype, np.floating):
                check_unit_range(a, "arrays")
                a = a.astype(np.float32)
            t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
        else:
            t = to_chw_tensor(im, channels_last)
            if t.is_floating_point():
                check_unit_range(t, "tensors")
                t = t.to(torch.float32)
        if t.shape[-2] == 0 or t.shape[-1] == 0:
            raise ValueError(f"Llama4ImageProcessor: empty image of shape {tuple(t.shape)}")
        return t.contiguous().to(device if device is not None else t.device)

    def preprocess_one(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A [3, H, W] uint8/float tensor -> (tiles [T, 3, size, size] bfloat16, (tile rows, tile columns))."""
        s = self.size
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        best = get_best_fit(hw, supported_resolutions(self.max_patches, s), self.resize_to_max_canvas)
        resized = _resize(image, _resize_target(hw, best, s, self.resize_to_max_canvas))
        canvas = (int(best[0]), int(best[1]))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[-1], 0, canvas[0] - resized.shape[-2]))
        rows, cols = canvas[0] // s, canvas[1] // s
        tiles = _normalize(padded).view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        if rows * cols > 1:
            tiles = torch.cat([tiles, _normalize(_resize(image, (s, s)))[None]])
        return tiles, (rows, cols)

    def preprocess(self, images: Any, *, channels_last: bool | None = None, device=None) -> Llama4Preprocessed:
        """Images (PIL, numpy, uint8/float tensors, a batch or a list) -> :class:`Llama4Preprocessed`."""
        outs, ratios = [], []
        for im in split_images(images, channels_last):
            tiles, ratio = self.preprocess_one(self._to_tensor(im, channels_last, device))
            outs.append(tiles)
            ratios.append(ratio)
        return Llama4Preprocessed(torch.cat(outs), torch.tensor(ratios, dtype=torch.int64, device=outs[0].device),
                                  [t.shape[0] for t in outs])

    __call__ = preprocess

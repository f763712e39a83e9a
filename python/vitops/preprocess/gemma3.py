"""Gemma 3 image preprocessing: optional pan-and-scan crops, resize to 896², rescale, normalize (HF-compatible).

Reproduces HF transformers' ``Gemma3ImageProcessorPil`` (pinned: transformers 5.18,
``models/gemma3/image_processing_pil_gemma3.py``) with the released processor's settings (size 896,
bilinear, mean = std = 0.5):

1. RGB conversion (PIL ``convert("RGB")``; arrays/tensors: 1 channel repeated, alpha dropped);
2. with ``do_pan_and_scan``: an image whose aspect ratio reaches ``pan_and_scan_min_ratio_to_activate``
   is also cut into 2..``pan_and_scan_max_num_crops`` crops along its long side (about one per
   aspect-ratio unit, none narrower than ``pan_and_scan_min_crop_size``; ceil-sized, the last crop
   clipped at the border), which follow the whole image in the output (HF's order);
3. every image and crop is resized to ``size``² (distorting), rescaled by 1/255 and normalized to
   [-1, 1]: ``pixel_values [N, 3, size, size]`` float32, ``num_crops`` per input image.

Which resize runs depends on the input, as for Gemma 4 (``vitops.preprocess.gemma4``): PIL images and
numpy arrays take the *PIL path* (PIL's own bilinear resampling on uint8 RGB, HF's PIL backend bit for
bit); torch tensors take the *torch path* (antialiased ``F.interpolate`` on the tensor's device: at
most one uint8 level from the PIL path, measured for uint8 and float tensors with and without
pan-and-scan in tests/test_preprocess_gemma3.py; ``backend="pil"`` sends them through PIL instead). Floating inputs
hold [0, 1] already and are not rescaled again.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._images import (
    BACKENDS,
    is_pil,
    prepare_image,
    resize_pil_path,
    resize_torch_path,
    size_hw,
    split_images,
)

__all__ = ["Gemma3ImageProcessor", "Gemma3Preprocessed", "pan_and_scan_boxes"]


def pan_and_scan_boxes(height: int, width: int, min_crop_size: int = 256, max_num_crops: int = 4,
                       min_ratio_to_activate: float = 1.2) -> list[tuple[int, int, int, int]]:
    """HF's pan-and-scan crops of a ``height x width`` image as ``(top, left, crop_height, crop_width)``
    boxes (clipped to the image), row-major; empty when the image is not elongated enough or the
    crops would be smaller than ``min_crop_size``."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        n_w = int(math.floor(width / height + 0.5))  # half rounds up
        n_w = min(int(math.floor(width / min_crop_size)), n_w)
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(int(math.floor(height / min_crop_size)), n_h)
        n_h, n_w = min(max_num_crops, max(2, n_h)), 1
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [(top, left, min(crop_h, height - top), min(crop_w, width - left))
            for top, left in itertools.product((crop_h * i for i in range(n_h)), (crop_w * i for i in range(n_w)))]


@dataclass
class Gemma3Preprocessed:
    """``pixel_values [N, 3, size, size]`` float32 (each input image, then its pan-and-scan crops)
    and ``num_crops`` (crops per input image, HF's)."""

    pixel_values: torch.Tensor
    num_crops: list[int]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return ("pixel_values", "num_crops")

    def to(self, device) -> "Gemma3Preprocessed":
        return Gemma3Preprocessed(self.pixel_values.to(device), list(self.num_crops))

    def nhwc(self) -> torch.Tensor:
        """``pixel_values`` as the NHWC ``[N, 1, size, size, 3]`` the MaxText-style tower takes."""
        return self.pixel_values.permute(0, 2, 3, 1)[:, None]


class Gemma3ImageProcessor:
    """Turns images into Gemma 3 vision-tower inputs, like HF's ``Gemma3ImageProcessorPil`` with the
    released settings.

    Args:
      size: the square side images are resized to (896).
      do_pan_and_scan: add pan-and-scan crops of elongated images (HF's option; off by default, as in
        the released processor).
      pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, pan_and_scan_min_ratio_to_activate:
        HF's pan-and-scan settings (defaults: Gemma3Processor's 256, 4, 1.2).
      backend: "auto" (PIL path for PIL/numpy inputs, torch path for tensors), "pil" or "torch".
    """

    def __init__(self, size: int = 896, do_pan_and_scan: bool = False, pan_and_scan_min_crop_size: int = 256,
                 pan_and_scan_max_num_crops: int = 4, pan_and_scan_min_ratio_to_activate: float = 1.2,
                 backend: str = "auto"):
        for name, value in (("size", size), ("pan_and_scan_min_crop_size", pan_and_scan_min_crop_size),
                            ("pan_and_scan_max_num_crops", pan_and_scan_max_num_crops)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Gemma3ImageProcessor: `{name}` must be a positive int, got {value!r}")
        if not (isinstance(pan_and_scan_min_ratio_to_activate, (int, float)) and pan_and_scan_min_ratio_to_activate > 0):
            raise ValueError("Gemma3ImageProcessor: `pan_and_scan_min_ratio_to_activate` must be a positive number, "
                             f"got {pan_and_scan_min_ratio_to_activate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"Gemma3ImageProcessor: `backend` must be one of {BACKENDS}, got {backend!r}")
        self.size = size
        self.do_pan_and_scan = bool(do_pan_and_scan)
        self.pan_and_scan_min_crop_size = pan_and_scan_min_crop_size
        self.pan_and_scan_max_num_crops = pan_and_scan_max_num_crops
        self.pan_and_scan_min_ratio_to_activate = float(pan_and_scan_min_ratio_to_activate)
        self.backend = backend

    def _prepare(self, im: Any, channels_last: bool | None) -> tuple[bool, Any]:
        use_torch, im = prepare_image(im, channels_last, self.backend)
        h, w = size_hw(im)
        if h == 0 or w == 0:
            raise ValueError(f"Gemma3ImageProcessor: empty image of size {h}x{w}")
        return use_torch, im

    def _crops(self, use_torch: bool, im: Any) -> list[Any]:
        if not self.do_pan_and_scan:
            return []
        h, w = size_hw(im)
        boxes = pan_and_scan_boxes(h, w, self.pan_and_scan_min_crop_size, self.pan_and_scan_max_num_crops,
                                   self.pan_and_scan_min_ratio_to_activate)
        if use_torch:
            return [im[:, t:t + ch, l:l + cw] for t, l, ch, cw in boxes]
        if is_pil(im):
            return [im.crop((l, t, l + cw, t + ch)) for t, l, ch, cw in boxes]
        return [im[t:t + ch, l:l + cw] for t, l, ch, cw in boxes]

    def preprocess(self, images: Any, *, channels_last: bool | None = None, device=None) -> Gemma3Preprocessed:
        """Images (PIL, numpy, uint8/float tensors, a batch or a list) -> :class:`Gemma3Preprocessed`."""
        prepared = [self._prepare(im, channels_last) for im in split_images(images, channels_last)]
        if device is None:
            devs = [im.device for use_t, im in prepared if use_t]
            device = devs[0] if devs else torch.device("cpu")
        s = self.size
        outs, num_crops = [], []
        for use_torch, im in prepared:
            crops = self._crops(use_torch, im)
            num_crops.append(len(crops))
            for part in [im, *crops]:
                if use_torch:
                    unit = resize_torch_path(part, s, s, "bilinear")
                else:
                    unit = resize_pil_path(part if is_pil(part) else np.ascontiguousarray(part), s, s, "bilinear")
                # HF: float32(float64(u8) / 255) (the resize paths' unit values), then (x - 0.5) / 0.5 in float32
                outs.append(((unit.to(device) - 0.5) / 0.5).permute(2, 0, 1))
        return Gemma3Preprocessed(torch.stack(outs), num_crops)

    __call__ = preprocess

"""Packed mixed-resolution encoding: many images of different sizes and soft-token budgets in one
tower call, with no padding FLOPs (beyond HF, which pads every image of a batch to one budget).

Gemma 4 packs every image's patches back to back into one sequence: the projections, norms and
MLPs run once over all patches, attention is block diagonal (each image attends to its own
patches, :func:`vitops.layers.packed_attention`) and each image is pooled on its own grid
(:meth:`Gemma4VisionEncoderLayer.forward_packed`). Gemma 3 (896² image + pan-and-scan crops) and
Llama 4 (336² tiles) have fixed-size units, so packing their images is one batch of every unit.

The packing is host metadata (patch counts from the preprocessor): the encoder never reads the
device, so a packed call has no host synchronisation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import PackedSegments

__all__ = ["PackedEncoding", "PackedImages", "encode_packed", "pack_gemma4"]


@dataclass
class PackedImages:
    """Gemma 4 images packed back to back, the input of :meth:`Gemma4VisionEncoderLayer.forward_packed`.

    patches: float ``[P, 3p^2]``, every image's patches (no padding rows), image after image.
    positions_xy: int64 ``[P, 2]``, their (x, y) patch coordinates.
    segments: the patch count of each image (``P = segments.total``).
    pooling_kernel_size: k of the k x k pooling (each image yields ``patches / k^2`` soft tokens).
    """

    patches: torch.Tensor
    positions_xy: torch.Tensor
    segments: PackedSegments
    pooling_kernel_size: int = 3

    def __post_init__(self):
        if not isinstance(self.segments, PackedSegments):
            self.segments = PackedSegments(tuple(self.segments))
        total = self.segments.total
        if self.patches.dim() != 2 or self.patches.shape[0] != total:
            raise ValueError(f"PackedImages: patches must be [{total}, 3p^2] (the segments' total), got "
                             f"{tuple(self.patches.shape)}")
        if self.positions_xy.shape != (total, 2):
            raise ValueError(f"PackedImages: positions_xy must be [{total}, 2], got {tuple(self.positions_xy.shape)}")
        k2 = self.pooling_kernel_size**2
        if any(n % k2 for n in self.segments.lengths):
            raise ValueError(f"PackedImages: every image's patch count must be a multiple of pooling_kernel_size**2 "
                             f"= {k2}, got {self.segments.lengths}")

    @property
    def num_images(self) -> int:
        return len(self.segments.lengths)

    @property
    def num_soft_tokens_per_image(self) -> tuple[int, ...]:
        k2 = self.pooling_kernel_size**2
        return tuple(n // k2 for n in self.segments.lengths)

    def to(self, device) -> "PackedImages":
        return PackedImages(self.patches.to(device), self.positions_xy.to(device), self.segments,
                            self.pooling_kernel_size)

    @classmethod
    def from_padded(cls, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                    num_soft_tokens_per_image: Sequence[int], pooling_kernel_size: int = 3) -> "PackedImages":
        """From HF's padded form ``pixel_values [B, L, 3p^2]`` + ``position_ids [B, L, 2]`` (any leading
        dims, e.g. a video's ``[V, F, L, ...]``: each row is one image) and the soft tokens of each row
        (the processor's ``num_soft_tokens_per_image``; a video gives its per-frame count for every
        frame): row ``i`` contributes its first ``tokens_i * k^2`` patches (the processor puts the
        valid patches first). Positions on the CPU are checked (valid rows real, the rest padding)."""
        pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-2:])
        position_ids = position_ids.reshape(-1, *position_ids.shape[-2:])
        tokens = [int(t) for t in num_soft_tokens_per_image]
        if len(tokens) != pixel_values.shape[0] or position_ids.shape[:2] != pixel_values.shape[:2]:
            raise ValueError(f"PackedImages.from_padded: pixel_values {tuple(pixel_values.shape)}, position_ids "
                             f"{tuple(position_ids.shape)} and {len(tokens)} soft-token counts must describe the "
                             "same images")
        k2 = pooling_kernel_size**2
        lengths = [t * k2 for t in tokens]
        if any(t <= 0 or n > pixel_values.shape[1] for t, n in zip(tokens, lengths)):
            raise ValueError(f"PackedImages.from_padded: soft-token counts {tokens} must be positive and fit the "
                             f"{pixel_values.shape[1]} patch rows (x {k2} patches each)")
        if position_ids.device.type == "cpu":
            for i, n in enumerate(lengths):
                pad = (position_ids[i] == -1).all(-1)
                if bool(pad[:n].any()) or not bool(pad[n:].all()):
                    raise ValueError(f"PackedImages.from_padded: image {i} should have {n} valid patches first "
                                     f"({tokens[i]} soft tokens) and padding (-1, -1) after them; its positions "
                                     "do not")
        patches = torch.cat([pixel_values[i, :n] for i, n in enumerate(lengths)])
        positions = torch.cat([position_ids[i, :n] for i, n in enumerate(lengths)])
        return cls(patches, positions, PackedSegments(tuple(lengths)), pooling_kernel_size)

    @classmethod
    def concat(cls, parts: Sequence["PackedImages"]) -> "PackedImages":
        """One packing of several (their images in order)."""
        if not parts:
            raise ValueError("PackedImages.concat: nothing to pack")
        ks = {p.pooling_kernel_size for p in parts}
        if len(ks) != 1:
            raise ValueError(f"PackedImages.concat: parts pool with different kernels {sorted(ks)}")
        return cls(torch.cat([p.patches for p in parts]), torch.cat([p.positions_xy for p in parts]),
                   PackedSegments(sum((p.segments.lengths for p in parts), ())), ks.pop())


@dataclass
class PackedEncoding:
    """The soft tokens of a packed call: ``soft_tokens [N, H]`` (every image's tokens, image after
    image, each in HF's order) and ``tokens_per_image``."""

    soft_tokens: torch.Tensor
    tokens_per_image: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Row where each image's tokens start, then ``N``."""
        return PackedSegments(self.tokens_per_image).offsets if self.tokens_per_image else (0,)

    def split(self) -> tuple[torch.Tensor, ...]:
        """Per-image views ``[tokens_i, H]``."""
        return torch.split(self.soft_tokens, list(self.tokens_per_image))


def _loaded(module: str, name: str) -> type | None:
    """``module.name`` if that module is imported already. An object can only be an instance of a
    class whose module is loaded, so type dispatch needs no import (serving one family never
    imports the others)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


_PREPROCESSED = (("vitops.preprocess.gemma4", "Gemma4Preprocessed"), ("vitops.preprocess.gemma4", "Gemma4VideoPreprocessed"),
                 ("vitops.preprocess.gemma3", "Gemma3Preprocessed"), ("vitops.preprocess.llama4", "Llama4Preprocessed"))


def _is_raw_images(images: Any) -> bool:
    known = (PackedImages, *filter(None, (_loaded(m, n) for m, n in _PREPROCESSED)))
    if isinstance(images, known):
        return False
    return not (isinstance(images, (list, tuple)) and images and all(isinstance(x, known) for x in images))


def _as_list(images: Any) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def pack_gemma4(images: Any, *, max_soft_tokens: int | Sequence[int] = 280, processor=None,
                device=None) -> PackedImages:
    """Gemma 4 images -> :class:`PackedImages`.

    ``images``: one image or a list (PIL, numpy, tensors: whatever :class:`Gemma4ImageProcessor`
    takes), each resized to its own budget (``max_soft_tokens``: one of 70/140/280/560/1120 for all,
    or one per image); or preprocessed outputs (a ``Gemma4Preprocessed``, a ``Gemma4VideoPreprocessed``
    (every frame of every video an image), a ``PackedImages`` or a list of them), packed as they are."""
    from ..preprocess.gemma4 import Gemma4ImageProcessor, Gemma4Preprocessed, Gemma4VideoPreprocessed

    if not _is_raw_images(images):
        parts = []
        for item in _as_list(images):
            if isinstance(item, PackedImages):
                parts.append(item)
            elif isinstance(item, Gemma4Preprocessed):
                k = (processor.pooling_kernel_size if processor is not None
                     else _pooling_kernel_of(item))
                parts.append(PackedImages.from_padded(item.pixel_values, item.pixel_position_ids,
                                                      item.num_soft_tokens_per_image, k))
            elif isinstance(item, Gemma4VideoPreprocessed):
                k = processor.pooling_kernel_size if processor is not None else _pooling_kernel_of(item)
                frames = item.num_frames
                parts.append(PackedImages.from_padded(item.pixel_values_videos, item.video_position_ids,
                                                      [n for n in item.num_soft_tokens_per_video for _ in range(frames)],
                                                      k))
            else:
                raise TypeError(f"pack_gemma4: cannot pack a {type(item).__name__} (Gemma 4 images, Gemma4Preprocessed, "
                                "Gemma4VideoPreprocessed or PackedImages)")
        packed = PackedImages.concat(parts)
        return packed if device is None else packed.to(device)
    items = _as_list(images) if isinstance(images, (list, tuple)) else [images]
    budgets = [max_soft_tokens] * len(items) if isinstance(max_soft_tokens, int) else list(max_soft_tokens)
    if len(budgets) != len(items):
        raise ValueError(f"pack_gemma4: {len(budgets)} budgets (max_soft_tokens) for {len(items)} images")
    processor = processor or Gemma4ImageProcessor()
    parts = []
    for image, budget in zip(items, budgets):
        pre = processor(image, max_soft_tokens=budget)
        parts.append(PackedImages.from_padded(pre.pixel_values, pre.pixel_position_ids, pre.num_soft_tokens_per_image,
                                              processor.pooling_kernel_size))
    packed = PackedImages.concat(parts)
    return packed if device is None else packed.to(device)


def _pooling_kernel_of(pre) -> int:
    """k of a Gemma4Preprocessed / Gemma4VideoPreprocessed: patches of the grid per soft token."""
    counts = getattr(pre, "num_soft_tokens_per_image", None) or pre.num_soft_tokens_per_video
    (gh, gw), tokens = pre.patch_grid_hw[0], counts[0]
    k = round((gh * gw / tokens) ** 0.5)
    if k * k * tokens != gh * gw:
        raise ValueError("pack_gemma4: cannot tell the pooling kernel of this Gemma4Preprocessed; pass `processor`")
    return k


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def encode_packed(model: nn.Module, images: Any, *, embedder: nn.Module | None = None,
                  max_soft_tokens: int | Sequence[int] = 280, processor=None, attention_backend: str = "sdpa",
                  deterministic: bool | None = None) -> PackedEncoding:
    """Encodes many images in one call: ``PackedEncoding(soft_tokens [N, H], tokens_per_image)``.

    ``model``: a vitops tower, ``Gemma4VisionEncoderLayer`` (images of different sizes and budgets
    packed into one sequence), ``Gemma3VisionEncoderLayer`` (every image's 896² unit and pan-and-scan
    crops in one batch) or ``Llama4VisionModel`` (every image's tiles in one batch); ``embedder``: its
    projector into the text model (``Gemma4VisionProjector``, Gemma 3's ``VisionEmbedder``,
    ``Llama4MultiModalProjector``) or None for the tower's output. ``images``: raw images (each
    preprocessed by ``processor``, the family's default processor when None; Gemma 4: each to its own
    ``max_soft_tokens``) or the family's preprocessed outputs (a list of them is packed in order).

    Each image's rows equal encoding it alone (Gemma 4: HF's flattened ``get_image_features`` rows,
    same order). ``attention_backend`` (Gemma 4): "sdpa" (one batched SDPA per run of equal-size
    images) or "varlen" (torch's flash varlen attention; CUDA float16 / bfloat16)."""
    tower = next((name for module, name in _TOWERS if isinstance(model, _loaded(module, name) or ())), None)
    if tower is None:
        raise TypeError(f"encode_packed: `model` must be a vitops Gemma4VisionEncoderLayer, Gemma3VisionEncoderLayer "
                        f"or Llama4VisionModel, got {type(model).__name__}")
    if isinstance(images, (list, tuple)) and not images:
        # no images (a text-only request): an empty encoding, so callers need no special case
        config = getattr(embedder, "config", model.config) if embedder is not None else model.config
        width = (config.text_hidden_size if embedder is not None
                 else getattr(config, "vision_output_dim", None) or config.hidden_size)
        w = _param(model)
        return PackedEncoding(torch.empty(0, width, device=w.device, dtype=w.dtype), ())
    if tower == "Gemma4VisionEncoderLayer":
        return _encode_gemma4(model, embedder, images, max_soft_tokens, processor, attention_backend, deterministic)
    if tower == "Gemma3VisionEncoderLayer":
        return _encode_gemma3(model, embedder, images, processor, deterministic)
    return _encode_llama4(model, embedder, images, processor, deterministic)


# the towers encode_packed takes: (module, class), looked up only if the module is already loaded
_TOWERS = (("vitops.models.gemma4_vision", "Gemma4VisionEncoderLayer"),
           ("vitops.models.gemma3", "Gemma3VisionEncoderLayer"), ("vitops.models.llama4", "Llama4VisionModel"))


def _encode_gemma4(tower, embedder, images, max_soft_tokens, processor, attention_backend, deterministic):
    if processor is None:
        from ..preprocess.gemma4 import Gemma4ImageProcessor

        c = tower.config
        processor = Gemma4ImageProcessor(patch_size=c.patch_size, pooling_kernel_size=c.pooling_kernel_size)
    packed = pack_gemma4(images, max_soft_tokens=max_soft_tokens, processor=processor, device=_param(tower).device)
    if packed.pooling_kernel_size != tower.config.pooling_kernel_size:
        raise ValueError(f"encode_packed: images packed for pooling_kernel_size {packed.pooling_kernel_size}, the "
                         f"tower pools {tower.config.pooling_kernel_size}")
    tokens, token_segments = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments,
                                                  deterministic=deterministic, attention_backend=attention_backend)
    if embedder is not None:
        tokens = embedder(tokens)
    return PackedEncoding(tokens, token_segments.lengths)


def _preprocessed_parts(model, images, processor, default_processor, preprocessed: type, family: str) -> list:
    """The family's preprocessed outputs of ``images`` (raw images through ``processor``, or given)."""
    if _is_raw_images(images):
        return [(processor or default_processor(size=model.config.image_size))(images)]
    parts = _as_list(images)
    if not all(isinstance(p, preprocessed) for p in parts):
        raise TypeError(f"encode_packed: a {family} model takes images or {preprocessed.__name__} outputs")
    return parts


def _encode_units(model, parts, units_per_image, run) -> PackedEncoding:
    """Fixed-size units (crops, tiles) of every image in one batch: ``run(units) -> [U, T, H]``."""
    w = _param(model)
    units = torch.cat([p.pixel_values for p in parts]).to(device=w.device, dtype=w.dtype)
    out = run(units)
    per_unit = out.shape[1]
    return PackedEncoding(out.reshape(-1, out.shape[-1]), tuple(u * per_unit for u in units_per_image))


def _encode_gemma3(tower, embedder, images, processor, deterministic):
    from ..models.gemma3 import encode_images
    from ..preprocess.gemma3 import Gemma3ImageProcessor, Gemma3Preprocessed

    parts = _preprocessed_parts(tower, images, processor, Gemma3ImageProcessor, Gemma3Preprocessed, "Gemma 3")
    # the 896² unit and each pan-and-scan crop: NHWC [U, 1, S, S, 3] -> [U, 1, T, H]
    return _encode_units(tower, parts, [1 + n for p in parts for n in p.num_crops],
                         lambda units: encode_images(tower, embedder, units.permute(0, 2, 3, 1)[:, None],
                                                     deterministic)[:, 0])


def _encode_llama4(model, embedder, images, processor, deterministic):
    from ..preprocess.llama4 import Llama4ImageProcessor, Llama4Preprocessed

    parts = _preprocessed_parts(model, images, processor, Llama4ImageProcessor, Llama4Preprocessed, "Llama 4")

    def run(tiles):  # [tiles, 144, vision_output_dim], then the projector
        out = model(tiles, deterministic=deterministic)
        return embedder(out) if embedder is not None else out

    return _encode_units(model, parts, [t for p in parts for t in p.tiles_per_image], run)

"""Gemma 4 image and video preprocessing: aspect-ratio resize, rescale, patchify, pad (HF-compatible).

Videos: :class:`Gemma4VideoProcessor` is HF's ``Gemma4VideoProcessor`` (frame sampling, the same
per-frame geometry with torchvision's resize; see its docstring) and :func:`video_placeholder` /
:func:`expand_video_tokens` the prompt text HF's ``Gemma4Processor`` puts in place of ``<|video|>``.

Images: reproduces the output of HF transformers' ``Gemma4ImageProcessorPil`` (pinned: transformers 5.18,
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

import dataclasses
import math
import warnings
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
    resize_torchvision,
    size_hw,
    split_images,
)
from ._videos import VideoMetadata, metadata_for, num_frames_of, prepare_video, sample_frame_indices, split_videos

__all__ = [
    "SUPPORTED_SOFT_TOKENS",
    "Gemma4ImageProcessor",
    "Gemma4Preprocessed",
    "Gemma4VideoProcessor",
    "Gemma4VideoPreprocessed",
    "VideoMetadata",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "VIDEO_TOKEN",
    "demo_image",
    "expand_video_tokens",
    "get_aspect_ratio_preserving_size",
    "preprocess_gemma4",
    "video_frame_timestamps",
    "video_placeholder",
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
class _Gemma4Geometry:
    """Patch size, pooling and soft-token budget, and the sizes they imply (the image and video
    processors share them)."""

    def __init__(self, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int, resample: str) -> None:
        for name, v in (("patch_size", patch_size), ("pooling_kernel_size", pooling_kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_budget(max_soft_tokens)
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
        self.patch_size = patch_size
        self.pooling_kernel_size = pooling_kernel_size
        self.max_soft_tokens = max_soft_tokens
        self.resample = resample

    def max_patches(self, max_soft_tokens: int | None = None) -> int:
        return (max_soft_tokens or self.max_soft_tokens) * self.pooling_kernel_size**2

    def target_size(self, height: int, width: int, max_soft_tokens: int | None = None) -> tuple[int, int]:
        """Resized (height, width) in pixels for an image (or frame) of the given size."""
        return get_aspect_ratio_preserving_size(
            height, width, self.patch_size, self.max_patches(max_soft_tokens), self.pooling_kernel_size
        )

    def num_soft_tokens(self, height: int, width: int, max_soft_tokens: int | None = None) -> int:
        """Soft tokens an image (or one video frame) of this size yields, without touching pixels;
        what a text processor needs to expand the placeholder."""
        th, tw = self.target_size(height, width, max_soft_tokens)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size**2


class Gemma4ImageProcessor(_Gemma4Geometry):
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
        super().__init__(patch_size, pooling_kernel_size, max_soft_tokens, resample)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

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


# ---------------------------------------------------------------------------------------------
# video: HF's Gemma4VideoProcessor (transformers 5.18, models/gemma4/video_processing_gemma4.py) and
# the prompt expansion of its Gemma4Processor (processing_gemma4.py, replace_video_token)
# ---------------------------------------------------------------------------------------------
BOI_TOKEN = "<|image>"  # id 255999: opens every image and every video frame
EOI_TOKEN = "<image|>"  # id 258882: closes them
VIDEO_TOKEN = "<|video|>"  # id 258884: one per soft token of a frame (HF's Gemma4Config.video_token_id)
DEFAULT_VIDEO_FPS = 24  # what HF's processor assumes when a video's fps is unknown


def video_frame_timestamps(metadata: Any) -> list[str]:
    """``"mm:ss"`` of every processed frame: its source index over the video's fps, as HF's
    ``Gemma4Processor.replace_video_token`` writes it. A video without fps (frames passed without
    metadata) is taken as 24 fps with a warning, as in HF."""
    meta = VideoMetadata.from_any(metadata)
    if meta.frames_indices is None:
        raise ValueError("video_metadata.frames_indices is unknown: the timestamps need the source index of "
                         "every frame (set by frame sampling; pass it with pre-sampled frames)")
    if meta.fps is None:
        warnings.warn(f"the video's fps is unknown (no video_metadata with fps); frame timestamps assume "
                      f"{DEFAULT_VIDEO_FPS} fps, as HF's Gemma4Processor does", stacklevel=2)
        meta.fps = float(DEFAULT_VIDEO_FPS)
    return [f"{int(s // 60):02d}:{int(s % 60):02d}" for s in meta.timestamps]


def video_placeholder(num_soft_tokens: int, metadata: Any, *, boi_token: str = BOI_TOKEN,
                      video_token: str = VIDEO_TOKEN, eoi_token: str = EOI_TOKEN) -> str:
    """The text HF's Gemma 4 processor puts in place of one video's ``<|video|>``: per frame
    ``"mm:ss " + boi + video_token * num_soft_tokens + eoi``, frames joined by spaces. Tokenize the
    prompt with this text in it (:func:`expand_video_tokens`) to get HF's ``input_ids``."""
    if isinstance(num_soft_tokens, bool) or not isinstance(num_soft_tokens, int) or num_soft_tokens < 0:
        raise ValueError(f"num_soft_tokens must be a non-negative int (soft tokens per frame), got {num_soft_tokens!r}")
    frame = f"{boi_token}{video_token * num_soft_tokens}{eoi_token}"
    return " ".join(f"{t} {frame}" for t in video_frame_timestamps(metadata))


def expand_video_tokens(text: str | list[str], placeholders: list[str], video_token: str = VIDEO_TOKEN
                        ) -> str | list[str]:
    """Replaces the i-th ``video_token`` of ``text`` (a prompt, or a batch of prompts read in order) with
    ``placeholders[i]``, as HF's processor does before tokenizing. The counts must agree."""
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("text must be a string or a list of strings")
    found = sum(t.count(video_token) for t in texts)
    if found != len(placeholders):
        raise ValueError(f"the text has {found} {video_token} placeholders for {len(placeholders)} videos")
    it = iter(placeholders)
    out = []
    for t in texts:
        parts = t.split(video_token)
        out.append(parts[0] + "".join(next(it) + rest for rest in parts[1:]))
    return out[0] if isinstance(text, str) else out


@dataclass
class Gemma4VideoPreprocessed:
    """Output of :class:`Gemma4VideoProcessor` (HF's keys).

    pixel_values_videos: float32 [V, F, max_patches, 3 * p * p]; padding rows are zero.
    video_position_ids: int64 [V, F, max_patches, 2], (x, y) patch indices; padding rows (-1, -1).
    num_soft_tokens_per_video: per video, the soft tokens of *one frame* (HF's meaning).
    video_metadata: per video, its :class:`VideoMetadata` (``frames_indices``: the frames kept).
    patch_grid_hw / resized_hw: per video, the frames' patch grid and size in pixels after the resize.
    """

    pixel_values_videos: torch.Tensor
    video_position_ids: torch.Tensor
    num_soft_tokens_per_video: list[int]
    video_metadata: list[VideoMetadata] = field(default_factory=list)
    patch_grid_hw: list[tuple[int, int]] = field(default_factory=list)
    resized_hw: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        from ..models.gemma4_vision import mark_static_axes

        mark_static_axes(self.pixel_values_videos, self.video_position_ids)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return ("pixel_values_videos", "video_position_ids", "num_soft_tokens_per_video", "video_metadata",
                "patch_grid_hw", "resized_hw")

    @property
    def num_frames(self) -> int:
        return self.pixel_values_videos.shape[1]

    @property
    def num_video_tokens(self) -> list[int]:
        """Per video, its ``<|video|>`` tokens in the prompt (frames x tokens per frame): the rows
        :func:`vitops.models.gemma4_vision.encode_videos` returns for it."""
        return [self.num_frames * n for n in self.num_soft_tokens_per_video]

    def placeholders(self, **tokens: str) -> list[str]:
        """Per video, :func:`video_placeholder` (token strings overridable: boi_token, video_token, eoi_token)."""
        return [video_placeholder(n, m, **tokens) for n, m in zip(self.num_soft_tokens_per_video, self.video_metadata)]

    def expand_prompt(self, text: str | list[str], **tokens: str) -> str | list[str]:
        """``text`` with each ``<|video|>`` replaced by its video's placeholder, in order (HF's expansion)."""
        return expand_video_tokens(text, self.placeholders(**tokens), tokens.get("video_token", VIDEO_TOKEN))

    def to(self, device: torch.device | str) -> "Gemma4VideoPreprocessed":
        return dataclasses.replace(self, pixel_values_videos=self.pixel_values_videos.to(device),
                                   video_position_ids=self.video_position_ids.to(device))


class Gemma4VideoProcessor(_Gemma4Geometry):
    """Turns videos into Gemma 4 vision-tower inputs, like HF's ``Gemma4VideoProcessor``: frames
    sampled, each resized (aspect ratio kept, sides multiples of p * k, within the per-frame budget)
    with torchvision's antialiased resize (:func:`vitops.preprocess._images.resize_torchvision`, no
    torchvision needed), rescaled to [0, 1], patchified and padded.

    Args:
      patch_size, pooling_kernel_size: as for images (16, 3).
      max_soft_tokens: budget per *frame*, one of 70 (default), 140, 280, 560, 1120.
      num_frames: frames sampled per video (32), evenly spaced: ``i * total // num_frames``.
      fps: sample this many frames per second of video instead (needs the video's fps in
        ``video_metadata``); give ``num_frames`` or ``fps``, not both.
      do_sample_frames: False keeps every frame given.
      resample: "bicubic" (HF's) or "bilinear".

    Inputs: see ``vitops.preprocess._videos``. Per call, ``num_frames`` or ``fps`` override the
    instance's sampling (HF 5.18 ignores a per-call ``fps`` while the processor's ``num_frames`` is
    set and samples ``num_frames`` frames; vitops samples by the ``fps`` asked for). A video with
    fewer frames than ``num_frames`` is an error, as in HF. Videos of one call must end up with the
    same number of frames (the output is one ``[V, F, ...]`` tensor).
    """

    def __init__(
        self,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        max_soft_tokens: int = 70,
        num_frames: int | None = 32,
        fps: float | None = None,
        do_sample_frames: bool = True,
        resample: str = "bicubic",
    ) -> None:
        super().__init__(patch_size, pooling_kernel_size, max_soft_tokens, resample)
        self.num_frames, self.fps = _check_sampling(num_frames, fps)
        self.do_sample_frames = bool(do_sample_frames)

    def __call__(self, videos: Any, **kwargs: Any) -> Gemma4VideoPreprocessed:
        return self.preprocess(videos, **kwargs)

    def sample_frames(self, metadata: Any, num_frames: int | None = None, fps: float | None = None) -> list[int]:
        """Indices of the frames kept from a video with this metadata (this call's or the
        instance's ``num_frames`` / ``fps``)."""
        meta = VideoMetadata.from_any(metadata)
        if num_frames is None and fps is None:
            num_frames, fps = self.num_frames, self.fps
        num_frames, fps = _check_sampling(num_frames, fps)
        return sample_frame_indices(meta.total_num_frames, num_frames=num_frames, fps=fps, video_fps=meta.fps)

    def preprocess(
        self,
        videos: Any,
        *,
        video_metadata: Any = None,
        num_frames: int | None = None,
        fps: float | None = None,
        do_sample_frames: bool | None = None,
        max_soft_tokens: int | None = None,
        channels_last: bool | None = None,
        device: torch.device | str | None = None,
    ) -> Gemma4VideoPreprocessed:
        """Preprocesses one video or several (see the class docstring).

        Args:
          videos: a video ([F, H, W, C] / [F, C, H, W] array or tensor, list of frames), a batch
            [V, F, ...] or a list of videos; uint8 [0, 255] or floating [0, 1].
          video_metadata: a :class:`VideoMetadata` / HF ``VideoMetadata`` / dict per video (or one for
            a single video): its ``fps`` gives the timestamps and ``fps`` sampling; its
            ``total_num_frames`` must be the frames given when sampling.
          num_frames / fps / do_sample_frames: override the instance's sampling for this call.
          max_soft_tokens: overrides the instance budget per frame.
          channels_last: layout of the frames; None infers it.
          device: where the work and the outputs go; default: the first tensor input's device, else CPU.
        """
        budget = self.max_soft_tokens if max_soft_tokens is None else _check_budget(max_soft_tokens)
        sample = self.do_sample_frames if do_sample_frames is None else bool(do_sample_frames)
        if num_frames is None and fps is None:
            num_frames, fps = self.num_frames, self.fps
        num_frames, fps = _check_sampling(num_frames, fps)
        p, k = self.patch_size, self.pooling_kernel_size
        max_patches = budget * k * k

        raw = split_videos(videos)
        metas = metadata_for(raw, video_metadata)
        prepared = []
        for i, (video, meta) in enumerate(zip(raw, metas)):
            total = num_frames_of(video)
            indices = None
            if sample:
                if meta is None:
                    meta = VideoMetadata(total)
                elif meta.total_num_frames != total:
                    raise ValueError(f"videos[{i}] has {total} frames but its video_metadata says total_num_frames="
                                     f"{meta.total_num_frames}; frames are sampled from the frames given "
                                     "(pass do_sample_frames=False for frames sampled already)")
                indices = sample_frame_indices(total, num_frames=num_frames, fps=fps, video_fps=meta.fps)
                meta.frames_indices = indices
            elif meta is None:
                meta = VideoMetadata(total, frames_indices=list(range(total)))
            elif meta.frames_indices is not None and len(meta.frames_indices) != total:
                raise ValueError(f"videos[{i}] has {total} frames but its video_metadata.frames_indices has "
                                 f"{len(meta.frames_indices)}")
            frames, white = prepare_video(video, indices, channels_last, f"videos[{i}]")
            meta.height = frames.shape[-2] if meta.height is None else meta.height
            meta.width = frames.shape[-1] if meta.width is None else meta.width
            prepared.append((frames, white, meta))

        counts = sorted({frames.shape[0] for frames, _, _ in prepared})
        if len(counts) > 1:
            raise ValueError(f"videos of one call must have the same number of frames after sampling, got {counts} "
                             "(sample a fixed num_frames, or preprocess them apart)")
        if device is None:
            device = next((f.device for (f, _, _), v in zip(prepared, raw) if _holds_tensors(v)), torch.device("cpu"))
        device = torch.device(device)

        nv, nf = len(prepared), counts[0]
        pixel_values = torch.zeros(nv, nf, max_patches, 3 * p * p, dtype=torch.float32, device=device)
        positions = torch.full((nv, nf, max_patches, 2), -1, dtype=torch.int64, device=device)
        tokens, grids, sizes = [], [], []
        for i, (frames, white, _) in enumerate(prepared):
            frames = frames.to(device)
            th, tw = get_aspect_ratio_preserving_size(frames.shape[-2], frames.shape[-1], p, max_patches, k)
            frames = resize_torchvision(frames, th, tw, self.resample)
            # HF's fused rescale + normalize (mean 0, std 1 / rescale_factor): float32 x / 255; [0, 1]
            # floats are taken as they are (HF with do_rescale=False).
            unit = frames.to(torch.float32)
            if white != 1.0:
                unit = unit.div_(white)
            patches, pos = _patchify(unit.permute(0, 2, 3, 1), p)
            n = patches.shape[1]
            pixel_values[i, :, :n] = patches
            positions[i, :, :n] = pos
            tokens.append(n // (k * k))
            grids.append((th // p, tw // p))
            sizes.append((th, tw))
        return Gemma4VideoPreprocessed(pixel_values, positions, tokens, [m for _, _, m in prepared], grids, sizes)


def _holds_tensors(video: Any) -> bool:
    return isinstance(video, torch.Tensor) or (isinstance(video, list) and isinstance(video[0], torch.Tensor))


def _check_sampling(num_frames: Any, fps: Any) -> tuple[int | None, float | None]:
    if num_frames is not None and fps is not None:
        raise ValueError(f"num_frames ({num_frames}) and fps ({fps}) are mutually exclusive; give one of them")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0):
        raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        fps = float(fps)
    return num_frames, fps

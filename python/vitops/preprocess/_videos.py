"""Video inputs every family's video processor accepts, frame sampling and video metadata, as HF's
torchvision-backed video processors have them (transformers 5.18: ``video_utils.py``,
``video_processing_utils.BaseVideoProcessor``).

Input forms (HF's ``make_batched_videos``): one video is a 4-D array or tensor ``[F, H, W, C]`` or
``[F, C, H, W]``, or a list of frames (PIL images, ``[H, W]`` / ``[H, W, C]`` / ``[C, H, W]`` arrays or
tensors); a single image is a one-frame video; several videos are a 5-D array or tensor, a list of
videos, or nested lists of them. uint8 holds [0, 255]; floating inputs hold [0, 1] (checked, not
rescaled again: vitops's convention for images too). The channel axis is inferred as for images
(``vitops.preprocess._images.channels_last_of``; pass ``channels_last`` when both ends look like one).

RGB conversion is the video processors' own (``video_utils.convert_to_rgb``), which differs from
the image processors': one channel is repeated, and an alpha channel is dropped only when every
sampled frame is opaque; otherwise the video is composited over white (in float32; uint8 videos
then leave [0, 255] integers, as in HF).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._images import channels_last_of, check_dtype, check_unit_range, is_pil

__all__ = ["VideoMetadata", "sample_frame_indices", "split_videos", "prepare_video", "metadata_for"]


@dataclasses.dataclass
class VideoMetadata:
    """What is known of a video besides its frames (HF's ``VideoMetadata`` fields).

    total_num_frames: frames of the source video; fps: its frame rate (None when unknown);
    frames_indices: the source index of every frame processed (set by frame sampling);
    height / width: frame size in pixels; duration (seconds) and video_backend: carried along.
    ``metadata["fps"]`` works as with HF's class; :meth:`from_any` reads HF's class or a dict.
    """

    total_num_frames: int
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    video_backend: str | None = None
    frames_indices: list[int] | None = None

    def __post_init__(self):
        n = self.total_num_frames
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"VideoMetadata: total_num_frames must be a non-negative int, got {n!r}")
        self.total_num_frames = int(n)
        if self.fps is not None:
            fps = float(self.fps)
            if not fps > 0 or fps == float("inf"):
                raise ValueError(f"VideoMetadata: fps must be a positive finite number or None, got {self.fps!r}")
            self.fps = fps
        if self.frames_indices is not None:
            self.frames_indices = [int(i) for i in np.asarray(self.frames_indices).reshape(-1)]

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each processed frame: ``frames_indices / fps`` (HF's property)."""
        if self.fps is None or self.frames_indices is None:
            raise ValueError("VideoMetadata: frame timestamps need both fps and frames_indices "
                             f"(fps={self.fps}, frames_indices={self.frames_indices})")
        return [i / self.fps for i in self.frames_indices]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    @classmethod
    def from_any(cls, metadata: Any) -> "VideoMetadata":
        """A copy of ``metadata``: a :class:`VideoMetadata`, HF's ``VideoMetadata`` or a mapping with
        these keys (unknown keys are an error, as in HF)."""
        if isinstance(metadata, cls):
            return dataclasses.replace(metadata, frames_indices=None if metadata.frames_indices is None
                                       else list(metadata.frames_indices))
        if not isinstance(metadata, Mapping):
            raise TypeError(f"video_metadata must be a VideoMetadata, HF's VideoMetadata or a dict, got "
                            f"{type(metadata).__name__}")
        data = {k: metadata[k] for k in metadata}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"video_metadata has unknown keys {unknown}; known keys: {known}")
        if "total_num_frames" not in data:
            raise ValueError("video_metadata needs total_num_frames")
        return cls(**data)


def sample_frame_indices(total_num_frames: int, *, num_frames: int | None = None, fps: float | None = None,
                         video_fps: float | None = None) -> list[int]:
    """Frames to keep, HF's ``default_sample_indices_fn``: ``num_frames`` evenly spaced
    (``i * total // num_frames``), or, with ``fps`` and no ``num_frames``, ``int(total / video_fps * fps)``
    of them; all frames when neither is given. Asking for more frames than the video has is an error
    (as in HF); so is an ``fps`` that keeps none (HF fails later, in a reshape of the empty video)."""
    if num_frames is None and fps is not None:
        if video_fps is None:
            raise ValueError(f"sampling fps={fps} frames per second needs the video's own fps: pass "
                             "video_metadata with fps, or sample a fixed num_frames")
        num_frames = int(total_num_frames / video_fps * fps)
        if num_frames == 0:
            raise ValueError(f"sampling fps={fps} keeps no frame of a video of {total_num_frames} frames at "
                             f"{video_fps} fps; raise fps or sample a fixed num_frames")
    if num_frames is None:
        return list(range(total_num_frames))
    if num_frames > total_num_frames:
        raise ValueError(f"cannot sample num_frames={num_frames} frames from a video of {total_num_frames} frames "
                         "(HF raises here too); pass a smaller num_frames or fps, or do_sample_frames=False")
    return [i * total_num_frames // num_frames for i in range(num_frames)]


# ---------------------------------------------------------------------------------------------
# input forms
# ---------------------------------------------------------------------------------------------
def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _is_frame(x: Any) -> bool:
    return is_pil(x) or (_is_array(x) and x.ndim in (2, 3))


def split_videos(videos: Any) -> list[Any]:
    """The accepted input forms as a list of videos, each a 4-D array / tensor or a list of frames."""
    if _is_frame(videos):
        return [[videos]]  # one image: a one-frame video
    if _is_array(videos):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return [videos[i] for i in range(videos.shape[0])]
        raise ValueError(f"videos: expected a video [F, H, W, C] / [F, C, H, W], a batch [V, F, ...] of them or a "
                         f"frame, got an array of shape {tuple(videos.shape)}")
    if not isinstance(videos, (list, tuple)):
        raise TypeError(f"videos: unsupported type {type(videos).__name__}; pass arrays, tensors, PIL frames or "
                        "lists of them")
    if len(videos) == 0:
        raise ValueError("videos: no video given (an empty list)")
    if all(_is_frame(v) for v in videos):
        return [list(videos)]  # one video as a list of frames
    out: list[Any] = []
    for i, v in enumerate(videos):
        if _is_frame(v):
            raise ValueError(f"videos[{i}] is a single frame in a list of videos; a list holds either the frames "
                             "of one video or whole videos, not both")
        if isinstance(v, (list, tuple)) and len(v) == 0:
            raise ValueError(f"videos[{i}] is an empty list (a video without frames)")
        out.extend(split_videos(v))
    return out


def _frame_array(frame: Any, channels_last: bool | None):
    """One frame as an ``[H, W, C]`` / ``[C, H, W]`` array or tensor (PIL: RGB, or RGBA when it has
    alpha, channels last; a 2-D frame gets its channel axis where ``channels_last`` puts it)."""
    if is_pil(frame):
        if frame.mode not in ("RGB", "RGBA"):
            has_alpha = "A" in frame.mode or "transparency" in frame.info
            frame = frame.convert("RGBA" if has_alpha else "RGB")
        return np.asarray(frame)
    if frame.ndim == 2:
        return frame[None] if channels_last is False else frame[..., None]
    return frame


def _stack_frames(frames: list[Any], channels_last: bool | None, where: str):
    arrays = [_frame_array(f, channels_last) for f in frames]
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{where}: the frames of a video must all have one shape, got {sorted(shapes)}")
    if all(isinstance(a, torch.Tensor) for a in arrays):
        return torch.stack(arrays)
    return np.stack([a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays])


def prepare_video(video: Any, indices: list[int] | None, channels_last: bool | None, where: str
                  ) -> tuple[torch.Tensor, float]:
    """A split video (its frames at ``indices``, all when None) as ``([F, 3, H, W] tensor, scale)``: the
    tensor is uint8 or floating on the input's device (CPU for numpy / PIL), RGB by HF's video rules,
    and ``scale`` is the value of white (255 for uint8 and composited uint8 videos, 1 for [0, 1] floats)."""
    if isinstance(video, (list, tuple)):
        if indices is not None:
            video = [video[i] for i in indices]
            indices = None
        video = _stack_frames(list(video), channels_last, where)
    if video.ndim != 4:
        raise ValueError(f"{where}: a video must be [F, H, W, C] or [F, C, H, W], got shape {tuple(video.shape)}")
    if isinstance(video, np.ndarray):
        check_dtype(video.dtype == np.uint8, np.issubdtype(video.dtype, np.floating), video.dtype)
        if indices is not None:
            video = video[np.asarray(indices, dtype=np.int64)]
        video = torch.from_numpy(np.ascontiguousarray(video))
    else:
        check_dtype(video.dtype == torch.uint8, video.is_floating_point(), video.dtype)
        if indices is not None:
            video = video[torch.tensor(indices, dtype=torch.long, device=video.device)]
    if 0 in video.shape:
        raise ValueError(f"{where}: empty video of shape {tuple(video.shape)}")
    if channels_last_of(video.shape[1:], channels_last):
        video = video.permute(0, 3, 1, 2)
    video = video.contiguous()
    is_u8 = video.dtype == torch.uint8
    if not is_u8:
        check_unit_range(video, "videos")
    scale = 255.0 if is_u8 else 1.0
    c = video.shape[1]
    if c == 1:
        return video.repeat(1, 3, 1, 1), scale
    if c == 4:
        alpha = video[:, 3:]
        if bool((alpha == scale).all()):
            return video[:, :3].contiguous(), scale
        # HF composites over white: (1 - a) * white + a * rgb, with a = alpha / 255 in float32.
        a = alpha / 255.0 if is_u8 else alpha
        return (1 - a) * scale + a * video[:, :3], scale
    return video, scale


def metadata_for(videos: list[Any], video_metadata: Any) -> list[VideoMetadata | None]:
    """Per video, a copy of the user's metadata (None where not given): one for a single video, or a
    list with one per video (nested lists are flattened, as in HF)."""
    if video_metadata is None:
        return [None] * len(videos)
    if isinstance(video_metadata, (list, tuple)):
        flat: list[Any] = []
        for m in video_metadata:
            flat.extend(m if isinstance(m, (list, tuple)) else [m])
    else:
        flat = [video_metadata]
    if len(flat) != len(videos):
        raise ValueError(f"video_metadata: got {len(flat)} entries for {len(videos)} videos (one per video)")
    return [VideoMetadata.from_any(m) for m in flat]


def num_frames_of(video: Any) -> int:
    return len(video) if isinstance(video, (list, tuple)) else int(video.shape[0])

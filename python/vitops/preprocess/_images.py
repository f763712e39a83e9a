"""Image inputs every family's processor accepts, and the resizes HF's processors run.

Input forms: PIL images, numpy arrays and torch tensors, ``[H, W]`` (grayscale), ``[H, W, C]`` or
``[C, H, W]`` with C in {1, 3, 4}, or a batch of those with a leading dimension, or a flat list of
any of these. uint8 holds [0, 255]; floating inputs hold [0, 1] (checked, not rescaled again).
``channels_last=None`` infers the layout when exactly one of the first/last axes has a channel-like
size (1, 3 or 4) and raises otherwise. Resizes: the *PIL path* (PIL's own resampling, HF's PIL
backend bit for bit on uint8), the *torch path* (two antialiased 1-D ``F.interpolate`` passes
in PIL's order, on the tensor's device; see ``vitops.preprocess.gemma4`` for the measured gap) and
:func:`resize_torchvision` (what HF's torchvision backend computes, bit for bit; the video path).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

RESAMPLE = ("bicubic", "bilinear")
BACKENDS = ("auto", "pil", "torch")
CHANNEL_SIZES = (1, 3, 4)

# HF rescales as float32(float64(v) * (1/255)); a table of those 256 values gives the same bits on
# every device without float64 arithmetic on the GPU.
UINT8_TO_UNIT = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)



# ---------------------------------------------------------------------------------------------
# input normalisation: everything becomes a list of ("pil", PIL.Image RGB) / ("np", HxWx3 array) /
# ("torch", 3xHxW tensor)
# ---------------------------------------------------------------------------------------------
def is_pil(obj: Any) -> bool:
    # PIL is optional for the tensor path, so check without importing it.
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert") and hasattr(obj, "resize")


def check_dtype(dtype_is_uint8: bool, dtype_is_float: bool, dtype: Any) -> None:
    if not (dtype_is_uint8 or dtype_is_float):
        raise TypeError(f"images must be uint8 ([0, 255]) or floating point ([0, 1]), got dtype {dtype}")


def channels_last_of(shape: Sequence[int], channels_last: bool | None) -> bool:
    """True when a 3-D shape is [H, W, C]; False for [C, H, W]."""
    first, last = shape[0] in CHANNEL_SIZES, shape[-1] in CHANNEL_SIZES
    if channels_last is None:
        if first == last:
            what = "both" if first else "neither"
            raise ValueError(
                f"cannot infer the channel axis of an image of shape {tuple(shape)}: {what} of the first and "
                f"last axes have a channel-like size {CHANNEL_SIZES}; pass channels_last=True or False"
            )
        channels_last = last
    c = shape[-1] if channels_last else shape[0]
    if c not in CHANNEL_SIZES:
        raise ValueError(f"image of shape {tuple(shape)} has {c} channels; expected one of {CHANNEL_SIZES}")
    return channels_last


def split_images(images: Any, channels_last: bool | None) -> list[Any]:
    """Flattens the accepted input forms into a list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given")
        out: list[Any] = []
        for im in images:
            if isinstance(im, (list, tuple)):
                raise TypeError("nested lists of images are not supported; pass a flat list")
            out.extend(split_images(im, channels_last))
        return out
    if is_pil(images):
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


def to_hwc_numpy(a: np.ndarray, channels_last: bool | None) -> np.ndarray:
    check_dtype(a.dtype == np.uint8, np.issubdtype(a.dtype, np.floating), a.dtype)
    if a.ndim == 2:
        a = a[..., None]
    elif not channels_last_of(a.shape, channels_last):
        a = a.transpose(1, 2, 0)
    return rgb_channels(a, axis=-1)


def to_chw_tensor(t: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
    check_dtype(t.dtype == torch.uint8, t.is_floating_point(), t.dtype)
    if t.ndim == 2:
        t = t[None]
    elif channels_last_of(t.shape, channels_last):
        t = t.permute(2, 0, 1)
    return rgb_channels(t, axis=0)


def rgb_channels(x, axis: int):
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


def check_unit_range(x, name: str) -> None:
    if (x.size if isinstance(x, np.ndarray) else x.numel()) == 0:
        return  # empty images are rejected later with a clearer message
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"floating-point {name} must hold values in [0, 1] (got [{lo}, {hi}]); pass uint8 for [0, 255] data"
        )


def prepare_image(im: Any, channels_last: bool | None, backend: str) -> tuple[bool, Any]:
    """One split image for a resize path: ``(torch path?, image)`` with the image a PIL RGB image or an
    HxWx3 numpy array (PIL path), or a 3xHxW tensor (torch path). Tensors take the torch path unless
    ``backend="pil"``; ``backend="torch"`` sends PIL images and arrays there too. Floating inputs
    are checked to hold [0, 1]."""
    use_torch = isinstance(im, torch.Tensor) and backend != "pil"
    use_torch = use_torch or (backend == "torch" and not isinstance(im, torch.Tensor))
    if is_pil(im):
        # HF converts every non-RGB mode (L, LA, P, RGBA, CMYK, I;16...) with PIL itself.
        im = im if im.mode == "RGB" else im.convert("RGB")
        if use_torch:
            im = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    elif isinstance(im, torch.Tensor):
        im = to_chw_tensor(im, channels_last)
        if im.is_floating_point():
            check_unit_range(im, "tensors")
        if not use_torch:
            im = im.detach().cpu().permute(1, 2, 0).numpy()
    else:
        im = to_hwc_numpy(im, channels_last)
        if np.issubdtype(im.dtype, np.floating):
            check_unit_range(im, "arrays")
        if use_torch:
            im = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
    return use_torch, im


def size_hw(x) -> tuple[int, int]:
    return (x.size[1], x.size[0]) if is_pil(x) else (x.shape[0], x.shape[1]) if isinstance(x, np.ndarray) else (x.shape[1], x.shape[2])


# ---------------------------------------------------------------------------------------------
# resizing
# ---------------------------------------------------------------------------------------------
def pil_filter(resample: str):
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resample]


def pass_sizes(h: int, w: int, th: int, tw: int) -> list[tuple[int, int]]:
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


def resize_pil_path(img, th: int, tw: int, resample: str) -> torch.Tensor:
    """PIL image (RGB) or HxWx3 numpy -> float32 [th, tw, 3] in [0, 1]."""
    from PIL import Image

    if is_pil(img) or img.dtype == np.uint8:
        pil = img if is_pil(img) else Image.fromarray(np.ascontiguousarray(img))
        if (pil.size[1], pil.size[0]) != (th, tw):
            pil = pil.resize((tw, th), resample=pil_filter(resample))
        u8 = torch.from_numpy(np.array(pil, dtype=np.uint8))
        return UINT8_TO_UNIT[u8.long()]
    # Float arrays: PIL has no float RGB mode, so each channel is a mode "F" (float32) image. Same
    # filter as the uint8 path without its rounding; clamping mirrors uint8 saturation.
    # One 1-D pass at a time (in the uint8 path's order) so values saturate between passes as
    # they do in uint8.
    a = np.ascontiguousarray(img, dtype=np.float32)
    for ph, pw in pass_sizes(a.shape[0], a.shape[1], th, tw):
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize((pw, ph), resample=pil_filter(resample)))
                 for c in range(3)]
        a = np.clip(np.stack(chans, axis=-1), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def resize_torch_path(t: torch.Tensor, th: int, tw: int, resample: str) -> torch.Tensor:
    """3xHxW tensor -> float32 [th, tw, 3] in [0, 1] on the tensor's device."""
    is_u8 = t.dtype == torch.uint8
    h, w = t.shape[1], t.shape[2]
    if (h, w) == (th, tw):
        out = UINT8_TO_UNIT.to(t.device)[t.long()] if is_u8 else t.to(torch.float32)
        return out.permute(1, 2, 0).contiguous()
    x = t[None].to(torch.float32)

    def settle(y: torch.Tensor) -> torch.Tensor:
        # PIL keeps each pass in uint8: round half up and saturate. Float images only saturate.
        return torch.floor(y + 0.5).clamp_(0, 255) if is_u8 else y.clamp_(0, 1)

    # Two 1-D passes in PIL's order; the rounding between them matters for uint8.
    for size in pass_sizes(h, w, th, tw):
        x = settle(F.interpolate(x, size=size, mode=resample, antialias=True, align_corners=False))
    x = x[0].permute(1, 2, 0)
    if is_u8:
        return UINT8_TO_UNIT.to(x.device)[x.long()].contiguous()
    return x.contiguous()



def _native_uint8_on_cpu(resample: str) -> bool:
    """torchvision's ``_do_native_uint8_resize_on_cpu``: whether a CPU uint8 image is interpolated as
    uint8 (torch's fixed-point kernel) rather than through float32. Bicubic always is; bilinear only
    where torch's vectorised uint8 kernel exists (AVX2 / AVX-512, arm64) or under compile."""
    if resample == "bicubic":
        return True
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return True
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_torchvision(frames: torch.Tensor, th: int, tw: int, resample: str) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, th, tw]``: what torchvision 0.29's ``transforms.v2.functional.resize``
    (``antialias=True``) computes on a tensor, the resize of HF's torchvision-backed processors (its
    video processors among them), with torch ops only (torch without torchvision lacks nothing here).

    One 2-D antialiased ``F.interpolate`` call. float32 / float64 frames are interpolated in their dtype
    and not clamped. uint8 frames on the CPU go to torch's uint8 kernel as they are (two fixed-point
    passes with uint8 rounding in between, like PIL's; bilinear only on CPUs with torch's vectorised
    kernel); elsewhere (CUDA) they are interpolated in float32, clamped to [0, 255] (bicubic), rounded
    half to even and cast back. That route is not the CPU kernel: on noise images the two differ by up
    to ~20 levels, so HF's video outputs depend on the device, and so do these. Other floating dtypes
    go through float32 and are cast back to their dtype (as torchvision does)."""
    h, w = frames.shape[-2:]
    if (h, w) == (th, tw):
        return frames
    dtype = frames.dtype
    native = dtype in (torch.float32, torch.float64) or (
        dtype == torch.uint8 and frames.device.type == "cpu" and _native_uint8_on_cpu(resample))
    x = frames if native else frames.to(torch.float32)
    x = F.interpolate(x, size=(th, tw), mode=resample, align_corners=False, antialias=True)
    if not native:
        if dtype == torch.uint8:
            if resample == "bicubic":
                x = x.clamp_(0, 255)
            x = x.round_()
        x = x.to(dtype)
    return x


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

"""vitops.patchify: images[..., H, W, C] -> (patches[..., N, p*p*C], positions_xy[..., N, 2]); with
``channels_first`` images[..., C, H, W] and (channel, row, col) patches (Llama 4's unfold)."""

from __future__ import annotations

import torch

from ._checks import (
    MAX_PATCH_SIZE,
    check_float,
    check_nonnegative,
    checked_mul,
    check_shape_fits,
    checked_product,
    fail_unless,
    shape_str,
)

_op = torch.ops.vitops.patchify.default
_backward_op = torch.ops.vitops._patchify_backward.default


def patchify(images: torch.Tensor, patch_size: int, *, channels_first: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchifies images and returns patches and (x, y) coordinates (MaxText ``patchify``).

    Args:
      images: [..., H, W, C] float tensor (``channels_first``: [..., C, H, W]); H and W divisible by
        ``patch_size``.
      patch_size: side of the square patches.
      channels_first: NCHW images and patches flattened in (channel, row, col) order: Llama 4's
        ``Llama4UnfoldConvolution`` (``torch.nn.Unfold`` / im2col order).

    Returns:
      patches: [..., (H/p)*(W/p), p*p*C], flattened in (row, col, channel) order (or (channel, row,
        col)), patches row-major.
      positions_xy: [..., (H/p)*(W/p), 2] int64, (x = column, y = row) in patch units.
    """
    return _op(images, patch_size, bool(channels_first))


def _check_patch_size(op, patch_size):
    fail_unless(patch_size > 0, lambda: f"vitops.{op}: `patch_size` must be a positive int, got {patch_size}")
    fail_unless(patch_size <= MAX_PATCH_SIZE, lambda: (
        f"vitops.{op}: `patch_size` ({patch_size}) is too large: patch_size * patch_size must fit in int64"))


def _image_layout(channels_first):
    return "[..., C, H, W]" if channels_first else "[..., H, W, C]"


@torch.library.register_fake("vitops::patchify")
def _patchify_fake(images, patch_size, channels_first=False):
    # csrc/ops/patchify/patchify.h check_forward, in the same order
    fail_unless(images.dim() >= 3, lambda: (
        f"vitops.patchify: `images` must have shape {_image_layout(channels_first)} (at least 3 dims), got "
        f"{shape_str(images)}"))
    check_float("patchify", "images", images)
    _check_patch_size("patchify", patch_size)
    if channels_first:
        *lead, c, h, w = images.shape
    else:
        *lead, h, w, c = images.shape
    fail_unless((h % patch_size == 0) & (w % patch_size == 0), lambda: (
        f"vitops.patchify: image height and width ({h}, {w}) must be divisible by `patch_size` ({patch_size}); "
        f"`images` has shape {shape_str(images)}"))
    patch_dim = checked_mul("patchify", "the patch width patch_size**2 * C", patch_size * patch_size, c)
    checked_product("patchify", "the batch size (product of the leading dims)", lead)
    n = (h // patch_size) * (w // patch_size)
    check_shape_fits("patchify", "the patches", (*lead, n, patch_dim))
    check_shape_fits("patchify", "the positions", (*lead, n, 2))
    patches = images.new_empty((*lead, n, patch_dim))
    positions = images.new_empty((*lead, n, 2), dtype=torch.int64)
    return patches, positions


@torch.library.register_fake("vitops::_patchify_backward")
def _patchify_backward_fake(grad_patches, height, width, patch_size, channels_first=False):
    op = "_patchify_backward"
    fail_unless(grad_patches.dim() >= 2, lambda: (
        f"vitops._patchify_backward: `grad_patches` must have shape [..., N, p*p*C], got {shape_str(grad_patches)}"))
    check_float(op, "grad_patches", grad_patches)
    check_nonnegative(op, "height", height)
    check_nonnegative(op, "width", width)
    _check_patch_size(op, patch_size)
    fail_unless((height % patch_size == 0) & (width % patch_size == 0), lambda: (
        f"vitops._patchify_backward: `height` ({height}) and `width` ({width}) must be multiples of "
        f"`patch_size` ({patch_size})"))
    *lead, n, pd = grad_patches.shape
    num_patches = checked_mul(op, "the patch count (height / p) * (width / p)", height // patch_size,
                              width // patch_size)
    fail_unless((pd % (patch_size * patch_size) == 0) & (n == num_patches), lambda: (
        f"vitops._patchify_backward: `grad_patches` shape {shape_str(grad_patches)} does not match a "
        f"{height}x{width} image with patch_size {patch_size} (expected [..., {num_patches}, patch_size**2 * C])"))
    c = pd // (patch_size * patch_size)
    checked_product(op, "the batch size (product of the leading dims)", lead)
    image = [c, height, width] if channels_first else [height, width, c]
    checked_product(op, "the image size (leading dims) * H * W * C", [*lead, *image])
    check_shape_fits(op, "the gradient of images", [*lead, *image])
    return grad_patches.new_empty((*lead, *image))


def _setup_context(ctx, inputs, output):
    images, patch_size, channels_first = inputs
    ctx.height, ctx.width = (images.shape[-2], images.shape[-1]) if channels_first else images.shape[-3:-1]
    ctx.patch_size = patch_size
    ctx.channels_first = channels_first


def _backward(ctx, grad_patches, grad_positions):
    if grad_patches is None:
        return None, None, None
    return _backward_op(grad_patches, ctx.height, ctx.width, ctx.patch_size, ctx.channels_first), None, None


torch.library.register_autograd("vitops::patchify", _backward, setup_context=_setup_context)

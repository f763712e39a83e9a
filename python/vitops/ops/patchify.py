"""vitops.patchify: images[..., H, W, C] -> (patches[..., N, p*p*C], positions_xy[..., N, 2])."""

from __future__ import annotations

import torch

_op = torch.ops.vitops.patchify.default
_backward_op = torch.ops.vitops._patchify_backward.default


def patchify(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchifies images and returns patches and (x, y) coordinates (MaxText ``patchify``).

    Args:
      images: [..., H, W, C] float tensor; H and W divisible by ``patch_size``.
      patch_size: side of the square patches.

    Returns:
      patches: [..., (H/p)*(W/p), p*p*C], flattened in (row, col, channel) order, patches row-major.
      positions_xy: [..., (H/p)*(W/p), 2] int64, (x = column, y = row) in patch units.
    """
    return _op(images, patch_size)


@torch.library.register_fake("vitops::patchify")
def _patchify_fake(images, patch_size):
    torch._check(images.dim() >= 3, lambda: f"vitops.patchify: `images` must be [..., H, W, C], got {images.shape}")
    *lead, h, w, c = images.shape
    torch._check(h % patch_size == 0 and w % patch_size == 0,
                 lambda: f"vitops.patchify: H and W ({h}, {w}) must be divisible by patch_size {patch_size}")
    n = (h // patch_size) * (w // patch_size)
    patches = images.new_empty((*lead, n, patch_size * patch_size * c))
    positions = images.new_empty((*lead, n, 2), dtype=torch.int64)
    return patches, positions


@torch.library.register_fake("vitops::_patchify_backward")
def _patchify_backward_fake(grad_patches, height, width, patch_size):
    *lead, _, pd = grad_patches.shape
    return grad_patches.new_empty((*lead, height, width, pd // (patch_size * patch_size)))


def _setup_context(ctx, inputs, output):
    images, patch_size = inputs
    ctx.height, ctx.width = images.shape[-3], images.shape[-2]
    ctx.patch_size = patch_size


def _backward(ctx, grad_patches, grad_positions):
    if grad_patches is None:
        return None, None
    return _backward_op(grad_patches, ctx.height, ctx.width, ctx.patch_size), None


torch.library.register_autograd("vitops::patchify", _backward, setup_context=_setup_context)

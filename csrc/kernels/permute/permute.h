// Patch permutations (host and device code): where an element of a patch layout lives in the image
// layout. patchify cuts images[..., H, W, C] into p x p patches, patches row-major, each flattened in
// (row, col, channel) order (HF / MaxText Gemma 4); one patch row is a run of p * C elements that is
// contiguous in both layouts, which is what the CPU copy loop and the CUDA vector path rely on.
// Llama 4's pixel shuffle with ratio 1/n is exactly this permutation over the [side, side, C] token
// grid with patch n (tests/test_layout.py checks it against HF). Llama 4's unfold patch extraction reads
// a [C, H, W] tile in (channel, row, col) order inside a patch: the channel-first variant of this grid
// (runs of p elements), added with the op option that uses it.
#pragma once

#include <cstdint>

#include "vitops/device_math.h"

namespace vitops::permute {

struct PatchGrid {
  int64_t height = 0, width = 0, channels = 0, patch = 1;

  VITOPS_HOST_DEVICE int64_t rows() const { return height / patch; }
  VITOPS_HOST_DEVICE int64_t cols() const { return width / patch; }
  VITOPS_HOST_DEVICE int64_t num_patches() const { return rows() * cols(); }
  VITOPS_HOST_DEVICE int64_t run() const { return patch * channels; }  // one patch row, contiguous in both layouts
  VITOPS_HOST_DEVICE int64_t patch_dim() const { return patch * run(); }
  VITOPS_HOST_DEVICE int64_t image_elems() const { return height * width * channels; }

  // Offset in the image layout [H, W, C] of element e of one image's patch layout [N, p * p * C]
  // ((row, col, channel) order inside a patch, patches row-major).
  VITOPS_HOST_DEVICE int64_t image_offset(int64_t e) const {
    const int64_t pd = patch_dim(), r_len = run();
    const int64_t n = e / pd;             // patch index
    const int64_t j = e - n * pd;         // offset inside the patch
    const int64_t r = j / r_len, k = j - r * r_len;
    const int64_t hp = n / cols(), wp = n - hp * cols();
    return ((hp * patch + r) * width + wp * patch) * channels + k;
  }

  // (x, y) = (column, row) of patch n, in patch units.
  VITOPS_HOST_DEVICE int64_t patch_x(int64_t n) const { return n % cols(); }
  VITOPS_HOST_DEVICE int64_t patch_y(int64_t n) const { return n / cols(); }
};

}  // namespace vitops::permute

// Patch permutations (host and device code): where an element of a patch layout lives in the image
// layout. An image is cut into p x p patches, patches row-major; each patch is flattened in one of
// two orders:
//   ChannelsLast   images [..., H, W, C], patch elements (row, col, channel): Gemma 4's patchify (HF /
//                  MaxText), and Llama 4's pixel shuffle, which is exactly this permutation over the
//                  [side, side, C] token grid with patch n = 1 / shuffle_ratio ((dh, dw, c) order)
//   ChannelsFirst  images [..., C, H, W], patch elements (channel, row, col): Llama 4's unfold patch
//                  embedding (torch.nn.Unfold / im2col order)
// A "run" is the stretch of a patch that is contiguous in both layouts: one patch row of p * C
// elements (ChannelsLast) or of p elements (ChannelsFirst); the CPU copy loop copies runs and the
// CUDA kernels move them as vectors where their length and the pointers allow.
#pragma once

#include <cstdint>

#include "vitops/device_math.h"

namespace vitops::permute {

enum class Order : int32_t { ChannelsLast = 0, ChannelsFirst = 1 };

struct PatchGrid {
  int64_t height = 0, width = 0, channels = 0, patch = 1;
  Order order = Order::ChannelsLast;

  VITOPS_HOST_DEVICE int64_t rows() const { return height / patch; }
  VITOPS_HOST_DEVICE int64_t cols() const { return width / patch; }
  VITOPS_HOST_DEVICE int64_t num_patches() const { return rows() * cols(); }
  VITOPS_HOST_DEVICE int64_t run() const { return order == Order::ChannelsLast ? patch * channels : patch; }
  VITOPS_HOST_DEVICE int64_t patch_dim() const { return patch * patch * channels; }
  VITOPS_HOST_DEVICE int64_t image_elems() const { return height * width * channels; }

  // Offset in one image's layout of element e of its patch layout [N, p * p * C].
  VITOPS_HOST_DEVICE int64_t image_offset(int64_t e) const {
    const int64_t pd = patch_dim();
    const int64_t n = e / pd;      // patch index
    const int64_t j = e - n * pd;  // offset inside the patch
    const int64_t hp = n / cols(), wp = n - hp * cols();
    if (order == Order::ChannelsLast) {
      const int64_t r_len = patch * channels;
      const int64_t r = j / r_len, k = j - r * r_len;  // patch row, then (col, channel)
      return ((hp * patch + r) * width + wp * patch) * channels + k;
    }
    const int64_t plane = patch * patch;
    const int64_t c = j / plane, rc = j - c * plane;
    const int64_t r = rc / patch, k = rc - r * patch;  // channel, patch row, patch col
    return (c * height + hp * patch + r) * width + wp * patch + k;
  }

  // Where the runs of one image row start. An image row is W * C elements (ChannelsLast: image row y)
  // or W elements (ChannelsFirst: row y of channel c); `line` enumerates them in image order
  // (y, or c * H + y). Returns the patch-layout offset of the row's first run; the run of patch column
  // wp follows at + wp * patch_dim(), and sits at + wp * run() in the image row.
  VITOPS_HOST_DEVICE int64_t lines() const { return order == Order::ChannelsLast ? height : channels * height; }
  VITOPS_HOST_DEVICE int64_t line_elems() const { return order == Order::ChannelsLast ? width * channels : width; }
  VITOPS_HOST_DEVICE int64_t line_patch_offset(int64_t line) const {
    if (order == Order::ChannelsLast) return (line / patch) * cols() * patch_dim() + (line % patch) * run();
    const int64_t c = line / height, y = line - c * height;
    return (y / patch) * cols() * patch_dim() + c * patch * patch + (y % patch) * patch;
  }

  // (x, y) = (column, row) of patch n, in patch units.
  VITOPS_HOST_DEVICE int64_t patch_x(int64_t n) const { return n % cols(); }
  VITOPS_HOST_DEVICE int64_t patch_y(int64_t n) const { return n / cols(); }
};

}  // namespace vitops::permute

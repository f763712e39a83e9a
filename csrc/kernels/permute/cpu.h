// Patch permutations on the CPU: a copy of contiguous runs (permute.h), parallel over image rows.
#pragma once

#include <cstring>

#include "kernels/permute/permute.h"
#include "vitops/common.h"

namespace vitops::permute::cpu {

// `batch` images of `grid`: to_patches=true moves images -> patches, false patches -> images (the
// backward: the same permutation, inverted). Each image is contiguous; consecutive images are
// `image_stride` elements apart (image_elems() for a contiguous batch; more for a view such as
// Llama 4's CLS-dropped tokens); the patches are contiguous.
template <typename scalar_t>
void permute_runs(const scalar_t* src, scalar_t* dst, const PatchGrid& grid, int64_t batch, bool to_patches,
                  int64_t image_stride) {
  const int64_t lines = grid.lines(), line_elems = grid.line_elems();
  const int64_t run = grid.run(), cols = grid.cols(), pd = grid.patch_dim(), image_elems = grid.image_elems();
  torch::stable::parallel_for(0, batch * lines, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / lines, line = row % lines;
      const int64_t image_off = b * image_stride + line * line_elems;
      const int64_t patch_base = b * image_elems + grid.line_patch_offset(line);
      for (int64_t wp = 0; wp < cols; ++wp) {
        const int64_t i_off = image_off + wp * run;
        const int64_t p_off = patch_base + wp * pd;
        if (to_patches) {
          std::memcpy(dst + p_off, src + i_off, run * sizeof(scalar_t));
        } else {
          std::memcpy(dst + i_off, src + p_off, run * sizeof(scalar_t));
        }
      }
    }
  });
}

// (x, y) of every patch of `batch` images: positions [batch, N, 2].
inline void fill_positions(int64_t* pos, const PatchGrid& grid, int64_t batch) {
  const int64_t n = grid.num_patches();
  torch::stable::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* out = pos + b * n * 2;
      for (int64_t i = 0; i < n; ++i) {
        out[2 * i] = grid.patch_x(i);
        out[2 * i + 1] = grid.patch_y(i);
      }
    }
  });
}

}  // namespace vitops::permute::cpu

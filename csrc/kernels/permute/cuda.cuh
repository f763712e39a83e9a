// Patch permutations on CUDA: one launch moves the elements (as VEC-element vectors when the runs
// and the pointers allow 16-byte accesses) and optionally writes the patch positions. int64 indexing.
#pragma once

#include "kernels/permute/permute.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::permute::cuda {

// Each thread handles VEC consecutive elements of one run (a run is contiguous in both layouts, so a
// vector never straddles two). Units are enumerated in patch order, so writes (forward) are coalesced.
template <typename scalar_t, int VEC>
__global__ void permute_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t* __restrict__ pos,
                               PatchGrid grid, int64_t batch, bool to_patches, int64_t image_stride) {
  const int64_t image_elems = grid.image_elems();
  const int64_t total_units = batch * image_elems / VEC;
  const int64_t num_patches = grid.num_patches();
  const int64_t total_pos = batch * num_patches;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total_units; u += stride) {
    const int64_t e = u * VEC;  // element offset in the patch layout
    const int64_t b = e / image_elems;
    const int64_t img = b * image_stride + grid.image_offset(e - b * image_elems);
    using V = Vec<scalar_t, VEC>;
    if (to_patches) {
      *reinterpret_cast<V*>(dst + e) = *reinterpret_cast<const V*>(src + img);
    } else {
      *reinterpret_cast<V*>(dst + img) = *reinterpret_cast<const V*>(src + e);
    }
  }
  if (pos != nullptr) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total_pos; i += stride) {
      const int64_t n = i % num_patches;
      pos[2 * i] = grid.patch_x(n);
      pos[2 * i + 1] = grid.patch_y(n);
    }
  }
}

// `batch` images of `grid` (each contiguous, `image_stride` elements apart) <-> their contiguous
// patches; `pos` (or nullptr) gets [batch, N, 2].
template <typename scalar_t>
void launch(const scalar_t* src, scalar_t* dst, int64_t* pos, const PatchGrid& grid, int64_t batch, bool to_patches,
            int64_t image_stride, cudaStream_t stream) {
  const int64_t elems = batch * grid.image_elems();
  const int64_t positions = pos != nullptr ? batch * grid.num_patches() : 0;
  const int64_t work = std::max(elems, positions);
  if (work == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  // every image start must stay aligned too: its stride is one of the lengths the vectors step by
  const bool vectorized = vector_fits(kVec, sizeof(scalar_t), {src, dst}, {grid.run(), image_stride});
  const int threads = 256;
  const int64_t units = vectorized ? elems / kVec : elems;
  const int64_t blocks = std::min<int64_t>(ceil_div(std::max(units, positions), threads), 65535LL * 8);
  if (vectorized) {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, kVec>)(src, dst, pos, grid, batch,
                                                                                        to_patches, image_stride);
  } else {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, 1>)(src, dst, pos, grid, batch,
                                                                                     to_patches, image_stride);
  }
  VITOPS_CUDA_CHECK_LAUNCH();
}

}  // namespace vitops::permute::cuda

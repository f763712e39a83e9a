// patchify on CUDA: one launch moves the pixels (as VEC-element vectors when the p*C runs and the
// pointers allow 16-byte accesses) and also writes the positions. int64 indexing throughout.
#include "../patchify.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::patchify {
namespace {

// Each thread handles VEC consecutive elements of one patch row run (p*C elements are contiguous
// in both layouts, so a vector never straddles two runs). Units are enumerated in patch order, so
// writes (forward) are coalesced.
template <typename scalar_t, int VEC>
__global__ void permute_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t* __restrict__ pos,
                               permute::PatchGrid grid, int64_t batch, bool to_patches) {
  const int64_t image_elems = grid.image_elems();
  const int64_t total_units = batch * image_elems / VEC;
  const int64_t num_patches = grid.num_patches();
  const int64_t total_pos = batch * num_patches;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total_units; u += stride) {
    const int64_t e = u * VEC;  // element offset in the patch layout
    const int64_t b = e / image_elems;
    const int64_t img = b * image_elems + grid.image_offset(e - b * image_elems);
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

template <typename scalar_t>
void launch(const scalar_t* src, scalar_t* dst, int64_t* pos, const Geometry& g, bool to_patches,
            cudaStream_t stream) {
  const int64_t elems = g.batch * g.image_elems();
  const int64_t work = std::max(elems, g.batch * g.num_patches());
  if (work == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorized = vector_fits(kVec, sizeof(scalar_t), {src, dst}, {g.run()});
  const int threads = 256;
  const int64_t units = vectorized ? elems / kVec : elems;
  const int64_t blocks = std::min<int64_t>(ceil_div(std::max(units, g.batch * g.num_patches()), threads), 65535LL * 8);
  const permute::PatchGrid grid = g;
  if (vectorized) {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, kVec>)(src, dst, pos, grid, g.batch,
                                                                                        to_patches);
  } else {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, 1>)(src, dst, pos, grid, g.batch,
                                                                                     to_patches);
  }
  VITOPS_CUDA_CHECK_LAUNCH();
}

std::tuple<Tensor, Tensor> patchify_cuda(const Tensor& images, int64_t patch_size) {
  const Geometry g = check_forward(images, patch_size, /*allow_double=*/false);
  CudaDeviceGuard guard(images.get_device());
  const auto outputs = allocate_forward(images, g);
  Tensor patches = std::get<0>(outputs), positions = std::get<1>(outputs);
  const Tensor src = as_contiguous(images);
  cudaStream_t stream = current_cuda_stream(images.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(images.scalar_type(), "patchify_cuda", [&] {
    launch<scalar_t>(src.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(),
                     positions.mutable_data_ptr<int64_t>(), g, true, stream);
  });
  return {patches, positions};
}

Tensor patchify_backward_cuda(const Tensor& grad, int64_t height, int64_t width, int64_t patch_size) {
  const Geometry g = check_backward(grad, height, width, patch_size, /*allow_double=*/false);
  CudaDeviceGuard guard(grad.get_device());
  Tensor out = allocate_backward(grad, g);
  const Tensor src = as_contiguous(grad);
  cudaStream_t stream = current_cuda_stream(grad.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad.scalar_type(), "patchify_backward_cuda", [&] {
    launch<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nullptr, g, false, stream);
  });
  return out;
}

}  // namespace
}  // namespace vitops::patchify

VITOPS_CUDA_KERNELS(m) {
  m.impl("patchify", TORCH_BOX(&vitops::patchify::patchify_cuda));
  m.impl("_patchify_backward", TORCH_BOX(&vitops::patchify::patchify_backward_cuda));
}

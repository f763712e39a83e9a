// patchify on CUDA: one launch moves the pixels (as VEC-element vectors when the p*C runs and the
// pointers allow 16-byte accesses) and also writes the positions. int64 indexing throughout.
#include "../patchify.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::patchify {
namespace {

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

// Each thread handles VEC consecutive elements of one patch row run (p*C elements are contiguous
// in both layouts). Units are enumerated in patch order, so writes (forward) are coalesced.
template <typename scalar_t, int VEC>
__global__ void permute_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t* __restrict__ pos,
                               int64_t batch, int64_t H, int64_t W, int64_t C, int64_t p, bool to_patches) {
  const int64_t cols = W / p, rows = H / p;
  const int64_t run = p * C;
  const int64_t pd = p * run;
  const int64_t units_per_run = run / VEC;
  const int64_t total_units = batch * H * W * C / VEC;
  const int64_t num_patches = rows * cols;
  const int64_t total_pos = batch * num_patches;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total_units; u += stride) {
    const int64_t e = u * VEC;                // element offset in patch layout
    const int64_t b = e / (H * W * C);
    const int64_t rem = e - b * (H * W * C);
    const int64_t n = rem / pd;               // patch index
    const int64_t j = rem - n * pd;           // offset inside the patch
    const int64_t r = j / run, k = j - (j / run) * run;
    const int64_t hp = n / cols, wp = n - hp * cols;
    const int64_t img = b * (H * W * C) + ((hp * p + r) * W + wp * p) * C + k;
    (void)units_per_run;
    if (to_patches) {
      *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + e) = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + img);
    } else {
      *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + img) = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + e);
    }
  }
  if (pos != nullptr) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total_pos; i += stride) {
      const int64_t n = i % num_patches;
      pos[2 * i] = n % cols;
      pos[2 * i + 1] = n / cols;
    }
  }
}

template <typename scalar_t>
void launch(const scalar_t* src, scalar_t* dst, int64_t* pos, const Geometry& g, bool to_patches,
            cudaStream_t stream) {
  const int64_t run = g.patch * g.channels;
  const int64_t elems = g.batch * g.height * g.width * g.channels;
  const int64_t work = std::max(elems, g.batch * g.num_patches());
  if (work == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = run % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int threads = 256;
  const int64_t units = aligned ? elems / kVec : elems;
  const int64_t blocks = std::min<int64_t>(ceil_div(std::max(units, g.batch * g.num_patches()), threads), 65535LL * 8);
  if (aligned) {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, kVec>)(src, dst, pos, g.batch, g.height, g.width,
                                                                            g.channels, g.patch, to_patches);
  } else {
    VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, permute_kernel<scalar_t, 1>)(src, dst, pos, g.batch, g.height, g.width,
                                                                         g.channels, g.patch, to_patches);
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

// patchify on CUDA: the patch permutation of kernels/permute/cuda.cuh, positions written by the same launch.
#include "../patchify.h"
#include "kernels/permute/cuda.cuh"

namespace vitops::patchify {
namespace {

std::tuple<Tensor, Tensor> patchify_cuda(const Tensor& images, int64_t patch_size, bool channels_first) {
  const Geometry g = check_forward(images, patch_size, channels_first, /*allow_double=*/false);
  CudaDeviceGuard guard(images.get_device());
  const auto outputs = allocate_forward(images, g);
  Tensor patches = std::get<0>(outputs), positions = std::get<1>(outputs);
  const Tensor src = as_contiguous(images);
  cudaStream_t stream = current_cuda_stream(images.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(images.scalar_type(), "patchify_cuda", [&] {
    permute::cuda::launch<scalar_t>(src.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(),
                                    positions.mutable_data_ptr<int64_t>(), g, g.batch, /*to_patches=*/true, g.image_elems(), stream);
  });
  return {patches, positions};
}

Tensor patchify_backward_cuda(const Tensor& grad, int64_t height, int64_t width, int64_t patch_size,
                              bool channels_first) {
  const Geometry g = check_backward(grad, height, width, patch_size, channels_first, /*allow_double=*/false);
  CudaDeviceGuard guard(grad.get_device());
  Tensor out = allocate_backward(grad, g);
  const Tensor src = as_contiguous(grad);
  cudaStream_t stream = current_cuda_stream(grad.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad.scalar_type(), "patchify_backward_cuda", [&] {
    permute::cuda::launch<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nullptr, g,
                                    g.batch, /*to_patches=*/false, g.image_elems(), stream);
  });
  return out;
}

}  // namespace
}  // namespace vitops::patchify

VITOPS_CUDA_KERNELS(m) {
  m.impl("patchify", TORCH_BOX(&vitops::patchify::patchify_cuda));
  m.impl("_patchify_backward", TORCH_BOX(&vitops::patchify::patchify_backward_cuda));
}

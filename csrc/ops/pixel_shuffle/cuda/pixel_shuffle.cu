// pixel_shuffle on CUDA: the patch permutation of kernels/permute/cuda.cuh over the token grid.
#include "../pixel_shuffle.h"
#include "kernels/permute/cuda.cuh"

namespace vitops::pixel_shuffle {
namespace {

// As the CPU kernel: the input grid read in place when grid_stride allows.
Tensor run(const Tensor& src_tensor, const Geometry& g, Tensor out, bool to_patches) {
  const int64_t stride = to_patches ? grid_stride(src_tensor, g) : -1;
  const Tensor src = stride >= 0 ? src_tensor : as_contiguous(src_tensor);
  cudaStream_t stream = current_cuda_stream(src.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(src.scalar_type(), "pixel_shuffle_cuda", [&] {
    permute::cuda::launch<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nullptr, g,
                                    g.batch, to_patches, stride >= 0 ? stride : g.image_elems(), stream);
  });
  return out;
}

Tensor pixel_shuffle_cuda(const Tensor& input, double shuffle_ratio) {
  const Geometry g = check_forward("pixel_shuffle", input, shuffle_ratio, /*allow_double=*/false);
  CudaDeviceGuard guard(input.get_device());
  return run(input, g, allocate_forward(input, g), /*to_patches=*/true);
}

Tensor pixel_shuffle_backward_cuda(const Tensor& grad, double shuffle_ratio) {
  const Geometry g = check_backward("_pixel_shuffle_backward", grad, shuffle_ratio, /*allow_double=*/false);
  CudaDeviceGuard guard(grad.get_device());
  return run(grad, g, allocate_backward(grad, g), /*to_patches=*/false);
}

}  // namespace
}  // namespace vitops::pixel_shuffle

VITOPS_CUDA_KERNELS(m) {
  m.impl("pixel_shuffle", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_cuda));
  m.impl("_pixel_shuffle_backward", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_backward_cuda));
}

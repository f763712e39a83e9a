// avg_pool_by_positions on CUDA: the pooling family's checks and kernels (kernels/pool/) with no
// epilogue. Invalid patches are skipped there (the CPU kernel raises instead).
#include "kernels/pool/cuda.cuh"

namespace vitops::avg_pool_by_positions {
namespace {

using namespace pool;  // Geometry, Epilogue, the checks and the kernels

std::tuple<Tensor, Tensor> avg_pool_by_positions_cuda(const Tensor& x, const Tensor& positions_xy, int64_t length) {
  const Geometry g = check_forward("avg_pool_by_positions", x, positions_xy, length, /*allow_double=*/false);
  CudaDeviceGuard guard(x.get_device());
  Tensor out, mask;
  std::tie(out, mask) = allocate_forward(x, g);
  if (mask.numel() == 0) return {out, mask};
  cudaStream_t stream = current_cuda_stream(x.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "avg_pool_by_positions_cuda", [&] {
    forward_for_dtype<scalar_t>("avg_pool_by_positions", x, positions_xy, g, out, mask, Epilogue{}, stream);
  });
  return {out, mask};
}

Tensor avg_pool_by_positions_backward_cuda(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                           int64_t seq_len) {
  const Geometry g = check_backward("_avg_pool_by_positions_backward", grad_output, positions_xy, length, seq_len, /*allow_double=*/false);
  CudaDeviceGuard guard(grad_output.get_device());
  Tensor grad_x = allocate_backward(grad_output, g);
  if (grad_x.numel() == 0) return grad_x;
  cudaStream_t stream = current_cuda_stream(grad_output.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad_output.scalar_type(), "avg_pool_by_positions_backward_cuda", [&] {
    backward_for_dtype<scalar_t>("_avg_pool_by_positions_backward", grad_output, positions_xy, g, grad_x, Epilogue{},
                                 stream);
  });
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_by_positions

VITOPS_CUDA_KERNELS(m) {
  m.impl("avg_pool_by_positions", TORCH_BOX(&vitops::avg_pool_by_positions::avg_pool_by_positions_cuda));
  m.impl("_avg_pool_by_positions_backward",
         TORCH_BOX(&vitops::avg_pool_by_positions::avg_pool_by_positions_backward_cuda));
}

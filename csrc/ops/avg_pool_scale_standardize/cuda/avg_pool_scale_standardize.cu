// avg_pool_scale_standardize on CUDA: the pooling family's kernels (kernels/pool/cuda.cuh) with the
// exit's epilogue, so the op is one launch with no atomics and no host synchronisation, and pools to
// the same bits as avg_pool_by_positions. Invalid patches are skipped (the CPU raises).
#include "../avg_pool_scale_standardize.h"
#include "kernels/pool/cuda.cuh"

namespace vitops::avg_pool_scale_standardize {
namespace {

std::tuple<Tensor, Tensor> avg_pool_scale_standardize_cuda(const Tensor& x, const Tensor& positions_xy,
                                                           int64_t length, double scale,
                                                           const std::optional<Tensor>& std_bias,
                                                           const std::optional<Tensor>& std_scale) {
  const char* op = "avg_pool_scale_standardize";
  const Geometry g = check_forward(op, x, positions_xy, length, std_bias, std_scale, /*allow_double=*/false);
  const pool::Geometry& pg = g.pool;
  CudaDeviceGuard guard(x.get_device());
  Tensor out, mask;
  std::tie(out, mask) = pool::allocate_forward(x, pg);
  if (mask.numel() == 0) return {out, mask};
  const pool::Epilogue epilogue = make_epilogue(g, scale, std_bias, std_scale);
  cudaStream_t stream = current_cuda_stream(x.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "avg_pool_scale_standardize_cuda", [&] {
    pool::forward_for_dtype<scalar_t>(op, x, positions_xy, pg, out, mask, epilogue, stream);
  });
  return {out, mask};
}

Tensor avg_pool_scale_standardize_backward_cuda(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                                int64_t seq_len, double scale, const std::optional<Tensor>& std_scale) {
  const char* op = "_avg_pool_scale_standardize_backward";
  const Geometry g = check_backward(op, grad_output, positions_xy, length, seq_len, std_scale, /*allow_double=*/false);
  const pool::Geometry& pg = g.pool;
  CudaDeviceGuard guard(grad_output.get_device());
  Tensor grad_x = pool::allocate_backward(grad_output, pg);
  if (grad_x.numel() == 0) return grad_x;
  const pool::Epilogue epilogue = make_epilogue(g, scale, std::nullopt, std_scale);
  cudaStream_t stream = current_cuda_stream(grad_output.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad_output.scalar_type(), "avg_pool_scale_standardize_backward_cuda", [&] {
    pool::backward_for_dtype<scalar_t>(op, grad_output, positions_xy, pg, grad_x, epilogue, stream);
  });
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_scale_standardize

VITOPS_CUDA_KERNELS(m) {
  m.impl("avg_pool_scale_standardize",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_cuda));
  m.impl("_avg_pool_scale_standardize_backward",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_backward_cuda));
}

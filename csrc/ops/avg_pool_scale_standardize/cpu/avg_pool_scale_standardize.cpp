// avg_pool_scale_standardize on the CPU: the pooling family's kernels (kernels/pool/cpu.h) with the
// exit's epilogue (round the pooled value to x's dtype, * scale, optional standardize, in float32 /
// float64 for float64 x). One implementation of the pooling, so both pooling ops pool to the same bits.
#include "../avg_pool_scale_standardize.h"
#include "kernels/pool/cpu.h"

namespace vitops::avg_pool_scale_standardize {
namespace {

std::tuple<Tensor, Tensor> avg_pool_scale_standardize_cpu(const Tensor& x, const Tensor& positions_xy,
                                                          int64_t length, double scale,
                                                          const std::optional<Tensor>& std_bias,
                                                          const std::optional<Tensor>& std_scale) {
  const char* op = "avg_pool_scale_standardize";
  const Geometry g = check_forward(op, x, positions_xy, length, std_bias, std_scale, /*allow_double=*/true);
  const pool::Geometry& pg = g.pool;
  Tensor out, mask;
  std::tie(out, mask) = pool::allocate_forward(x, pg);
  const std::vector<int64_t> slots = pool::cpu::slots_for(positions_xy, pg, op);  // validates even when x is empty
  if (mask.numel() == 0) return {out, mask};
  const pool::Epilogue epilogue = make_epilogue(g, scale, std_bias, std_scale);
  const Tensor src = pool::cpu::unit_stride_rows(x);
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "avg_pool_scale_standardize_cpu",
                           [&] { pool::cpu::pool_forward<scalar_t>(op, src, slots, pg, out, mask, epilogue); });
  return {out, mask};
}

Tensor avg_pool_scale_standardize_backward_cpu(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                               int64_t seq_len, double scale, const std::optional<Tensor>& std_scale) {
  const char* op = "_avg_pool_scale_standardize_backward";
  const Geometry g = check_backward(op, grad_output, positions_xy, length, seq_len, std_scale, /*allow_double=*/true);
  const pool::Geometry& pg = g.pool;
  Tensor grad_x = pool::allocate_backward(grad_output, pg);
  const std::vector<int64_t> slots = pool::cpu::slots_for(positions_xy, pg, op);
  if (grad_x.numel() == 0) return grad_x;
  const pool::Epilogue epilogue = make_epilogue(g, scale, std::nullopt, std_scale);
  const Tensor src = pool::cpu::unit_stride_rows(grad_output);
  VITOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "avg_pool_scale_standardize_backward_cpu",
                           [&] { pool::cpu::pool_backward<scalar_t>(src, slots, pg, grad_x, epilogue); });
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_scale_standardize

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("avg_pool_scale_standardize", TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_cpu));
  m.impl("_avg_pool_scale_standardize_backward",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_backward_cpu));
}

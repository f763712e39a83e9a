// avg_pool_by_positions on the CPU: the pooling family's checks and kernels (kernels/pool/) with no
// epilogue.
#include "kernels/pool/cpu.h"

namespace vitops::avg_pool_by_positions {
namespace {

using namespace pool;  // Geometry, Epilogue, the checks and the kernels

using cpu::pool_backward;
using cpu::pool_forward;
using cpu::slots_for;
using cpu::unit_stride_rows;

std::tuple<Tensor, Tensor> avg_pool_by_positions_cpu(const Tensor& x, const Tensor& positions_xy, int64_t length) {
  const char* op = "avg_pool_by_positions";
  const Geometry g = check_forward("avg_pool_by_positions", x, positions_xy, length, /*allow_double=*/true);
  Tensor out, mask;
  std::tie(out, mask) = allocate_forward(x, g);
  const std::vector<int64_t> slots = slots_for(positions_xy, g, op);  // validates even when x is empty
  if (mask.numel() == 0) return {out, mask};
  const Tensor src = unit_stride_rows(x);
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "avg_pool_by_positions_cpu",
                           [&] { pool_forward<scalar_t>(op, src, slots, g, out, mask, Epilogue{}); });
  return {out, mask};
}

Tensor avg_pool_by_positions_backward_cpu(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                          int64_t seq_len) {
  const char* op = "_avg_pool_by_positions_backward";
  const Geometry g = check_backward("_avg_pool_by_positions_backward", grad_output, positions_xy, length, seq_len, /*allow_double=*/true);
  Tensor grad_x = allocate_backward(grad_output, g);
  const std::vector<int64_t> slots = slots_for(positions_xy, g, op);
  if (grad_x.numel() == 0) return grad_x;
  const Tensor src = unit_stride_rows(grad_output);
  VITOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "avg_pool_by_positions_backward_cpu",
                           [&] { pool_backward<scalar_t>(src, slots, g, grad_x, Epilogue{}); });
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_by_positions

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("avg_pool_by_positions", TORCH_BOX(&vitops::avg_pool_by_positions::avg_pool_by_positions_cpu));
  m.impl("_avg_pool_by_positions_backward",
         TORCH_BOX(&vitops::avg_pool_by_positions::avg_pool_by_positions_backward_cpu));
}

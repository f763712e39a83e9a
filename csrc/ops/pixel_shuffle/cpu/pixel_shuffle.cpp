// pixel_shuffle on the CPU: the patch permutation of kernels/permute/cpu.h over the token grid.
#include "../pixel_shuffle.h"
#include "kernels/permute/cpu.h"

namespace vitops::pixel_shuffle {
namespace {

Tensor run(const Tensor& src_tensor, const Geometry& g, Tensor out, bool to_patches) {
  if (out.numel() == 0) return out;
  const Tensor src = as_contiguous(src_tensor);
  VITOPS_DISPATCH_FLOATING(src.scalar_type(), "pixel_shuffle_cpu", [&] {
    permute::cpu::permute_runs<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, g.batch,
                                         to_patches);
  });
  return out;
}

Tensor pixel_shuffle_cpu(const Tensor& input, double shuffle_ratio) {
  const char* op = "pixel_shuffle";
  const Geometry g = check_forward(op, input, shuffle_ratio, /*allow_double=*/true);
  return run(input, g, allocate_forward(input, g), /*to_patches=*/true);
}

Tensor pixel_shuffle_backward_cpu(const Tensor& grad, double shuffle_ratio) {
  const char* op = "_pixel_shuffle_backward";
  const Geometry g = check_backward(op, grad, shuffle_ratio, /*allow_double=*/true);
  return run(grad, g, allocate_backward(grad, g), /*to_patches=*/false);
}

}  // namespace
}  // namespace vitops::pixel_shuffle

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("pixel_shuffle", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_cpu));
  m.impl("_pixel_shuffle_backward", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_backward_cpu));
}

// pixel_shuffle on the CPU: the patch permutation of kernels/permute/cpu.h over the token grid.
#include "../pixel_shuffle.h"
#include "kernels/permute/cpu.h"

namespace vitops::pixel_shuffle {
namespace {

// to_patches: `src` is the input grid (read in place when grid_stride allows); else `src` is the
// output gradient (patch layout, made contiguous) and `out` the fresh input gradient.
Tensor run(const Tensor& src_tensor, const Geometry& g, Tensor out, bool to_patches) {
  if (out.numel() == 0) return out;
  const int64_t stride = to_patches ? grid_stride(src_tensor, g) : -1;
  const Tensor src = stride >= 0 ? src_tensor : as_contiguous(src_tensor);
  VITOPS_DISPATCH_FLOATING(src.scalar_type(), "pixel_shuffle_cpu", [&] {
    permute::cpu::permute_runs<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, g.batch,
                                         to_patches, stride >= 0 ? stride : g.image_elems());
  });
  return out;
}

Tensor pixel_shuffle_cpu(const Tensor& input, double shuffle_ratio) {
  const Geometry g = check_forward("pixel_shuffle", input, shuffle_ratio, /*allow_double=*/true);
  return run(input, g, allocate_forward(input, g), /*to_patches=*/true);
}

Tensor pixel_shuffle_backward_cpu(const Tensor& grad, double shuffle_ratio) {
  const Geometry g = check_backward("_pixel_shuffle_backward", grad, shuffle_ratio, /*allow_double=*/true);
  return run(grad, g, allocate_backward(grad, g), /*to_patches=*/false);
}

}  // namespace
}  // namespace vitops::pixel_shuffle

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("pixel_shuffle", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_cpu));
  m.impl("_pixel_shuffle_backward", TORCH_BOX(&vitops::pixel_shuffle::pixel_shuffle_backward_cpu));
}

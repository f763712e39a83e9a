// patchify on the CPU: the patch permutation of kernels/permute/cpu.h (a copy of contiguous runs).
#include "../patchify.h"
#include "kernels/permute/cpu.h"

namespace vitops::patchify {
namespace {

std::tuple<Tensor, Tensor> patchify_cpu(const Tensor& images, int64_t patch_size, bool channels_first) {
  const Geometry g = check_forward(images, patch_size, channels_first, /*allow_double=*/true);
  const auto outputs = allocate_forward(images, g);
  Tensor patches = std::get<0>(outputs), positions = std::get<1>(outputs);
  if (images.numel() > 0) {
    const Tensor src = as_contiguous(images);
    VITOPS_DISPATCH_FLOATING(images.scalar_type(), "patchify_cpu", [&] {
      permute::cpu::permute_runs<scalar_t>(src.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), g,
                                           g.batch, /*to_patches=*/true, g.image_elems());
    });
  }
  if (positions.numel() > 0) permute::cpu::fill_positions(positions.mutable_data_ptr<int64_t>(), g, g.batch);
  return {patches, positions};
}

Tensor patchify_backward_cpu(const Tensor& grad, int64_t height, int64_t width, int64_t patch_size,
                             bool channels_first) {
  const Geometry g = check_backward(grad, height, width, patch_size, channels_first, /*allow_double=*/true);
  Tensor out = allocate_backward(grad, g);
  if (out.numel() > 0) {
    const Tensor src = as_contiguous(grad);
    VITOPS_DISPATCH_FLOATING(grad.scalar_type(), "patchify_backward_cpu", [&] {
      permute::cpu::permute_runs<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g,
                                           g.batch, /*to_patches=*/false, g.image_elems());
    });
  }
  return out;
}

}  // namespace
}  // namespace vitops::patchify

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("patchify", TORCH_BOX(&vitops::patchify::patchify_cpu));
  m.impl("_patchify_backward", TORCH_BOX(&vitops::patchify::patchify_backward_cpu));
}

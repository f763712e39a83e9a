// patchify on the CPU: a permutation copy. Each (image, image row) moves W*C contiguous elements
// into Wp runs of p*C contiguous elements, so the inner loop is a memcpy-sized contiguous copy.
#include <cstring>

#include "../patchify.h"

namespace vitops::patchify {
namespace {

// to_patches=true: images -> patches; false: patches -> images (the backward, same permutation).
template <typename scalar_t>
void permute_rows(const scalar_t* src, scalar_t* dst, const Geometry& g, bool to_patches) {
  const int64_t H = g.height, row_elems = g.width * g.channels;
  const int64_t run = g.run(), cols = g.cols(), pd = g.patch_dim(), image_elems = g.image_elems();
  torch::stable::parallel_for(0, g.batch * H, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const int64_t image_off = b * image_elems + y * row_elems;
      // The first run of this image row sits in patch row y % p of the patch (y / p, 0).
      const int64_t patch_base = b * image_elems + (y / g.patch) * cols * pd + (y % g.patch) * run;
      for (int64_t wp = 0; wp < cols; ++wp) {
        const int64_t i_off = image_off + wp * run;
        const int64_t p_off = patch_base + wp * pd;
        if (to_patches) {
          std::memcpy(dst + p_off, src + i_off, run * sizeof(scalar_t));
        } else {
          std::memcpy(dst + i_off, src + p_off, run * sizeof(scalar_t));
        }
      }
    }
  });
}

void fill_positions(int64_t* pos, const Geometry& g) {
  const int64_t n = g.num_patches();
  torch::stable::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* out = pos + b * n * 2;
      for (int64_t i = 0; i < n; ++i) {
        out[2 * i] = g.patch_x(i);
        out[2 * i + 1] = g.patch_y(i);
      }
    }
  });
}

std::tuple<Tensor, Tensor> patchify_cpu(const Tensor& images, int64_t patch_size) {
  const Geometry g = check_forward(images, patch_size, /*allow_double=*/true);
  const auto outputs = allocate_forward(images, g);
  Tensor patches = std::get<0>(outputs), positions = std::get<1>(outputs);
  if (images.numel() > 0) {
    const Tensor src = as_contiguous(images);
    VITOPS_DISPATCH_FLOATING(images.scalar_type(), "patchify_cpu", [&] {
      permute_rows<scalar_t>(src.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), g, true);
    });
  }
  if (positions.numel() > 0) fill_positions(positions.mutable_data_ptr<int64_t>(), g);
  return {patches, positions};
}

Tensor patchify_backward_cpu(const Tensor& grad, int64_t height, int64_t width, int64_t patch_size) {
  const Geometry g = check_backward(grad, height, width, patch_size, /*allow_double=*/true);
  Tensor out = allocate_backward(grad, g);
  if (out.numel() > 0) {
    const Tensor src = as_contiguous(grad);
    VITOPS_DISPATCH_FLOATING(grad.scalar_type(), "patchify_backward_cpu", [&] {
      permute_rows<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, false);
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

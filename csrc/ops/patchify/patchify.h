// patchify: shape checks shared by the CPU and CUDA kernels (the permutation: kernels/permute/).
#pragma once
#include "kernels/permute/permute.h"
#include "vitops/common.h"

namespace vitops::patchify {

// images[..., H, W, C] (or [..., C, H, W] with channels_first) cut into p x p patches: `batch`
// images of one patch grid.
struct Geometry : permute::PatchGrid {
  int64_t batch = 0;  // product of the leading dims
};

// patch_size * patch_size must fit int64, or every size derived from it wraps (and a wrapped zero
// becomes a division by zero). 3037000499 is the largest such patch size.
inline void check_patch_size(const char* op, int64_t patch_size) {
  VITOPS_CHECK(patch_size > 0, "vitops.", op, ": `patch_size` must be a positive int, got ", patch_size);
  VITOPS_CHECK(patch_size <= 3037000499, "vitops.", op, ": `patch_size` (", patch_size,
               ") is too large: patch_size * patch_size must fit in int64");
}

inline const char* image_layout(bool channels_first) { return channels_first ? "[..., C, H, W]" : "[..., H, W, C]"; }

inline Geometry check_forward(const Tensor& images, int64_t patch_size, bool channels_first, bool allow_double) {
  const char* op = "patchify";
  VITOPS_CHECK(images.dim() >= 3, "vitops.patchify: `images` must have shape ", image_layout(channels_first),
               " (at least 3 dims), got ", shape_str(images));
  check_float(op, "images", images, allow_double);
  check_patch_size(op, patch_size);
  Geometry g;
  const int64_t d = images.dim();
  g.order = channels_first ? permute::Order::ChannelsFirst : permute::Order::ChannelsLast;
  g.height = images.size(channels_first ? d - 2 : d - 3);
  g.width = images.size(channels_first ? d - 1 : d - 2);
  g.channels = images.size(channels_first ? d - 3 : d - 1);
  g.patch = patch_size;
  VITOPS_CHECK(g.height % patch_size == 0 && g.width % patch_size == 0, "vitops.patchify: image height and width (",
               g.height, ", ", g.width, ") must be divisible by `patch_size` (", patch_size, "); `images` has shape ",
               shape_str(images));
  // The patch width p*p*C is a dim of the output: it must be representable.
  checked_mul(op, "the patch width patch_size**2 * C", patch_size * patch_size, g.channels);
  std::vector<int64_t> lead;
  for (int64_t i = 0; i < d - 3; ++i) lead.push_back(images.size(i));
  g.batch = checked_product(op, "the batch size (product of the leading dims)", lead);
  std::vector<int64_t> patches = lead, positions = lead;
  patches.insert(patches.end(), {g.num_patches(), g.patch_dim()});
  positions.insert(positions.end(), {g.num_patches(), 2});
  check_shape_fits(op, "the patches", patches);
  check_shape_fits(op, "the positions", positions);
  return g;
}

inline Geometry check_backward(const Tensor& grad, int64_t height, int64_t width, int64_t patch_size,
                               bool channels_first, bool allow_double) {
  const char* op = "_patchify_backward";
  VITOPS_CHECK(grad.dim() >= 2, "vitops._patchify_backward: `grad_patches` must have shape [..., N, p*p*C], got ",
               shape_str(grad));
  check_float(op, "grad_patches", grad, allow_double);
  check_nonnegative(op, "height", height);
  check_nonnegative(op, "width", width);
  check_patch_size(op, patch_size);
  VITOPS_CHECK(height % patch_size == 0 && width % patch_size == 0, "vitops._patchify_backward: `height` (", height,
               ") and `width` (", width, ") must be multiples of `patch_size` (", patch_size, ")");
  Geometry g;
  const int64_t d = grad.dim();
  g.order = channels_first ? permute::Order::ChannelsFirst : permute::Order::ChannelsLast;
  g.height = height;
  g.width = width;
  g.patch = patch_size;
  const int64_t pd = grad.size(d - 1);
  const int64_t num_patches = checked_mul(op, "the patch count (height / p) * (width / p)", height / patch_size,
                                          width / patch_size);
  VITOPS_CHECK(pd % (patch_size * patch_size) == 0 && grad.size(d - 2) == num_patches,
               "vitops._patchify_backward: `grad_patches` shape ", shape_str(grad), " does not match a ", height, "x",
               width, " image with patch_size ", patch_size, " (expected [..., ", num_patches,
               ", patch_size**2 * C])");
  g.channels = pd / (patch_size * patch_size);
  std::vector<int64_t> sizes;  // grad_images[..., H, W, C] ([..., C, H, W]) must be representable
  for (int64_t i = 0; i < d - 2; ++i) sizes.push_back(grad.size(i));
  g.batch = checked_product(op, "the batch size (product of the leading dims)", sizes);
  if (channels_first)
    sizes.insert(sizes.end(), {g.channels, height, width});
  else
    sizes.insert(sizes.end(), {height, width, g.channels});
  checked_product(op, "the image size (leading dims) * H * W * C", sizes);
  check_shape_fits(op, "the gradient of images", sizes);
  return g;
}

inline std::vector<int64_t> leading_sizes(const Tensor& t, int64_t trailing) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < t.dim() - trailing; ++i) s.push_back(t.size(i));
  return s;
}

// Allocates patches[..., N, p*p*C] and positions_xy[..., N, 2] (int64) for images[..., H, W, C]
// (or [..., C, H, W]).
inline std::tuple<Tensor, Tensor> allocate_forward(const Tensor& images, const Geometry& g) {
  auto psizes = leading_sizes(images, 3), qsizes = leading_sizes(images, 3);
  psizes.push_back(g.num_patches());
  psizes.push_back(g.patch_dim());
  qsizes.push_back(g.num_patches());
  qsizes.push_back(2);
  return {new_empty(images, psizes, images.scalar_type()), new_empty(images, qsizes, ScalarType::Long)};
}

// Allocates grad_images[..., H, W, C] ([..., C, H, W] channels first) for grad_patches[..., N, p*p*C].
inline Tensor allocate_backward(const Tensor& grad, const Geometry& g) {
  auto sizes = leading_sizes(grad, 2);
  if (g.order == permute::Order::ChannelsFirst)
    sizes.insert(sizes.end(), {g.channels, g.height, g.width});
  else
    sizes.insert(sizes.end(), {g.height, g.width, g.channels});
  return new_empty(grad, sizes, grad.scalar_type());
}

}  // namespace vitops::patchify

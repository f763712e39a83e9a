// pixel_shuffle (Llama 4's vision adapter; HF / MaxText / Meta `pixel_shuffle`): argument checks and
// geometry shared by the CPU and CUDA kernels.
//
// input [..., L, C] is a square grid of side = sqrt(L) tokens; with shuffle_ratio = 1/n every n x n
// block of tokens becomes one token of n*n*C channels in (dh, dw, c) order, tokens row-major:
//   out[..., h' * (side/n) + w', (dh * n + dw) * C + c] = in[..., (n h' + dh) * side + (n w' + dw), c]
// which is the patch permutation of kernels/permute (ChannelsLast, patch n) over the [side, side, C]
// token grid. Not torch's pixel_unshuffle (its channel order is (c, dh, dw)).
#pragma once

#include <cmath>
#include <vector>

#include "kernels/permute/permute.h"
#include "vitops/common.h"

namespace vitops::pixel_shuffle {

struct Geometry : permute::PatchGrid {
  int64_t batch = 0;  // product of the leading dims
};

// How far n * shuffle_ratio may be from 1: the rounding of 1/n to a double (a few ulps), not a
// nearby ratio such as 0.5000001, for which HF's views would fail.
constexpr double kRatioTolerance = 1e-12;

// shuffle_ratio = 1/n for a whole n >= 1; returns n.
inline int64_t block_of(const char* op, double shuffle_ratio) {
  const bool finite = std::isfinite(shuffle_ratio) && shuffle_ratio > 0.0 && shuffle_ratio <= 1.0;
  const double inverse = finite ? 1.0 / shuffle_ratio : 0.0;
  const int64_t n = finite && inverse < 3037000499.0 ? static_cast<int64_t>(std::llround(inverse)) : 0;
  VITOPS_CHECK(n >= 1 && std::fabs(static_cast<double>(n) * shuffle_ratio - 1.0) <= kRatioTolerance, "vitops.", op,
               ": `shuffle_ratio` must be 1/n for a whole n >= 1 (0.5, 0.25, ...), got ", shuffle_ratio);
  return n;
}

inline std::vector<int64_t> leading_sizes(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i + 2 < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

// input [..., L, C] -> the grid of its tokens; output [..., L / n², n² C].
inline Geometry check_forward(const char* op, const Tensor& input, double shuffle_ratio, bool allow_double) {
  VITOPS_CHECK(input.dim() >= 2, "vitops.", op, ": `input_tensor` must have shape [..., L, C] (at least 2 dims), got ",
               shape_str(input));
  check_float(op, "input_tensor", input, allow_double);
  const int64_t n = block_of(op, shuffle_ratio);
  const int64_t d = input.dim(), length = input.size(d - 2);
  const int64_t side = isqrt(length);
  VITOPS_CHECK(side * side == length, "vitops.", op, ": `input_tensor` has L = ", length,
               " tokens, which is not a square grid (L must be side * side); shape ", shape_str(input));
  VITOPS_CHECK(side % n == 0, "vitops.", op, ": `shuffle_ratio` 1/", n, " needs the grid side to be a multiple of ", n,
               ", got side ", side, " (L = ", length, ")");
  Geometry g;
  g.height = g.width = side;
  g.channels = input.size(d - 1);
  g.patch = n;
  g.batch = checked_product(op, "the batch size (product of the leading dims)", leading_sizes(input));
  std::vector<int64_t> out = leading_sizes(input);
  out.push_back(g.num_patches());
  out.push_back(checked_mul(op, "the output channels C / shuffle_ratio**2", n * n, g.channels));
  check_shape_fits(op, "the output", out);
  return g;
}

// grad_output [..., L', C'] of an output grid of side' = sqrt(L') -> grad_input [..., L' n², C' / n²].
inline Geometry check_backward(const char* op, const Tensor& grad, double shuffle_ratio, bool allow_double) {
  VITOPS_CHECK(grad.dim() >= 2, "vitops.", op, ": `grad_output` must have shape [..., L, C] (at least 2 dims), got ",
               shape_str(grad));
  check_float(op, "grad_output", grad, allow_double);
  const int64_t n = block_of(op, shuffle_ratio);
  const int64_t d = grad.dim(), length = grad.size(d - 2), channels = grad.size(d - 1);
  const int64_t side = isqrt(length);
  VITOPS_CHECK(side * side == length && channels % (n * n) == 0, "vitops.", op, ": `grad_output` shape ",
               shape_str(grad), " is not a pixel_shuffle output for shuffle_ratio 1/", n,
               " (expected [..., side², C * ", n * n, "])");
  Geometry g;
  g.height = g.width = checked_mul(op, "the input grid side", side, n);
  g.channels = channels / (n * n);
  g.patch = n;
  g.batch = checked_product(op, "the batch size (product of the leading dims)", leading_sizes(grad));
  std::vector<int64_t> in = leading_sizes(grad);
  in.push_back(checked_mul(op, "the input length", g.height, g.width));
  in.push_back(g.channels);
  check_shape_fits(op, "the gradient of input_tensor", in);
  return g;
}

// Elements between consecutive [L, C] grids when every grid is contiguous and the leading dims
// flatten to one stride (e.g. Llama 4's CLS-dropped view x[:, :-1] of [B, L + 1, C]), so the kernels
// read the input in place; -1 when it needs a contiguous copy.
inline int64_t grid_stride(const Tensor& t, const Geometry& g) {
  const int64_t d = t.dim(), length = t.size(d - 2), channels = t.size(d - 1);
  if (channels > 1 && t.stride(d - 1) != 1) return -1;
  if (length > 1 && t.stride(d - 2) != channels) return -1;
  int64_t unit = g.image_elems(), count = 1;
  for (int64_t i = d - 3; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (count == 1) {
      unit = t.stride(i);
    } else if (t.stride(i) != unit * count) {
      return -1;
    }
    count *= t.size(i);
  }
  return unit;
}

inline Tensor allocate_forward(const Tensor& input, const Geometry& g) {
  std::vector<int64_t> sizes = leading_sizes(input);
  sizes.push_back(g.num_patches());
  sizes.push_back(g.patch_dim());
  return new_empty(input, sizes, input.scalar_type());
}

inline Tensor allocate_backward(const Tensor& grad, const Geometry& g) {
  std::vector<int64_t> sizes = leading_sizes(grad);
  sizes.push_back(g.height * g.width);
  sizes.push_back(g.channels);
  return new_empty(grad, sizes, grad.scalar_type());
}

}  // namespace vitops::pixel_shuffle

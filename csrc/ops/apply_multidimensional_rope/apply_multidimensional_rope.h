// apply_multidimensional_rope: argument checks and strided row addressing shared by the CPU and
// CUDA kernels; the channel layout is the RoPE family's (kernels/rope/rope.h). The semantics are
// python/vitops/reference.py `apply_multidimensional_rope`.
#pragma once
#include <cmath>

#include "kernels/rope/rope.h"
#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::apply_multidimensional_rope {

struct Geometry {
  int64_t rows = 0;  // product of the leading dims and L: one positions entry (or ndim of them) per row
  int64_t heads = 0, head_dim = 0;
  int64_t position_axes = 1;  // positions entries per row (ndim for N-D, 1 for 1-D)
  rope::Layout layout;         // which channels rotate, by which axis (chunks); the rest pass through
};

// Validates inputs/positions/rotary_fraction (the same rules as the reference) and derives the chunks.
// `op` names the op in messages; `what` names the first tensor (`inputs` or `grad_output`).
inline Geometry check_and_plan(const char* op, const char* what, const Tensor& inputs, const Tensor& positions,
                               double base_frequency, std::optional<double> rotary_fraction, double scale_factor,
                               bool allow_double) {
  VITOPS_CHECK(inputs.dim() >= 3, "vitops.", op, ": `", what, "` must have shape [..., L, H, hd] (at least 3 dims), got ",
               shape_str(inputs));
  check_float(op, what, inputs, allow_double);
  const ScalarType pt = positions.scalar_type();
  VITOPS_CHECK(is_index_dtype(pt) || pt == ScalarType::Float || pt == ScalarType::Double, "vitops.", op,
               ": `positions` must be int32, int64, float32 or float64, got ", dtype_name(pt));
  check_same_device(op, what, inputs, "positions", positions);
  VITOPS_CHECK(std::isfinite(base_frequency) && base_frequency > 0, "vitops.", op,
               ": `base_frequency` must be a positive finite number, got ", base_frequency);
  VITOPS_CHECK(std::isfinite(scale_factor), "vitops.", op, ": `scale_factor` must be a finite number, got ",
               scale_factor);
  if (rotary_fraction.has_value()) {
    VITOPS_CHECK(*rotary_fraction >= 0.0 && *rotary_fraction <= 1.0, "vitops.", op,
                 ": `rotary_fraction` must be in [0, 1] or None, got ", *rotary_fraction);
  }

  check_shape_fits(op, "the output", sizes_of(inputs));  // contiguous, shaped like `inputs`
  const int64_t d = inputs.dim();
  Geometry g;
  g.head_dim = inputs.size(d - 1);
  g.heads = inputs.size(d - 2);
  // Rows are only walked when the tensor is not empty, and then rows * H * hd is its element count.
  g.rows = 0;
  if (g.heads > 0 && g.head_dim > 0) {
    std::vector<int64_t> lead;
    for (int64_t i = 0; i < d - 2; ++i) lead.push_back(inputs.size(i));
    g.rows = checked_product(op, "the row count (product of the [..., L] dims)", lead);
  }

  const bool one_d = positions.dim() + 2 == d;
  VITOPS_CHECK(one_d || positions.dim() + 1 == d, "vitops.", op,
               ": `positions` must have shape [..., L] (1-D) or [..., L, ndim] (N-D) for `", what, "` of shape ",
               shape_str(inputs), " [..., L, H, hd], got ", shape_str(positions));
  bool leading_match = true;
  for (int64_t i = 0; i < d - 2; ++i) leading_match = leading_match && positions.size(i) == inputs.size(i);
  VITOPS_CHECK(leading_match, "vitops.", op, ": the leading dims of `positions` ", shape_str(positions),
               " must equal the [..., L] dims of `", what, "` ", shape_str(inputs));

  if (one_d) {
    g.position_axes = 1;
    g.layout = rope::one_d_layout(op, g.head_dim, rotary_fraction, rope::Pairing::HalfSplit);
    return g;
  }
  const int64_t ndim = positions.size(positions.dim() - 1);
  VITOPS_CHECK(ndim >= 1, "vitops.", op, ": N-D `positions` ", shape_str(positions),
               " must have at least one position axis in its last dim");
  g.position_axes = ndim;
  g.layout = rope::n_d_layout(op, g.head_dim, ndim, rotary_fraction, rope::Pairing::HalfSplit);
  return g;
}

// Element offsets of the rows of a [..., L, H, hd] view: the dims before H collapsed where their
// strides allow, so slices of a fused QKV buffer are read in place. Row r's offset is found by
// unravelling r over the collapsed dims (innermost last).
constexpr int kMaxRowDims = 4;
struct RowAddressing {
  int num_dims = 0;
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};
  int64_t head_stride = 0;

  VITOPS_HOST_DEVICE int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int i = num_dims - 1; i >= 0; --i) {
      const int64_t size = sizes[i];
      const int64_t q = row / size;
      off += (row - q * size) * strides[i];
      row = q;
    }
    return off;
  }
};

// Collapses the row dims of t; false when more than kMaxRowDims groups remain (caller copies).
inline bool row_addressing(const Tensor& t, RowAddressing& out) {
  const int64_t d = t.dim();
  out = RowAddressing{};
  out.head_stride = t.stride(d - 2);
  std::vector<int64_t> sizes, strides;  // innermost group last
  for (int64_t i = 0; i < d - 2; ++i) {
    const int64_t size = t.size(i), stride = t.stride(i);
    if (size == 1) continue;  // a size-1 dim's stride never matters
    if (!sizes.empty() && strides.back() == stride * size) {
      sizes.back() *= size;  // the outer group steps over exactly this dim: merge
      strides.back() = stride;
    } else {
      sizes.push_back(size);
      strides.push_back(stride);
    }
  }
  if (sizes.size() > static_cast<size_t>(kMaxRowDims)) return false;
  if (sizes.empty()) {  // all row dims have size 1 (or there are none)
    sizes.push_back(1);
    strides.push_back(0);
  }
  out.num_dims = static_cast<int>(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    out.sizes[i] = sizes[i];
    out.strides[i] = strides[i];
  }
  return true;
}

// The tensor to read from and how to address it: t itself when its channels are contiguous and its
// row dims collapse into kMaxRowDims groups, otherwise a contiguous copy.
inline Tensor readable_view(const Tensor& t, RowAddressing& addressing) {
  const int64_t d = t.dim();
  const bool channels_contiguous = t.size(d - 1) <= 1 || t.stride(d - 1) == 1;
  if (channels_contiguous && row_addressing(t, addressing)) return t;
  Tensor c = torch::stable::contiguous(t);
  row_addressing(c, addressing);
  return c;
}

}  // namespace vitops::apply_multidimensional_rope

// avg_pool_scale_standardize: argument checks, and how the op drives avg_pool_by_positions' pooling
// kernels (which both ops share, CPU and CUDA) with its epilogue: pooled value rounded to x's dtype,
// * scale (sqrt(D)), optional standardize (y - std_bias) * std_scale, in float32.
//
// Slot rule (reference.avg_pool_by_positions / HF Gemma4VisionPooler): k = isqrt(L / length);
// image b's grid width W_b = max x over its non-padding patches + 1; patch (x, y) lands in slot
// x/k + (W_b/k) * (y/k); padding patches have both coordinates -1.
#pragma once

#include <optional>

#include "../avg_pool_by_positions/avg_pool_by_positions.h"
#include "vitops/common.h"
#include "vitops/rope_math.h"

namespace vitops::avg_pool_scale_standardize {

namespace pooling = avg_pool_by_positions;
using rope_math::ValueKind;

struct Geometry {
  int64_t batch, seq_len, dim, length, kernel;
  bool standardize;
  ValueKind bias_kind, scale_kind;
  int64_t bias_stride, scale_stride;
};

inline pooling::Geometry pooling_geometry(const Geometry& g) {
  return pooling::Geometry{g.batch, g.seq_len, g.dim, g.length, g.kernel};
}

// std_bias is only read by the forward (the backward passes nullopt).
inline pooling::Epilogue make_epilogue(const Geometry& g, double scale, const std::optional<Tensor>& std_bias,
                                       const std::optional<Tensor>& std_scale) {
  pooling::Epilogue e;
  e.active = true;
  e.scale = scale;
  e.standardize = g.standardize;
  if (g.standardize) {
    e.std_scale = std_scale->const_data_ptr();
    e.scale_kind = g.scale_kind;
    e.scale_stride = g.scale_stride;
    if (std_bias.has_value()) {
      e.bias = std_bias->const_data_ptr();
      e.bias_kind = g.bias_kind;
      e.bias_stride = g.bias_stride;
    }
  }
  return e;
}

inline void check_std_buffer(const char* op, const char* arg, const Tensor& t, const char* like_name, const Tensor& like,
                             int64_t dim, bool allow_double, ValueKind* kind, int64_t* stride) {
  VITOPS_CHECK(t.dim() == 1 && t.size(0) == dim, "vitops.", op, ": `", arg, "` must have shape [D] = [", dim,
               "], got ", shape_str(t));
  VITOPS_CHECK(is_float_dtype(t.scalar_type()) && (allow_double || t.scalar_type() != ScalarType::Double), "vitops.",
               op, ": `", arg, "` must be a float32, bfloat16 or float16", allow_double ? " or float64" : "",
               " tensor, got ", dtype_name(t.scalar_type()));
  check_same_device(op, like_name, like, arg, t);
  rope_math::value_kind_of(t.scalar_type(), kind);
  *stride = t.stride(0);
}

inline Geometry from_pooling(const pooling::Geometry& p) {
  Geometry g;
  g.batch = p.batch;
  g.seq_len = p.seq_len;
  g.dim = p.dim;
  g.length = p.length;
  g.kernel = p.kernel;
  g.standardize = false;
  g.bias_kind = g.scale_kind = ValueKind::Float32;
  g.bias_stride = g.scale_stride = 0;
  return g;
}

// The pooling op's checks (same rules, this op's name in messages), then the standardize buffers.
inline Geometry check_forward(const char* op, const Tensor& x, const Tensor& positions_xy, int64_t length,
                              const std::optional<Tensor>& std_bias, const std::optional<Tensor>& std_scale,
                              bool allow_double) {
  Geometry g = from_pooling(pooling::check_forward(op, x, positions_xy, length, allow_double));
  VITOPS_CHECK(std_bias.has_value() == std_scale.has_value(), "vitops.", op,
               ": `std_bias` and `std_scale` must be given together (both or neither)");
  g.standardize = std_bias.has_value();
  if (g.standardize) {
    check_std_buffer(op, "std_bias", *std_bias, "x", x, g.dim, allow_double, &g.bias_kind, &g.bias_stride);
    check_std_buffer(op, "std_scale", *std_scale, "x", x, g.dim, allow_double, &g.scale_kind, &g.scale_stride);
  }
  return g;
}

inline Geometry check_backward(const char* op, const Tensor& grad_output, const Tensor& positions_xy,
                               int64_t length, int64_t seq_len, const std::optional<Tensor>& std_scale,
                               bool allow_double) {
  Geometry g = from_pooling(pooling::check_backward(op, grad_output, positions_xy, length, seq_len, allow_double));
  g.standardize = std_scale.has_value();
  if (g.standardize)
    check_std_buffer(op, "std_scale", *std_scale, "grad_output", grad_output, g.dim, allow_double, &g.scale_kind, &g.scale_stride);
  return g;
}

}  // namespace vitops::avg_pool_scale_standardize

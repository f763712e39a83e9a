// avg_pool_scale_standardize: the pooling family's checks (kernels/pool/pool.h) plus the
// standardize buffers, and the epilogue with which the op drives the family's pooling kernels:
// pooled value rounded to x's dtype, * scale (sqrt(D)), optional standardize (y - std_bias) *
// std_scale, in float32 (float64 for float64 x).
#pragma once

#include <optional>

#include "kernels/pool/pool.h"
#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::avg_pool_scale_standardize {

struct Geometry {
  pool::Geometry pool;
  bool standardize = false;
  ValueKind bias_kind = ValueKind::Float32, scale_kind = ValueKind::Float32;
  int64_t bias_stride = 0, scale_stride = 0;
};

// std_bias is only read by the forward (the backward passes nullopt).
inline pool::Epilogue make_epilogue(const Geometry& g, double scale, const std::optional<Tensor>& std_bias,
                                    const std::optional<Tensor>& std_scale) {
  pool::Epilogue e;
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
  check_float_table(op, arg, t, allow_double);
  check_same_device(op, like_name, like, arg, t);
  value_kind_of(t.scalar_type(), kind);
  *stride = t.stride(0);
}

// The pooling family's checks (same rules, this op's name in messages), then the standardize buffers.
inline Geometry check_forward(const char* op, const Tensor& x, const Tensor& positions_xy, int64_t length,
                              const std::optional<Tensor>& std_bias, const std::optional<Tensor>& std_scale,
                              bool allow_double) {
  Geometry g;
  g.pool = pool::check_forward(op, x, positions_xy, length, allow_double);
  VITOPS_CHECK(std_bias.has_value() == std_scale.has_value(), "vitops.", op,
               ": `std_bias` and `std_scale` must be given together (both or neither)");
  g.standardize = std_bias.has_value();
  if (g.standardize) {
    check_std_buffer(op, "std_bias", *std_bias, "x", x, g.pool.dim, allow_double, &g.bias_kind, &g.bias_stride);
    check_std_buffer(op, "std_scale", *std_scale, "x", x, g.pool.dim, allow_double, &g.scale_kind, &g.scale_stride);
  }
  return g;
}

inline Geometry check_backward(const char* op, const Tensor& grad_output, const Tensor& positions_xy,
                               int64_t length, int64_t seq_len, const std::optional<Tensor>& std_scale,
                               bool allow_double) {
  Geometry g;
  g.pool = pool::check_backward(op, grad_output, positions_xy, length, seq_len, allow_double);
  g.standardize = std_scale.has_value();
  if (g.standardize)
    check_std_buffer(op, "std_scale", *std_scale, "grad_output", grad_output, g.pool.dim, allow_double, &g.scale_kind,
                     &g.scale_stride);
  return g;
}

}  // namespace vitops::avg_pool_scale_standardize

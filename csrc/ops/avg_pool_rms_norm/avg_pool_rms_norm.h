// avg_pool_rms_norm: Gemma 3's vision exit before its projection GEMM.
// x [B, L, D] is a square row-major token grid (L = side²); every k x k window (k = side / out_side,
// length = out_side²) is averaged as AvgPool2d does (the window summed in row-major order in the
// accumulation type, divided by k², rounded to x's dtype), then RMS-normalised over D as HF's
// Gemma3RMSNorm (kernels/norm/norm.h: float32, x * r * (1 + w) for "scale_plus_one"), rounded once.
#pragma once

#include <optional>
#include <string>

#include "kernels/norm/norm.h"
#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::avg_pool_rms_norm {

struct Geometry {
  int64_t batch, seq_len, dim, length, side, out_side, kernel;
  norm::Kind norm;
  ValueKind weight_kind = ValueKind::Float32;
  int64_t weight_stride = 0;
};

inline Geometry check_inputs(const char* op, const Tensor& x, int64_t length, const std::optional<Tensor>& weight,
                             double eps, const std::string& norm_name, bool allow_double) {
  VITOPS_CHECK(x.dim() == 3, "vitops.", op, ": `x` must have shape [B, L, D], got ", shape_str(x));
  check_float(op, "x", x, allow_double);
  Geometry g;
  g.batch = x.size(0);
  g.seq_len = x.size(1);
  g.dim = x.size(2);
  g.length = length;
  g.side = isqrt(g.seq_len);
  VITOPS_CHECK(g.side * g.side == g.seq_len, "vitops.", op, ": the sequence length of `x` must be a square grid ",
               "(side²), got ", g.seq_len);
  VITOPS_CHECK(length >= 1, "vitops.", op, ": `length` must be a positive int, got ", length);
  g.out_side = isqrt(length);
  VITOPS_CHECK(g.out_side * g.out_side == length && g.side % g.out_side == 0, "vitops.", op, ": `length` (", length,
               ") must be a square whose side divides the grid side ", g.side);
  g.kernel = g.side / g.out_side;
  check_shape_fits(op, "the output", {g.batch, length, g.dim});
  g.norm = norm::parse_kind(op, norm_name);
  const bool weighted = norm::has_weight(g.norm);
  VITOPS_CHECK(weight.has_value() == weighted, "vitops.", op, ": `weight` must be ", weighted ? "given" : "None",
               " with norm=\"", norm_name, "\"");
  if (weighted) {
    const Tensor& w = *weight;
    VITOPS_CHECK(w.dim() == 1 && w.size(0) == g.dim, "vitops.", op, ": `weight` must have shape [D] = [", g.dim,
                 "], got ", shape_str(w));
    check_float_table(op, "weight", w, allow_double);
    check_same_device(op, "x", x, "weight", w);
    value_kind_of(w.scalar_type(), &g.weight_kind);
    g.weight_stride = w.stride(0);
  }
  VITOPS_CHECK(std::isfinite(eps) && eps >= 0, "vitops.", op, ": `eps` must be a finite number >= 0, got ", eps);
  return g;
}

// The backward's outputs, allocated alike by both kernels: grad_x [B, L, D] in x's dtype and
// grad_weight [D] in the weight's dtype ([0] placeholder without a weight).
struct BackwardOutputs {
  Tensor grad_x, grad_weight;
};

inline BackwardOutputs allocate_backward(const Tensor& x, const Geometry& g, const std::optional<Tensor>& weight) {
  return {new_empty(x, {g.batch, g.seq_len, g.dim}, x.scalar_type()),
          weight.has_value() ? new_empty(x, {g.dim}, weight->scalar_type()) : new_empty(x, {0}, x.scalar_type())};
}

// The backward's grad_output: [B, length, D] in x's dtype, on x's device.
inline void check_grad_output(const char* op, const Tensor& grad, const Tensor& x, const Geometry& g) {
  VITOPS_CHECK(grad.dim() == 3 && grad.size(0) == g.batch && grad.size(1) == g.length && grad.size(2) == g.dim,
               "vitops.", op, ": `grad_output` must have shape [", g.batch, ", ", g.length, ", ", g.dim, "], got ",
               shape_str(grad));
  VITOPS_CHECK(grad.scalar_type() == x.scalar_type(), "vitops.", op, ": `grad_output` must have the dtype of `x` (",
               dtype_name(x.scalar_type()), "), got ", dtype_name(grad.scalar_type()));
  check_same_device(op, "x", x, "grad_output", grad);
}

}  // namespace vitops::avg_pool_rms_norm

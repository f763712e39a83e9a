// posemb_sincos_2d: MaxText's MoCo v3 2-D sin-cos position table (posemb_type_for_vit="sincos2d"),
// argument checks and math shared by the CPU and CUDA kernels.
//
//   out[0, y * w + x, :] = [sin(x f_k), cos(x f_k), sin(y f_k), cos(y f_k)],  k = 0 .. width/4 - 1
//   f_k = 1 / temperature^(k / max(width/4 - 1, 1))
//
// in float32 as MaxText's jnp code (and vitops.reference) computes it: the exponent k / (q - 1), the
// power and its reciprocal, and each angle as one float32 product; rounded once to the output dtype.
// MaxText divides by width/4 - 1 unguarded, so its width-4 table is NaN; here it is f_0 = 1.
//
// The op is a factory: it reads no tensor. `like` gives the device only (as Tensor.new_empty), which
// is what the dispatcher needs to pick the CPU or CUDA kernel; its shape and values are not read.
#pragma once

#include <cmath>
#include <optional>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::posemb_sincos_2d {

struct Geometry {
  int64_t height = 0, width = 0, channels = 0;
  float temperature = 0.f;
  ScalarType dtype = ScalarType::Float;

  int64_t quarter() const { return channels / 4; }
  int64_t rows() const { return height * width; }
};

inline Geometry check_inputs(const char* op, const Tensor& like, int64_t h, int64_t w, int64_t width,
                             double temperature, std::optional<ScalarType> dtype, bool allow_double) {
  VITOPS_CHECK(h >= 0, "vitops.", op, ": `h` must be a non-negative int, got ", h);
  VITOPS_CHECK(w >= 0, "vitops.", op, ": `w` must be a non-negative int, got ", w);
  VITOPS_CHECK(width >= 0 && width % 4 == 0, "vitops.", op,
               ": `width` must be a non-negative multiple of 4 (sin and cos of x and y per frequency), got ", width);
  const float t = static_cast<float>(temperature);
  VITOPS_CHECK(std::isfinite(temperature) && std::isfinite(t) && t > 0.f, "vitops.", op,
               ": `temperature` must be a positive number finite in float32, got ", temperature);
  const ScalarType out_dtype = dtype.value_or(like.scalar_type());
  VITOPS_CHECK(is_float_dtype(out_dtype) && (allow_double || out_dtype != ScalarType::Double), "vitops.", op,
               ": `dtype` must be float32, bfloat16, float16", allow_double ? " or float64" : " (float64 is CPU only)",
               " (None: the dtype of `like`), got ", dtype_name(out_dtype));
  const int64_t rows = checked_mul(op, "the table rows h * w", h, w);
  check_shape_fits(op, "the output", {1, rows, width});
  Geometry g;
  g.height = h;
  g.width = w;
  g.channels = width;
  g.temperature = t;
  g.dtype = out_dtype;
  return g;
}

// f_k in float32: the exponent as MaxText's arange(q) / (q - 1), then 1 / temperature^exponent.
VITOPS_HOST_DEVICE float frequency(int64_t k, int64_t quarter, float temperature) {
  const float exponent = static_cast<float>(k) / static_cast<float>(quarter > 1 ? quarter - 1 : 1);
  return 1.0f / powf(temperature, exponent);
}

// Channel c of a row at coordinates (x, y): which of the four blocks, and its frequency index.
VITOPS_HOST_DEVICE float value(int64_t x, int64_t y, int64_t c, int64_t quarter, float temperature) {
  const int64_t block = c / quarter, k = c - block * quarter;
  const float angle = static_cast<float>(block < 2 ? x : y) * frequency(k, quarter, temperature);
  return (block % 2 == 0) ? sinf(angle) : cosf(angle);
}

}  // namespace vitops::posemb_sincos_2d

// posemb_sincos_2d on the CPU. A row's x half depends on x only and its y half on y only, so sin and
// cos are evaluated once per (axis coordinate, frequency): h + w half-rows of width/2 floats, the
// same float32 values the per-element formula gives. The rows of the table are then copies of them
// (a write-bound loop, parallel over rows; the bf16/fp16 narrowing vectorizes).
#include <vector>

#include "../posemb_sincos_2d.h"

namespace vitops::posemb_sincos_2d {
namespace {

Tensor posemb_sincos_2d_cpu(const Tensor& like, int64_t h, int64_t w, int64_t width, double temperature,
                            std::optional<ScalarType> dtype) {
  const char* op = "posemb_sincos_2d";
  const Geometry g = check_inputs(op, like, h, w, width, temperature, dtype, /*allow_double=*/true);
  Tensor out = new_empty(like, {1, g.rows(), g.channels}, g.dtype);
  if (out.numel() == 0) return out;
  const int64_t q = g.quarter(), half = 2 * q;
  // half-rows: [sin(c f_k) for k] + [cos(c f_k) for k]; coordinates 0..w-1 (x), then 0..h-1 (y)
  const int64_t half_rows = g.width + g.height;
  std::vector<float> halves = scratch_vector<float>(op, "the per-axis sin/cos rows",
                                                    checked_mul(op, "the per-axis sin/cos rows", half_rows, half));
  torch::stable::parallel_for(0, half_rows, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t coord = i < g.width ? i : i - g.width;
      float* row = halves.data() + i * half;
      for (int64_t c = 0; c < half; ++c) row[c] = value(coord, coord, c, q, g.temperature);
    }
  });
  VITOPS_DISPATCH_FLOATING(g.dtype, "posemb_sincos_2d_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / g.channels);
    torch::stable::parallel_for(0, g.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float* xs = halves.data() + (m % g.width) * half;
        const float* ys = halves.data() + (g.width + m / g.width) * half;
        scalar_t* row = o + m * g.channels;
        for (int64_t c = 0; c < half; ++c) row[c] = narrow<scalar_t>(static_cast<acc_t<scalar_t>>(xs[c]));
        for (int64_t c = 0; c < half; ++c) row[half + c] = narrow<scalar_t>(static_cast<acc_t<scalar_t>>(ys[c]));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace vitops::posemb_sincos_2d

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("posemb_sincos_2d", TORCH_BOX(&vitops::posemb_sincos_2d::posemb_sincos_2d_cpu));
}

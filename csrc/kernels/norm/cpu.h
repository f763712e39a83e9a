// The CPU side of the RMS normalisation (kernels/norm/norm.h), shared by qkv_norm_rope and
// avg_pool_rms_norm: the row sums a norm and its backward need.
#pragma once

#include <cstdint>

namespace vitops::norm {

// Sum of x*y over a row in kLanes independent partial sums combined in a fixed tree: the lanes
// become SIMD registers (one running sum would be a serial chain of n dependent adds the compiler
// may not reorder), and the order is the same on every run and thread count.
constexpr int64_t kLanes = 16;

template <typename acc>
acc lane_dot(const acc* x, const acc* y, int64_t n) {
  acc lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += x[e + j] * y[e + j];
  for (int64_t j = 0; e < n; ++e, ++j) lanes[j] += x[e] * y[e];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

template <typename acc>
acc sum_of_squares(const acc* x, int64_t n) {
  return lane_dot(x, x, n);
}

// sum_of_squares of a row in its storage type, widened on the fly (the same lanes and order, so
// the same bits as widening it first).
template <typename acc, typename scalar_t>
acc sum_of_squares_widened(const scalar_t* x, int64_t n) {
  acc lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc v = widen(x[e + j]);
      lanes[j] += v * v;
    }
  for (int64_t j = 0; e < n; ++e, ++j) {
    const acc v = widen(x[e]);
    lanes[j] += v * v;
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

}  // namespace vitops::norm

// CPU RoPE helpers shared by apply_multidimensional_rope and qkv_norm_rope: the position scan that
// validates positions, and cos/sin tables per distinct integer position value.
//
// Valid positions: those whose every rotation angle (p * inv_freq[k]) * scale is finite in the
// accumulation type (float32, float64 for float64 inputs). That is the real limit: int64 positions
// up to +-2^63 convert to finite floats, but a NaN/inf float position, or a huge position times a
// large inverse frequency or scale, gives a non-finite angle and NaN outputs. The CPU kernels raise
// for those; the CUDA kernels, which cannot raise without a host sync, produce NaN rows.
//
// Angle tables: vision positions are small integers (patch coordinates: a few dozen distinct values
// per axis), but a kernel that evaluates sin/cos per (row, frequency) spends most of its time in
// libm (thousands of rows x tens of frequencies). For integer positions the angle of row r,
// frequency k is value(r) * inv_freq[k] exactly as before, so evaluating it once per (value, k) and
// looking it up gives bit-identical results at a fraction of the cost. Float positions (and integer
// ranges too wide to tabulate) keep the per-row evaluation.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vitops/common.h"

namespace vitops::cpu {

// What one pass over the positions found.
struct PositionRange {
  bool integer = false;
  int64_t lo = INT64_MAX, hi = INT64_MIN;  // integer positions: smallest and largest value
};

// Scans `count` positions and raises unless every angle is finite. `is_integer` says which loader
// applies: `int_at(i)` (int32/int64 data) or `float_at(i)` (floating data, already converted to
// acc). `scale` multiplies every angle; `inv_freq` are the rotated pairs' inverse frequencies.
template <typename acc, typename IntAt, typename FloatAt>
PositionRange scan_positions(const char* op, int64_t count, bool is_integer, IntAt int_at, FloatAt float_at,
                             const std::vector<acc>& inv_freq, acc scale) {
  PositionRange range;
  range.integer = is_integer;
  if (count == 0 || inv_freq.empty()) return range;  // nothing is rotated: positions are not read
  acc max_abs = 0;
  int64_t max_at = 0;
  if (is_integer) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t v = int_at(i);
      range.lo = v < range.lo ? v : range.lo;
      range.hi = v > range.hi ? v : range.hi;
    }
    const acc lo = static_cast<acc>(range.lo), hi = static_cast<acc>(range.hi);
    max_abs = std::fabs(lo) > std::fabs(hi) ? std::fabs(lo) : std::fabs(hi);
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const acc v = float_at(i);
      VITOPS_CHECK(std::isfinite(v), "vitops.", op, ": `positions` must be finite, got ", static_cast<double>(v),
                   " at flat index ", i);
      if (std::fabs(v) > max_abs) {
        max_abs = std::fabs(v);
        max_at = i;
      }
    }
  }
  // |(p * f) * s| grows with |p| (rounding is monotone), so the largest |p| bounds every angle.
  for (size_t k = 0; k < inv_freq.size(); ++k) {
    const acc angle = (max_abs * inv_freq[k]) * scale;
    VITOPS_CHECK(std::isfinite(angle), "vitops.", op, ": `positions` must give finite rotation angles: |position| ",
                 static_cast<double>(max_abs), is_integer ? "" : " (at flat index ", is_integer ? "" : std::to_string(max_at),
                 is_integer ? "" : ")", " x inverse frequency ", static_cast<double>(inv_freq[k]), " x scale ",
                 static_cast<double>(scale), " overflows ", sizeof(acc) == 4 ? "float32" : "float64");
  }
  return range;
}

template <typename acc>
class AngleTable {
 public:
  // Builds cos/sin[value - lo][k] for value in [lo, hi] when the span is small enough; `finish`
  // maps a raw cos/sin to what the kernel uses (e.g. rounding to the input dtype). The span is
  // computed in unsigned arithmetic: hi - lo overflows int64 for positions far apart.
  template <typename Finish>
  bool build(int64_t lo, int64_t hi, const std::vector<acc>& inv_freq, acc scale, Finish finish) {
    if (hi < lo) return false;
    const uint64_t span_minus_one = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    if (span_minus_one >= static_cast<uint64_t>(kMaxSpan)) return false;
    const int64_t span = static_cast<int64_t>(span_minus_one) + 1;
    const int64_t freqs = static_cast<int64_t>(inv_freq.size());
    if (freqs > kMaxEntries / span) return false;
    lo_ = lo;
    freqs_ = freqs;
    cos_.resize(span * freqs);
    sin_.resize(span * freqs);
    for (int64_t v = 0; v < span; ++v) {
      const acc p = static_cast<acc>(lo + v);
      for (int64_t k = 0; k < freqs; ++k) {
        const acc angle = (p * inv_freq[k]) * scale;  // same expression as the per-row path
        cos_[v * freqs + k] = finish(std::cos(angle));
        sin_[v * freqs + k] = finish(std::sin(angle));
      }
    }
    return true;
  }
  acc cos(int64_t value, int64_t k) const { return cos_[(value - lo_) * freqs_ + k]; }
  acc sin(int64_t value, int64_t k) const { return sin_[(value - lo_) * freqs_ + k]; }

 private:
  static constexpr int64_t kMaxSpan = 1 << 16;
  static constexpr int64_t kMaxEntries = 1 << 22;  // 16 MiB of float tables at most
  int64_t lo_ = 0, freqs_ = 0;
  std::vector<acc> cos_, sin_;
};

}  // namespace vitops::cpu

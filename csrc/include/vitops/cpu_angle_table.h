// CPU RoPE helper: cos/sin tables per distinct integer position value.
//
// Vision positions are small integers (patch coordinates: a few dozen distinct values per axis),
// but a kernel that evaluates sin/cos per (row, frequency) spends most of its time in libm
// (thousands of rows x tens of frequencies). For integer positions the angle of row r, frequency
// k is value(r) * inv_freq[k] exactly as before, so evaluating it once per (value, k) and looking
// it up gives bit-identical results at a fraction of the cost. Float positions (and integer ranges
// too wide to tabulate) keep the per-row evaluation.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "vitops/common.h"

namespace vitops::cpu {

template <typename acc>
class AngleTable {
 public:
  // Builds cos/sin[value - lo][k] for value in [lo, hi] when the span is small enough; `finish`
  // maps a raw cos/sin to what the kernel uses (e.g. rounding to the input dtype).
  template <typename Finish>
  bool build(int64_t lo, int64_t hi, const std::vector<acc>& inv_freq, acc scale, Finish finish) {
    const int64_t span = hi - lo + 1;
    const int64_t freqs = static_cast<int64_t>(inv_freq.size());
    if (hi < lo || span > kMaxSpan || span * freqs > kMaxEntries) return false;
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

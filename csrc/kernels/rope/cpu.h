// The CPU side of the RoPE description (kernels/rope/rope.h), shared by apply_multidimensional_rope
// and qkv_norm_rope: position validation, cos/sin per row (tabulated for integer positions) and the
// rotation of one head row.
//
// Valid positions: those whose every rotation angle (p * inv_freq) * scale is finite in the
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/rope/rope.h"
#include "vitops/common.h"

namespace vitops::rope::cpu {

// positions of row r (leading dims x L flattened), axis a: data[(r / L) * stride_b + (r % L) *
// stride_l + a * stride_axis], of run-time dtype `kind`.
struct PositionView {
  const void* data = nullptr;
  ValueKind kind = ValueKind::Int64;
  int64_t seq_len = 1, stride_b = 0, stride_l = 0, stride_axis = 0, axes = 1;
  int64_t offset(int64_t row, int64_t axis) const {
    const int64_t b = row / seq_len, l = row - b * seq_len;
    return b * stride_b + l * stride_l + axis * stride_axis;
  }
  int64_t integer(int64_t row, int64_t axis) const { return load_index_as_int64(data, kind, offset(row, axis)); }
  template <typename acc>
  acc value(int64_t row, int64_t axis) const {
    return load_as<acc>(data, kind, offset(row, axis));
  }
};

// What one pass over the positions found.
struct PositionRange {
  bool integer = false;
  int64_t lo = INT64_MAX, hi = INT64_MIN;  // integer positions: smallest and largest value
};

// Scans the positions of `rows` rows and raises unless every angle is finite; flat index i is
// (row i / axes, axis i % axes). `scale` multiplies every angle; `inv_freq` are the rotated pairs'
// inverse frequencies.
template <typename acc>
PositionRange scan_positions(const char* op, const PositionView& pos, int64_t rows, const std::vector<acc>& inv_freq,
                             acc scale) {
  PositionRange range;
  range.integer = is_integer_kind(pos.kind);
  const int64_t count = rows * pos.axes;
  if (count == 0 || inv_freq.empty()) return range;  // nothing is rotated: positions are not read
  acc max_abs = 0;
  int64_t max_at = 0;
  if (range.integer) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t v = pos.integer(i / pos.axes, i % pos.axes);
      range.lo = v < range.lo ? v : range.lo;
      range.hi = v > range.hi ? v : range.hi;
    }
    const acc lo = static_cast<acc>(range.lo), hi = static_cast<acc>(range.hi);
    max_abs = std::fabs(lo) > std::fabs(hi) ? std::fabs(lo) : std::fabs(hi);
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const acc v = pos.value<acc>(i / pos.axes, i % pos.axes);
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
                 static_cast<double>(max_abs), range.integer ? "" : " (at flat index ",
                 range.integer ? "" : std::to_string(max_at), range.integer ? "" : ")", " x inverse frequency ",
                 static_cast<double>(inv_freq[k]), " x scale ", static_cast<double>(scale), " overflows ",
                 sizeof(acc) == 4 ? "float32" : "float64");
  }
  return range;
}

// Length of the per-row cos/sin tables that RowAngles::fill writes and rotate_row reads: one entry
// per rotated pair for half-split chunks; one per rotated channel for interleaved pairs, where
// channel 2k and 2k + 1 both carry pair k's cos, and sin carries the sign of the channel's term
// (-sin for 2k, +sin for 2k + 1). With those tables the interleaved rotation is a single loop over
// the row's adjacent pairs, y[2k] = x[2k] C[2k] + x[2k+1] S[2k], y[2k+1] = x[2k+1] C[2k+1] +
// x[2k] S[2k+1]: no per-chunk short loops and no add/sub mix. It is the same arithmetic to the bit:
// x1 (-s) is -(x1 s) exactly, and a + (-b) is a - b.
inline int64_t table_length(const Layout& l) {
  return l.pairing == Pairing::Interleaved ? l.rotated : l.num_pairs();
}

// Writes pair k's cos c and sin s into a row's tables in table_length's form.
template <typename acc>
inline void put_pair(bool interleaved, int64_t k, acc c, acc s, acc* cos, acc* sin) {
  if (!interleaved) {
    cos[k] = c;
    sin[k] = s;
    return;
  }
  cos[2 * k] = c;
  cos[2 * k + 1] = c;
  sin[2 * k] = -s;
  sin[2 * k + 1] = s;
}

// The row tables of every integer position value in [lo, hi], in table_length's form, so that a
// row's tables are a copy of one stored row per position axis.
template <typename acc>
class AngleTable {
 public:
  // Builds the tables when the span is small enough; `finish` maps a raw cos/sin to what the kernel
  // uses (e.g. rounding to the input dtype), `sin_sign` multiplies every sin. The span is computed in
  // unsigned arithmetic: hi - lo overflows int64 for positions far apart.
  template <typename Finish>
  bool build(int64_t lo, int64_t hi, const std::vector<acc>& inv_freq, acc scale, bool interleaved, acc sin_sign,
             Finish finish) {
    if (hi < lo) return false;
    const uint64_t span_minus_one = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    if (span_minus_one >= static_cast<uint64_t>(kMaxSpan)) return false;
    const int64_t span = static_cast<int64_t>(span_minus_one) + 1;
    const int64_t freqs = static_cast<int64_t>(inv_freq.size());
    const int64_t entries = interleaved ? 2 * freqs : freqs;
    if (entries > kMaxEntries / span) return false;
    lo_ = lo;
    entries_ = entries;
    cos_.resize(span * entries);
    sin_.resize(span * entries);
    for (int64_t v = 0; v < span; ++v) {
      const acc p = static_cast<acc>(lo + v);
      for (int64_t k = 0; k < freqs; ++k) {
        const acc angle = (p * inv_freq[k]) * scale;  // same expression as the per-row path
        put_pair(interleaved, k, finish(std::cos(angle)), sin_sign * finish(std::sin(angle)), &cos_[v * entries],
                 &sin_[v * entries]);
      }
    }
    return true;
  }
  const acc* cos_row(int64_t value) const { return cos_.data() + (value - lo_) * entries_; }
  const acc* sin_row(int64_t value) const { return sin_.data() + (value - lo_) * entries_; }

 private:
  static constexpr int64_t kMaxSpan = 1 << 16;
  static constexpr int64_t kMaxEntries = 1 << 22;  // 16 MiB of float tables at most
  int64_t lo_ = 0, entries_ = 0;
  std::vector<acc> cos_, sin_;
};

// cos/sin of every row in rotate_row's table form (table_length): validated positions, tabulated
// when integer, each value rounded to `round_kind` (HF casts cos/sin to a dtype) and sin multiplied
// by `sin_sign` (-1: the transposed rotation of the backward; the negation commutes with the
// rounding).
template <typename acc>
class RowAngles {
 public:
  RowAngles(const char* op, const Layout& layout, std::vector<acc> inv_freq, acc scale, ValueKind round_kind,
            const PositionView& positions, int64_t rows, acc sin_sign = acc(1))
      : inv_freq_(std::move(inv_freq)), scale_(scale), round_kind_(round_kind), pos_(positions), sin_sign_(sin_sign),
        interleaved_(layout.pairing == Pairing::Interleaved) {
    // pairs of chunk (position axis) c: [first_pair_[c], first_pair_[c + 1])
    first_pair_.assign(layout.num_chunks + 1, 0);
    for (int64_t c = 0; c < layout.num_chunks; ++c) first_pair_[c + 1] = first_pair_[c] + layout.width(c) / 2;
    const PositionRange range = scan_positions<acc>(op, pos_, rows, inv_freq_, scale_);
    const ValueKind kind = round_kind_;
    tabulated_ = range.integer && range.lo <= range.hi &&
                 table_.build(range.lo, range.hi, inv_freq_, scale_, interleaved_, sin_sign_,
                              [kind](acc v) { return round_as(kind, v); });
  }

  // Writes table_length(layout) entries to cos and sin.
  void fill(int64_t row, acc* cos, acc* sin) const {
    const int64_t per_pair = interleaved_ ? 2 : 1;
    for (size_t axis = 0; axis + 1 < first_pair_.size(); ++axis) {
      const int64_t begin = first_pair_[axis], end = first_pair_[axis + 1];
      if (tabulated_) {  // the axis' entries of the stored row of its position value
        const int64_t v = pos_.integer(row, static_cast<int64_t>(axis));
        const int64_t first = per_pair * begin, count = per_pair * (end - begin);
        std::copy(table_.cos_row(v) + first, table_.cos_row(v) + first + count, cos + first);
        std::copy(table_.sin_row(v) + first, table_.sin_row(v) + first + count, sin + first);
        continue;
      }
      const acc p = pos_.value<acc>(row, static_cast<int64_t>(axis));
      for (int64_t k = begin; k < end; ++k) {
        const acc angle = (p * inv_freq_[k]) * scale_;
        put_pair(interleaved_, k, round_as(round_kind_, static_cast<acc>(std::cos(angle))),
                 sin_sign_ * round_as(round_kind_, static_cast<acc>(std::sin(angle))), cos, sin);
      }
    }
  }

 private:
  std::vector<acc> inv_freq_;
  acc scale_;
  ValueKind round_kind_;
  PositionView pos_;
  acc sin_sign_;
  bool interleaved_;
  std::vector<int64_t> first_pair_;
  AngleTable<acc> table_;
  bool tabulated_ = false;
};

// Rotates the first `layout.rotated` channels of one head row src -> dst with the row's tables from
// RowAngles::fill; in_t may be the storage type or acc (staged rows). Both pairings are branch-free
// loops the compiler vectorizes: interleaved pairs one loop over the row's adjacent pairs (see
// table_length), half-split chunk by chunk over its two contiguous halves. With sin negated this is
// the transposed rotation (the backward), to the same bits as rotate_channel_backward.
// No loop here may mix a product difference with a product sum on adjacent lanes: GCC's SLP
// vectorizer turns (a c - b s, b c + a s) on interleaved lanes into vfmaddsub, fusing the products
// despite -ffp-contract=off (seen for float64 with GCC 12), which changes the last bit.
template <typename in_t, typename out_t, typename acc>
inline void rotate_row(const Layout& l, const in_t* src, out_t* dst, const acc* cos_table, const acc* sin_table) {
  if (l.pairing == Pairing::Interleaved) {
    const in_t* __restrict__ x = src;
    out_t* __restrict__ y = dst;
    const acc* __restrict__ c = cos_table;
    const acc* __restrict__ s = sin_table;
    const int64_t pairs = l.rotated / 2;
    for (int64_t k = 0; k < pairs; ++k) {
      const acc x0 = widen(x[2 * k]), x1 = widen(x[2 * k + 1]);
      y[2 * k] = narrow<out_t>(x0 * c[2 * k] + x1 * s[2 * k]);
      y[2 * k + 1] = narrow<out_t>(x1 * c[2 * k + 1] + x0 * s[2 * k + 1]);
    }
    return;
  }
  const int64_t chunk_half = l.chunk_width / 2;
  for (int64_t c = 0; c < l.num_chunks; ++c) {
    const int64_t start = l.chunk_start(c);
    const int64_t half = l.width(c) / 2;
    // restrict: input, output and tables never overlap; without it every (head, chunk) loop of a
    // few dozen elements pays a runtime alias check before its vector body.
    const in_t* __restrict__ a = src + start;
    const in_t* __restrict__ b = a + half;
    out_t* __restrict__ out_a = dst + start;
    out_t* __restrict__ out_b = out_a + half;
    const acc* __restrict__ cs = cos_table + c * chunk_half;
    const acc* __restrict__ sn = sin_table + c * chunk_half;
    for (int64_t i = 0; i < half; ++i) {
      const acc av = widen(a[i]), bv = widen(b[i]);
      out_a[i] = narrow<out_t>(av * cs[i] - bv * sn[i]);
      out_b[i] = narrow<out_t>(bv * cs[i] + av * sn[i]);
    }
  }
}

}  // namespace vitops::rope::cpu

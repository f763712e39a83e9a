// The RoPE description every rotation of vitops uses (host and device code): which channels form
// each rotated pair, which position axis drives it, and its frequency.
//
// A head of `head_dim` channels rotates its first `rotated` channels; the rest pass through. The
// rotated channels form `num_chunks` consecutive chunks, chunk c driven by position axis c (one
// chunk for 1-D RoPE); every chunk has `chunk_width` channels but the last, which has `last_width`
// (MaxText gives the remainder of the head dim to the last axis). Pairs are numbered consecutively
// through the chunks: pair p lies in chunk c = p / (chunk_width / 2) (clamped to the last), at
// index i within it, and rotates channels
//   half-split (Gemma, rotate_half):        (start + i, start + i + width / 2)
//   interleaved (Llama 4, complex pairs):   (start + 2 i, start + 2 i + 1)
// by the angle position[axis c] * inv_freq(p), inv_freq(p) = 1 / base^(2 i / width) (HF's formula)
// unless a table gives the frequencies. The builders below are the only place that decides the
// chunk widths: MaxText's N-D rule and the 1-D rule.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::rope {

enum class Pairing : int32_t { HalfSplit = 0, Interleaved = 1 };

// `I`: int64_t on the host and in the CPU kernels, int in CUDA kernels whose sizes the launcher
// bounds (32-bit index arithmetic is several times cheaper on the GPU).
template <typename I>
struct LayoutT {
  Pairing pairing = Pairing::HalfSplit;
  I num_chunks = 0;  // 0 when nothing is rotated
  I chunk_width = 0, last_width = 0;
  I rotated = 0;

  VITOPS_HOST_DEVICE I num_pairs() const { return rotated / 2; }
  VITOPS_HOST_DEVICE I width(I chunk) const { return chunk == num_chunks - 1 ? last_width : chunk_width; }
  VITOPS_HOST_DEVICE I chunk_start(I chunk) const { return chunk * chunk_width; }
  // Position axis (chunk) of pair p.
  VITOPS_HOST_DEVICE I chunk_of_pair(I p) const {
    const I c = p / (chunk_width / 2);
    return c < num_chunks - 1 ? c : num_chunks - 1;
  }
  VITOPS_HOST_DEVICE I index_in_chunk(I p, I chunk) const { return p - chunk * (chunk_width / 2); }
  // The two channels of pair p.
  VITOPS_HOST_DEVICE I channel_a(I p) const {
    const I c = chunk_of_pair(p), i = index_in_chunk(p, c);
    return pairing == Pairing::HalfSplit ? chunk_start(c) + i : chunk_start(c) + 2 * i;
  }
  VITOPS_HOST_DEVICE I channel_b(I p) const {
    const I c = chunk_of_pair(p), i = index_in_chunk(p, c);
    return pairing == Pairing::HalfSplit ? chunk_start(c) + i + width(c) / 2 : chunk_start(c) + 2 * i + 1;
  }
  // Chunk (position axis) of a rotated channel e < rotated.
  VITOPS_HOST_DEVICE I chunk_of_channel(I e) const {
    const I c = e / chunk_width;
    return c < num_chunks - 1 ? c : num_chunks - 1;
  }

  template <typename J>
  LayoutT<J> as() const {
    LayoutT<J> l;
    l.pairing = pairing;
    l.num_chunks = static_cast<J>(num_chunks);
    l.chunk_width = static_cast<J>(chunk_width);
    l.last_width = static_cast<J>(last_width);
    l.rotated = static_cast<J>(rotated);
    return l;
  }
};
using Layout = LayoutT<int64_t>;

// Where a rotated channel finds its partner and its cos/sin entry (the pair index).
struct ChannelRole {
  int64_t partner;
  int64_t pair;
  bool first;  // true: e is the pair's a (a cos - b sin); false: its b (b cos + a sin)
};

VITOPS_HOST_DEVICE ChannelRole channel_role(const Layout& l, int64_t e) {
  const int64_t c = l.chunk_of_channel(e);
  const int64_t j = e - l.chunk_start(c);
  ChannelRole role;
  if (l.pairing == Pairing::HalfSplit) {
    const int64_t half = l.width(c) / 2;
    role.first = j < half;
    const int64_t i = role.first ? j : j - half;
    role.partner = role.first ? e + half : e - half;
    role.pair = l.chunk_start(c) / 2 + i;
  } else {
    role.first = j % 2 == 0;
    role.partner = role.first ? e + 1 : e - 1;
    role.pair = l.chunk_start(c) / 2 + j / 2;
  }
  return role;
}

// HF's inverse frequency of pair p: 1 / base^((2 i) / width), the exponent rounded to acc first and
// the power taken in acc, as `1.0 / (base ** (torch.arange(0, w, 2).float() / w))`.
template <typename acc, typename I>
VITOPS_HOST_DEVICE acc inverse_frequency(const LayoutT<I>& l, I p, acc base) {
  const I c = l.chunk_of_pair(p);
  const I i = l.index_in_chunk(p, c);
  const acc exponent = static_cast<acc>(2 * i) / static_cast<acc>(l.width(c));
  return acc(1) / math_pow(base, exponent);
}

template <typename acc>
std::vector<acc> inverse_frequencies(const Layout& l, double base) {
  std::vector<acc> inv(l.num_pairs());
  for (int64_t p = 0; p < l.num_pairs(); ++p) inv[p] = inverse_frequency<acc>(l, p, static_cast<acc>(base));
  return inv;
}

// A rotated pair (a, b) -> (a cos - b sin, b cos + a sin); each product rounded on its own (no FMA
// contraction), as the references compute it. The transposed rotation (the backward) is the same
// with sin negated, which commutes with rounding sin to a dtype.
template <typename acc>
VITOPS_HOST_DEVICE acc rotated_a(acc a, acc b, acc c, acc s) {
  return mul_rounded(a, c) - mul_rounded(b, s);
}
template <typename acc>
VITOPS_HOST_DEVICE acc rotated_b(acc a, acc b, acc c, acc s) {
  return mul_rounded(b, c) + mul_rounded(a, s);
}

// Rotated value of channel e of a row (already in acc) with the row's cos/sin per pair.
template <typename acc>
VITOPS_HOST_DEVICE acc rotate_channel(const acc* row, const acc* cos_table, const acc* sin_table,
                                      const ChannelRole& role, int64_t e) {
  const acc c = cos_table[role.pair], s = sin_table[role.pair];
  return role.first ? rotated_a(row[e], row[role.partner], c, s) : rotated_b(row[role.partner], row[e], c, s);
}

// Gradient w.r.t. channel e of the rotation input, from the output gradient g (the transposed
// rotation): a' = a c - b s, b' = b c + a s  =>  ga = ga' c + gb' s, gb = gb' c - ga' s.
template <typename acc>
VITOPS_HOST_DEVICE acc rotate_channel_backward(const acc* g, const acc* cos_table, const acc* sin_table,
                                               const ChannelRole& role, int64_t e) {
  const acc c = cos_table[role.pair], s = sin_table[role.pair];
  const acc self = g[e], partner = g[role.partner];
  return role.first ? mul_rounded(self, c) + mul_rounded(partner, s) : mul_rounded(self, c) - mul_rounded(partner, s);
}

// ---------------------------------------------------------------------------------------------
// Builders (host): the chunk rules, with the argument checks that go with them
// ---------------------------------------------------------------------------------------------
inline std::string fraction_str(std::optional<double> fraction) {
  return fraction.has_value() ? std::to_string(*fraction) : std::string("None");
}

// 1-D RoPE (MaxText / reference): the first int(fraction * hd) channels (truncated) are rotated by
// one position per row.
inline Layout one_d_layout(const char* op, int64_t head_dim, std::optional<double> fraction, Pairing pairing) {
  Layout l;
  l.pairing = pairing;
  l.rotated = fraction.has_value() ? static_cast<int64_t>(*fraction * static_cast<double>(head_dim)) : head_dim;
  VITOPS_CHECK(l.rotated % 2 == 0, "vitops.", op, ": the rotated width ", l.rotated, " (head dim ", head_dim,
               ", rotary_fraction ", fraction_str(fraction), ") must be even");
  l.num_chunks = l.rotated > 0 ? 1 : 0;  // nothing rotated: the op is a copy, as in the reference
  l.chunk_width = l.last_width = l.rotated;
  return l;
}

// N-D RoPE (MaxText's apply_multidimensional_rope): every axis but the last rotates
// 2 * (budget // (2 ndim)) channels, budget = round(hd * fraction) (Python's half-to-even round;
// nearbyint rounds the same way) or hd; without a fraction the last axis takes the remainder.
inline Layout n_d_layout(const char* op, int64_t head_dim, int64_t ndim, std::optional<double> fraction,
                         Pairing pairing) {
  const int64_t budget = fraction.has_value()
                             ? static_cast<int64_t>(std::nearbyint(static_cast<double>(head_dim) * *fraction))
                             : head_dim;
  const int64_t per_axis = 2 * (budget / 2 / ndim);  // 2 * (budget // (2 * ndim)), overflow-free
  VITOPS_CHECK(per_axis > 0, "vitops.", op, ": head dim ", head_dim, " with rotary_fraction ",
               fraction_str(fraction), " leaves no channels to rotate for ", ndim,
               " position axes (need at least 2 per axis)");
  Layout l;
  l.pairing = pairing;
  l.num_chunks = ndim;
  l.chunk_width = per_axis;
  l.last_width = fraction.has_value() ? per_axis : head_dim - per_axis * (ndim - 1);
  VITOPS_CHECK(l.last_width % 2 == 0, "vitops.", op, ": chunk width ", l.last_width, " for axis ", ndim - 1,
               " (head dim ", head_dim, ", ", ndim, " position axes) must be even");
  l.rotated = per_axis * (ndim - 1) + l.last_width;
  return l;
}

// The pairing argument of the ops ("half_split" or "interleaved").
inline Pairing parse_pairing(const char* op, const std::string& name) {
  if (name == "half_split") return Pairing::HalfSplit;
  if (name == "interleaved") return Pairing::Interleaved;
  detail::fail("vitops.", op, ": `pairing` must be \"half_split\" or \"interleaved\", got \"", name, "\"");
}

}  // namespace vitops::rope

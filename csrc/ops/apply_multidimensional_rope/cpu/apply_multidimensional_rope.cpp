// apply_multidimensional_rope on the CPU. Rows (leading dims x L) are split across threads; a row's
// cos/sin table (one entry per rotated pair) is computed once and reused for all H heads, and the
// per-head loops run over contiguous channels so the bf16/fp16 <-> float conversions vectorize.
// The backward is the transposed rotation, i.e. the same loop with sin negated (negation commutes
// with rounding sin to the input dtype, so forward and backward use the same rounded values).
#include <algorithm>
#include <climits>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../apply_multidimensional_rope.h"
#include "vitops/cpu_angle_table.h"

namespace vitops::rope {
namespace {

template <typename acc_t>
acc_t load_position(const void* positions, ScalarType dtype, int64_t i) {
  switch (dtype) {
    case ScalarType::Int: return static_cast<acc_t>(static_cast<const int32_t*>(positions)[i]);
    case ScalarType::Long: return static_cast<acc_t>(static_cast<const int64_t*>(positions)[i]);
    case ScalarType::Float: return static_cast<acc_t>(static_cast<const float*>(positions)[i]);
    case ScalarType::Double: return static_cast<acc_t>(static_cast<const double*>(positions)[i]);
    default: return std::numeric_limits<acc_t>::quiet_NaN();  // unreachable: check_and_plan admits only these
  }
}

// Rotates the first g.rotated channels of one head: per chunk, (a, b) halves -> (a cos - b sin,
// b cos + a sin) with the chunk's cos/sin entries; in_t is the storage type or float (staged).
template <typename in_t, typename out_t, typename acc>
inline void rotate_head(const in_t* src, out_t* dst, const acc* cos_table, const acc* sin_table, const Geometry& g) {
  const int64_t chunk_half = g.chunk_width / 2;
  for (int64_t c = 0; c < g.num_chunks; ++c) {
    const int64_t start = c * g.chunk_width;
    const int64_t half = (c == g.num_chunks - 1 ? g.last_width : g.chunk_width) / 2;
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

template <typename scalar_t>
void rotate_rows(const char* op, const scalar_t* in, const RowAddressing& addressing, const Tensor& positions,
                 scalar_t* out, const Geometry& g, double base_frequency, double scale_factor, bool transpose) {
  using acc = acc_t<scalar_t>;
  const std::vector<acc> inv_freq = inverse_frequencies<acc>(g, base_frequency);
  const acc scale = static_cast<acc>(scale_factor);
  const acc sin_sign = transpose ? acc(-1) : acc(1);
  const void* pos = positions.const_data_ptr();
  const ScalarType pos_dtype = positions.scalar_type();
  const int64_t H = g.heads, hd = g.head_dim, F = g.num_freqs();
  const int64_t chunk_half = g.chunk_width / 2;
  const int64_t passthrough = hd - g.rotated;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * hd));

  // Validates the positions (every angle finite, else a clear error) and finds the integer range;
  // integer positions then get cos/sin once per distinct value (bit-identical to the per-row
  // evaluation).
  const bool integer = pos_dtype == ScalarType::Int || pos_dtype == ScalarType::Long;
  const cpu::PositionRange range = cpu::scan_positions<acc>(
      op, g.rows * g.position_axes, integer,
      [&](int64_t i) {
        return pos_dtype == ScalarType::Int ? int64_t{static_cast<const int32_t*>(pos)[i]}
                                            : static_cast<const int64_t*>(pos)[i];
      },
      [&](int64_t i) { return load_position<acc>(pos, pos_dtype, i); }, inv_freq, scale);
  cpu::AngleTable<acc> table;
  const bool tabulated =
      integer && range.lo <= range.hi &&
      table.build(range.lo, range.hi, inv_freq, scale, [](acc v) { return static_cast<acc>(static_cast<scalar_t>(v)); });

  std::vector<int64_t> chunk_of_freq(F);  // position axis of every frequency, hoisted out of the rows
  for (int64_t k = 0, i = 0; k < F; ++k) locate_freq(k, chunk_half, g.num_chunks, chunk_of_freq[k], i);

  torch::stable::parallel_for(0, g.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> cos_table(F), sin_table(F);
    std::vector<acc> wide_in(std::is_same_v<scalar_t, acc> ? 0 : g.rotated), wide_out(wide_in.size());
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t k = 0; k < F; ++k) {
        const int64_t at = row * g.position_axes + chunk_of_freq[k];
        if (tabulated) {
          const int64_t v = pos_dtype == ScalarType::Int ? static_cast<const int32_t*>(pos)[at]
                                                         : static_cast<const int64_t*>(pos)[at];
          cos_table[k] = table.cos(v, k);
          sin_table[k] = sin_sign * table.sin(v, k);
          continue;
        }
        const acc p = load_position<acc>(pos, pos_dtype, at);
        const acc angle = (p * inv_freq[k]) * scale;
        // Rounded to the input dtype before use, as HF's cos.to(x.dtype) / sin.to(x.dtype).
        cos_table[k] = static_cast<acc>(static_cast<scalar_t>(std::cos(angle)));
        sin_table[k] = sin_sign * static_cast<acc>(static_cast<scalar_t>(std::sin(angle)));
      }
      const scalar_t* src_row = in + addressing.offset(row);
      scalar_t* dst_row = out + row * H * hd;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* src = src_row + h * addressing.head_stride;
        scalar_t* dst = dst_row + h * hd;
        if constexpr (std::is_same_v<scalar_t, acc>) {
          rotate_head(src, dst, cos_table.data(), sin_table.data(), g);
        } else {
          // bf16/fp16: widen the head into float, rotate float -> float, narrow back. The rotation
          // runs over chunk halves of a few dozen elements; mixing 16-bit loads with float math in
          // that short loop made GCC pick 32-lane vectors that such trip counts never enter, so
          // bf16 ran ~2.3x slower per element than fp32. Conversions over the whole head
          // vectorize fully and the float rotation is the fp32 loop. Bit-identical: the products
          // and sums are the same float operations, rounded once.
          for (int64_t i = 0; i < g.rotated; ++i) wide_in[i] = widen(src[i]);
          rotate_head(wide_in.data(), wide_out.data(), cos_table.data(), sin_table.data(), g);
          for (int64_t i = 0; i < g.rotated; ++i) dst[i] = narrow<scalar_t>(wide_out[i]);
        }
        if (passthrough > 0) std::memcpy(dst + g.rotated, src + g.rotated, passthrough * sizeof(scalar_t));
      }
    }
  });
}

Tensor run(const char* op, const char* what, const Tensor& inputs, const Tensor& positions, double base_frequency,
           std::optional<double> rotary_fraction, double scale_factor, bool transpose) {
  const Geometry g = check_and_plan(op, what, inputs, positions, base_frequency, rotary_fraction, scale_factor, /*allow_double=*/true);
  Tensor out = new_empty(inputs, sizes_of(inputs), inputs.scalar_type());
  if (out.numel() == 0) return out;
  RowAddressing addressing;
  const Tensor src = readable_view(inputs, addressing);
  const Tensor pos = as_contiguous(positions);
  VITOPS_DISPATCH_FLOATING(inputs.scalar_type(), "apply_multidimensional_rope_cpu", [&] {
    rotate_rows<scalar_t>(op, src.const_data_ptr<scalar_t>(), addressing, pos, out.mutable_data_ptr<scalar_t>(), g,
                          base_frequency, scale_factor, transpose);
  });
  return out;
}

Tensor rope_cpu(const Tensor& inputs, const Tensor& positions, double base_frequency,
                std::optional<double> rotary_fraction, double scale_factor) {
  return run("apply_multidimensional_rope", "inputs", inputs, positions, base_frequency, rotary_fraction,
             scale_factor, /*transpose=*/false);
}

Tensor rope_backward_cpu(const Tensor& grad_output, const Tensor& positions, double base_frequency,
                         std::optional<double> rotary_fraction, double scale_factor) {
  return run("_apply_multidimensional_rope_backward", "grad_output", grad_output, positions, base_frequency,
             rotary_fraction, scale_factor, /*transpose=*/true);
}

}  // namespace
}  // namespace vitops::rope

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("apply_multidimensional_rope", TORCH_BOX(&vitops::rope::rope_cpu));
  m.impl("_apply_multidimensional_rope_backward", TORCH_BOX(&vitops::rope::rope_backward_cpu));
}

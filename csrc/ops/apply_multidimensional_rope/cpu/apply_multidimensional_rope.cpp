// apply_multidimensional_rope on the CPU. Rows (leading dims x L) are split across threads; a row's
// cos/sin table (one entry per rotated pair, kernels/rope/cpu.h) is computed once and reused for all
// H heads, and the per-head loops run over contiguous channels so the bf16/fp16 <-> float
// conversions vectorize. The backward is the transposed rotation, i.e. the same loop with sin
// negated (negation commutes with rounding sin to the input dtype, so forward and backward use the
// same rounded values).
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../apply_multidimensional_rope.h"
#include "kernels/rope/cpu.h"

namespace vitops::apply_multidimensional_rope {
namespace {

template <typename scalar_t>
void rotate_rows(const char* op, const scalar_t* in, const RowAddressing& addressing, const Tensor& positions,
                 scalar_t* out, const Geometry& g, double base_frequency, double scale_factor, bool transpose) {
  using acc = acc_t<scalar_t>;
  const rope::Layout& l = g.layout;
  rope::cpu::PositionView pos;  // contiguous [rows, axes]
  pos.data = positions.const_data_ptr();
  value_kind_of(positions.scalar_type(), &pos.kind);
  pos.seq_len = std::max<int64_t>(g.rows, 1);
  pos.stride_l = g.position_axes;
  pos.stride_axis = 1;
  pos.axes = g.position_axes;
  constexpr ValueKind round_kind = value_kind_for<scalar_t>();  // cos/sin in the input dtype (HF)
  // Validates the positions (every angle finite, else a clear error); integer positions get their
  // cos/sin once per distinct value (bit-identical to the per-row evaluation).
  const rope::cpu::RowAngles<acc> angles(op, l, rope::inverse_frequencies<acc>(l, base_frequency),
                                         static_cast<acc>(scale_factor), round_kind, pos, g.rows,
                                         transpose ? acc(-1) : acc(1));
  const int64_t H = g.heads, hd = g.head_dim, F = rope::cpu::table_length(l);
  const int64_t passthrough = hd - l.rotated;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * hd));

  torch::stable::parallel_for(0, g.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> cos_table(F), sin_table(F);
    std::vector<acc> wide_in(std::is_same_v<scalar_t, acc> ? 0 : l.rotated), wide_out(wide_in.size());
    for (int64_t row = begin; row < end; ++row) {
      angles.fill(row, cos_table.data(), sin_table.data());
      const scalar_t* src_row = in + addressing.offset(row);
      scalar_t* dst_row = out + row * H * hd;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* src = src_row + h * addressing.head_stride;
        scalar_t* dst = dst_row + h * hd;
        if constexpr (std::is_same_v<scalar_t, acc>) {
          rope::cpu::rotate_row(l, src, dst, cos_table.data(), sin_table.data());
        } else {
          // bf16/fp16: widen the head into float, rotate float -> float, narrow back. The rotation
          // runs over chunk halves of a few dozen elements; mixing 16-bit loads with float math in
          // that short loop made GCC pick 32-lane vectors that such trip counts never enter, so
          // bf16 ran ~2.3x slower per element than fp32. Conversions over the whole head
          // vectorize fully and the float rotation is the fp32 loop. Bit-identical: the products
          // and sums are the same float operations, rounded once.
          for (int64_t i = 0; i < l.rotated; ++i) wide_in[i] = widen(src[i]);
          rope::cpu::rotate_row(l, wide_in.data(), wide_out.data(), cos_table.data(), sin_table.data());
          for (int64_t i = 0; i < l.rotated; ++i) dst[i] = narrow<scalar_t>(wide_out[i]);
        }
        if (passthrough > 0) std::memcpy(dst + l.rotated, src + l.rotated, passthrough * sizeof(scalar_t));
      }
    }
  });
}

Tensor run(const char* op, const char* what, const Tensor& inputs, const Tensor& positions, double base_frequency,
           std::optional<double> rotary_fraction, double scale_factor, bool transpose) {
  const Geometry g = check_and_plan(op, what, inputs, positions, base_frequency, rotary_fraction, scale_factor,
                                    /*allow_double=*/true);
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
}  // namespace vitops::apply_multidimensional_rope

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("apply_multidimensional_rope", TORCH_BOX(&vitops::apply_multidimensional_rope::rope_cpu));
  m.impl("_apply_multidimensional_rope_backward", TORCH_BOX(&vitops::apply_multidimensional_rope::rope_backward_cpu));
}

// avg_pool_scale_standardize on the CPU. A serial pass over the positions computes every patch's
// slot (and raises on bad positions, naming positions_xy); then (image, channel block) tasks sum
// x * (1/k^2) per slot in patch order (float32, float64 for float64), round the pooled value to
// x's dtype like HF, and apply the sqrt(D) scale and the optional standardize in float32.
#include <algorithm>
#include <vector>

#include "../avg_pool_scale_standardize.h"

namespace vitops::avg_pool_scale_standardize {
namespace {

using rope_math::load_as;
using rope_math::round_to;

constexpr int64_t kChannelsPerTask = 64;

// slot of every patch ([B * L], kPaddingSlot for padding); raises on bad positions.
template <typename index_t>
std::vector<int64_t> compute_slots(const char* op, const Geometry& g, const index_t* pos) {
  std::vector<int64_t> slots(static_cast<size_t>(g.batch * g.seq_len));
  const int64_t* ps = g.position_strides;
  for (int64_t b = 0; b < g.batch; ++b) {
    int64_t max_x = 0;
    for (int64_t l = 0; l < g.seq_len; ++l) {
      const int64_t px = load_index(pos, b * ps[0] + l * ps[1]), py = load_index(pos, b * ps[0] + l * ps[1] + ps[2]);
      VITOPS_CHECK(is_padding(px, py) || (px >= 0 && py >= 0), "vitops.", op, ": `positions_xy` has a negative ",
                   "coordinate outside padding (-1, -1) at [", b, ", ", l, "]: (", px, ", ", py, ")");
      max_x = std::max(max_x, width_contribution(px, py));
    }
    for (int64_t l = 0; l < g.seq_len; ++l) {
      const int64_t px = load_index(pos, b * ps[0] + l * ps[1]), py = load_index(pos, b * ps[0] + l * ps[1] + ps[2]);
      const int64_t slot = pool_slot(px, py, g.kernel, max_x, g.length);
      VITOPS_CHECK(slot != kInvalidSlot, "vitops.", op, ": `positions_xy` maps patch [", b, ", ", l, "] at (", px,
                   ", ", py, ") to a slot past length=", g.length);
      slots[b * g.seq_len + l] = slot;
    }
  }
  return slots;
}

std::vector<int64_t> slots_of(const char* op, const Geometry& g, const Tensor& positions_xy) {
  std::vector<int64_t> slots;
  VITOPS_DISPATCH_INDEX(positions_xy.scalar_type(), "avg_pool_scale_standardize_slots", [&] {
    slots = compute_slots<index_t>(op, g, positions_xy.const_data_ptr<index_t>());
  });
  return slots;
}

template <typename scalar_t>
void forward_impl(const Geometry& g, const std::vector<int64_t>& slots, const scalar_t* x, const void* bias,
                  const void* std_scale, double scale, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  const int64_t D = g.dim, L = g.seq_len;
  const int64_t blocks = (D + kChannelsPerTask - 1) / kChannelsPerTask;
  const acc inv_k2 = acc(1) / static_cast<acc>(g.kernel * g.kernel);
  const acc scale_acc = static_cast<acc>(scale);
  torch::stable::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sums(static_cast<size_t>(g.length * kChannelsPerTask));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, d0 = (task % blocks) * kChannelsPerTask;
      const int64_t width = std::min(kChannelsPerTask, D - d0);
      std::fill(sums.begin(), sums.end(), acc(0));
      for (int64_t l = 0; l < L; ++l) {  // patch order: the summation order of every slot
        const int64_t slot = slots[b * L + l];
        if (slot < 0) continue;
        const scalar_t* row = x + b * g.x_strides[0] + l * g.x_strides[1] + d0 * g.x_strides[2];
        acc* s = sums.data() + slot * kChannelsPerTask;
        for (int64_t j = 0; j < width; ++j) s[j] += static_cast<acc>(row[j * g.x_strides[2]]) * inv_k2;
      }
      for (int64_t slot = 0; slot < g.length; ++slot) {
        scalar_t* dst = out + (b * g.length + slot) * D + d0;
        const acc* s = sums.data() + slot * kChannelsPerTask;
        for (int64_t j = 0; j < width; ++j) {
          acc y = round_to<scalar_t>(s[j]) * scale_acc;
          if (g.standardize) {
            const int64_t d = d0 + j;
            y = (y - load_as<acc>(bias, g.bias_kind, d * g.bias_stride)) *
                load_as<acc>(std_scale, g.scale_kind, d * g.scale_stride);
          }
          dst[j] = static_cast<scalar_t>(y);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Geometry& g, const std::vector<int64_t>& slots, const scalar_t* grad, const void* std_scale,
                   double scale, scalar_t* grad_x) {
  using acc = acc_t<scalar_t>;
  const int64_t D = g.dim, L = g.seq_len;
  const acc inv_k2 = acc(1) / static_cast<acc>(g.kernel * g.kernel);
  const acc scale_acc = static_cast<acc>(scale);
  torch::stable::parallel_for(0, g.batch * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, slot = slots[row];
      scalar_t* dst = grad_x + row * D;
      if (slot < 0) {
        std::fill(dst, dst + D, scalar_t(0));
        continue;
      }
      const scalar_t* src = grad + b * g.x_strides[0] + slot * g.x_strides[1];
      for (int64_t d = 0; d < D; ++d) {
        acc v = static_cast<acc>(src[d * g.x_strides[2]]);
        if (g.standardize) v = v * load_as<acc>(std_scale, g.scale_kind, d * g.scale_stride);
        dst[d] = static_cast<scalar_t>((v * scale_acc) * inv_k2);
      }
    }
  });
}

std::tuple<Tensor, Tensor> avg_pool_scale_standardize_cpu(const Tensor& x, const Tensor& positions_xy,
                                                          int64_t length, double scale,
                                                          const std::optional<Tensor>& std_bias,
                                                          const std::optional<Tensor>& std_scale) {
  const char* op = "avg_pool_scale_standardize";
  const Geometry g = check_forward(op, x, positions_xy, length, std_bias, std_scale, /*allow_double=*/true);
  Tensor out = new_empty(x, {g.batch, length, g.dim}, x.scalar_type());
  Tensor mask = new_empty(x, {g.batch, length}, ScalarType::Bool);
  const std::vector<int64_t> slots = slots_of(op, g, positions_xy);
  bool* m = mask.mutable_data_ptr<bool>();
  std::fill(m, m + g.batch * length, false);
  for (int64_t i = 0; i < g.batch * g.seq_len; ++i)
    if (slots[i] >= 0) m[(i / g.seq_len) * length + slots[i]] = true;
  if (out.numel() > 0) {
    const void* bias_ptr = g.standardize ? std_bias->const_data_ptr() : nullptr;
    const void* scale_ptr = g.standardize ? std_scale->const_data_ptr() : nullptr;
    VITOPS_DISPATCH_FLOATING(x.scalar_type(), "avg_pool_scale_standardize_cpu", [&] {
      forward_impl<scalar_t>(g, slots, x.const_data_ptr<scalar_t>(), bias_ptr, scale_ptr, scale,
                             out.mutable_data_ptr<scalar_t>());
    });
  }
  return {out, mask};
}

Tensor avg_pool_scale_standardize_backward_cpu(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                               int64_t seq_len, double scale, const std::optional<Tensor>& std_scale) {
  const char* op = "_avg_pool_scale_standardize_backward";
  const Geometry g = check_backward(op, grad_output, positions_xy, length, seq_len, std_scale, /*allow_double=*/true);
  Tensor grad_x = new_empty(grad_output, {g.batch, seq_len, g.dim}, grad_output.scalar_type());
  if (grad_x.numel() > 0) {
    const std::vector<int64_t> slots = slots_of(op, g, positions_xy);
    const void* scale_ptr = g.standardize ? std_scale->const_data_ptr() : nullptr;
    VITOPS_DISPATCH_FLOATING(grad_output.scalar_type(), "avg_pool_scale_standardize_backward_cpu", [&] {
      backward_impl<scalar_t>(g, slots, grad_output.const_data_ptr<scalar_t>(), scale_ptr, scale,
                              grad_x.mutable_data_ptr<scalar_t>());
    });
  }
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_scale_standardize

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("avg_pool_scale_standardize", TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_cpu));
  m.impl("_avg_pool_scale_standardize_backward",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_backward_cpu));
}

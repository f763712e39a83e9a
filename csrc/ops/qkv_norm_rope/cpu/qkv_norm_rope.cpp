// qkv_norm_rope on the CPU: parallel over (b, l) rows. A row's cos/sin table is computed once and
// shared by all of its q and k heads; every head row is normalised, rounded to the input dtype
// (HF casts the RMSNorm output) and rotated (q, k) straight into the contiguous [B, L, N, hd] output.
// Weight gradients are reduced deterministically: fixed-size row chunks write partial sums, which
// are added in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "../qkv_norm_rope.h"
#include "vitops/cpu_angle_table.h"

namespace vitops::qkv_norm_rope {
namespace {

using rope_math::ChannelRole;
using rope_math::load_as;
using rope_math::mul_rounded;
using rope_math::ValueKind;

// Rows per weight-gradient partial; fixed so the summation order is independent of threading.
constexpr int64_t kRowsPerChunk = 32;

template <typename scalar_t>
struct HeadIO {
  const scalar_t* data[kNumHeadTensors];
  HeadStrides strides[kNumHeadTensors];
};

template <typename acc>
struct RowTables {
  std::vector<acc> inverse_frequency, cos, sin, weights[kNumWeights];
  std::vector<ChannelRole> roles;
  std::vector<int64_t> axis_of_freq;
  cpu::AngleTable<acc> angles;  // per distinct integer position value (see cpu_angle_table.h)
  bool tabulated = false;
};

template <typename acc>
RowTables<acc> make_tables(const Geometry& g, const Tensor& q_weight, const Tensor& k_weight, double base) {
  RowTables<acc> t;
  const int64_t hd = g.head_dim;
  t.inverse_frequency.resize(hd / 2);
  for (int64_t k = 0; k < hd / 2; ++k)
    t.inverse_frequency[k] = rope_math::inverse_frequency<acc>(g.chunks, k, static_cast<acc>(base));
  const Tensor* weights[kNumWeights] = {&q_weight, &k_weight};
  for (int w = 0; w < kNumWeights; ++w) {
    t.weights[w].resize(hd);
    for (int64_t e = 0; e < hd; ++e)
      t.weights[w][e] = load_as<acc>(weights[w]->const_data_ptr(), g.weight_kind[w], e * g.weight_stride[w]);
  }
  t.roles.resize(hd);
  for (int64_t e = 0; e < hd; ++e) t.roles[e] = rope_math::channel_role(g.chunks, e);
  t.axis_of_freq.resize(hd / 2);
  for (int64_t k = 0; k < hd / 2; ++k) t.axis_of_freq[k] = g.chunks.axis_of_table_entry(k);
  return t;
}

// Validates the positions (every angle finite, else a clear error) and, for integer positions,
// tabulates cos/sin (rounded to the table dtype) once per distinct value.
template <typename acc>
void scan_and_tabulate(const char* op, const Geometry& g, const void* positions, RowTables<acc>& t) {
  const int64_t ndim = g.chunks.ndim;
  auto offset = [&](int64_t i) {  // flat index over [B, L, ndim] -> element offset
    const int64_t a = i % ndim, bl = i / ndim, l = bl % g.seq_len, b = bl / g.seq_len;
    return b * g.position_strides[0] + l * g.position_strides[1] + a * g.position_strides[2];
  };
  const bool integer = g.position_kind == ValueKind::Int32 || g.position_kind == ValueKind::Int64;
  const cpu::PositionRange range = cpu::scan_positions<acc>(
      op, g.rows() * ndim, integer,
      [&](int64_t i) {
        return g.position_kind == ValueKind::Int32 ? int64_t{static_cast<const int32_t*>(positions)[offset(i)]}
                                                   : static_cast<const int64_t*>(positions)[offset(i)];
      },
      [&](int64_t i) { return load_as<acc>(positions, g.position_kind, offset(i)); }, t.inverse_frequency, acc(1));
  if (!integer || range.lo > range.hi) return;
  const ValueKind kind = g.rope_kind;
  t.tabulated = t.angles.build(range.lo, range.hi, t.inverse_frequency, acc(1),
                               [kind](acc v) { return rope_math::round_as(kind, v); });
}

// cos/sin (rounded to the table dtype) of row (b, l) into cos/sin[hd/2].
template <typename acc>
void fill_row_tables(const Geometry& g, const void* positions, int64_t b, int64_t l, const RowTables<acc>& t,
                     acc* cos, acc* sin) {
  const int64_t row_offset = b * g.position_strides[0] + l * g.position_strides[1];
  if (t.tabulated) {
    for (int64_t k = 0; k < g.head_dim / 2; ++k) {
      const int64_t at = row_offset + t.axis_of_freq[k] * g.position_strides[2];
      const int64_t v = g.position_kind == rope_math::ValueKind::Int32 ? static_cast<const int32_t*>(positions)[at]
                                                                       : static_cast<const int64_t*>(positions)[at];
      cos[k] = t.angles.cos(v, k);
      sin[k] = t.angles.sin(v, k);
    }
    return;
  }
  for (int64_t k = 0; k < g.head_dim / 2; ++k) {
    const int64_t axis = t.axis_of_freq[k];
    const acc pos = load_as<acc>(positions, g.position_kind, row_offset + axis * g.position_strides[2]);
    const acc angle = pos * t.inverse_frequency[k];
    cos[k] = rope_math::round_as(g.rope_kind, rope_math::math_cos(angle));
    sin[k] = rope_math::round_as(g.rope_kind, rope_math::math_sin(angle));
  }
}

// Sums of x*y over a head row in kLanes independent partial sums, combined in a fixed tree: the
// compiler turns the lanes into SIMD registers (a single running sum is a serial dependency chain
// the compiler may not reorder), and the order is the same on every run and thread count.
constexpr int64_t kLanes = 16;

template <typename acc>
acc dot_product(const acc* x, const acc* y, int64_t n) {
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
  return dot_product(x, x, n);
}

// Half-split rotation of a normalised head row, one chunk (position axis) at a time, so the inner
// loops are contiguous and vectorize: a' = a*cos - b*sin, b' = b*cos + a*sin.
template <typename scalar_t, typename acc>
void rotate_row(const rope_math::ChunkLayout& layout, const acc* n, const acc* cos, const acc* sin, scalar_t* out) {
  for (int64_t axis = 0, start = 0; axis < layout.ndim; start += layout.width(axis), ++axis) {
    const int64_t half = layout.width(axis) / 2;
    const acc* a = n + start;
    const acc* b = a + half;
    const acc* c = cos + start / 2;
    const acc* sn = sin + start / 2;
    scalar_t* out_a = out + start;
    scalar_t* out_b = out_a + half;
    for (int64_t i = 0; i < half; ++i) {
      out_a[i] = narrow<scalar_t>(a[i] * c[i] - b[i] * sn[i]);
      out_b[i] = narrow<scalar_t>(b[i] * c[i] + a[i] * sn[i]);
    }
  }
}

template <typename scalar_t>
void forward_impl(const char* op, const Geometry& g, const HeadIO<scalar_t>& in, scalar_t* const out[kNumHeadTensors],
                  const Tensor& q_weight, const Tensor& k_weight, const void* positions, double eps, double base) {
  using acc = acc_t<scalar_t>;
  RowTables<acc> t = make_tables<acc>(g, q_weight, k_weight, base);
  scan_and_tabulate(op, g, positions, t);
  const int64_t hd = g.head_dim, L = g.seq_len;
  const acc eps_acc = static_cast<acc>(eps);
  torch::stable::parallel_for(0, g.rows(), /*grain_size=*/4, [&](int64_t begin, int64_t end) {
    std::vector<acc> cos(hd / 2), sin(hd / 2), x(hd), n(hd), rotated(hd);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, l = row % L;
      fill_row_tables(g, positions, b, l, t, cos.data(), sin.data());
      for (int tensor = 0; tensor < kNumHeadTensors; ++tensor) {
        const HeadStrides& s = in.strides[tensor];
        const int64_t heads = g.heads[tensor];
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* src = in.data[tensor] + b * s.batch + l * s.seq + h * s.head;
          scalar_t* dst = out[tensor] + ((b * L + l) * heads + h) * hd;
          // widen/narrow (common.h) rather than c10's conversions: branch-free, so these loops vectorize.
          for (int64_t e = 0; e < hd; ++e) x[e] = widen(src[e]);
          const acc r = rope_math::inverse_rms(sum_of_squares(x.data(), hd), hd, eps_acc);
          if (tensor == 2) {  // v: normalised only, no weight, no rotation
            for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(x[e] * r);
            continue;
          }
          const acc* w = t.weights[tensor].data();
          for (int64_t e = 0; e < hd; ++e) n[e] = widen(narrow<scalar_t>((x[e] * r) * w[e]));
          if constexpr (std::is_same_v<scalar_t, acc>) {
            rotate_row<scalar_t>(g.chunks, n.data(), cos.data(), sin.data(), dst);
          } else {
            // bf16/fp16: rotate in float, then narrow the whole head row. Narrowing inside the
            // rotation's chunk-half loops (a few dozen elements) kept them from vectorizing.
            rotate_row<acc>(g.chunks, n.data(), cos.data(), sin.data(), rotated.data());
            for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(rotated[e]);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const char* op, const Geometry& g, const HeadIO<scalar_t>& in, const HeadIO<scalar_t>& grad,
                   scalar_t* const grad_in[kNumHeadTensors], const Tensor& q_weight, const Tensor& k_weight,
                   const void* positions, double eps, double base, Tensor grad_weight[kNumWeights]) {
  using acc = acc_t<scalar_t>;
  RowTables<acc> t = make_tables<acc>(g, q_weight, k_weight, base);
  scan_and_tabulate(op, g, positions, t);
  const int64_t hd = g.head_dim, L = g.seq_len;
  const acc eps_acc = static_cast<acc>(eps);
  const int64_t num_chunks = (g.rows() + kRowsPerChunk - 1) / kRowsPerChunk;
  // partial[chunk][w][e]: weight-gradient sum over the chunk's rows
  std::vector<acc> partial(static_cast<size_t>(num_chunks) * kNumWeights * hd, acc(0));
  torch::stable::parallel_for(0, num_chunks, /*grain_size=*/1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc> cos(hd / 2), sin(hd / 2), x(hd), gy(hd), u(hd), gu(hd);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc* chunk_partial = partial.data() + chunk * kNumWeights * hd;
      const int64_t row_end = std::min(g.rows(), (chunk + 1) * kRowsPerChunk);
      for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
        const int64_t b = row / L, l = row % L;
        fill_row_tables(g, positions, b, l, t, cos.data(), sin.data());
        for (int tensor = 0; tensor < kNumHeadTensors; ++tensor) {
          const HeadStrides& s = in.strides[tensor];
          const HeadStrides& gs = grad.strides[tensor];
          const int64_t heads = g.heads[tensor];
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* src = in.data[tensor] + b * s.batch + l * s.seq + h * s.head;
            const scalar_t* gsrc = grad.data[tensor] + b * gs.batch + l * gs.seq + h * gs.head;
            scalar_t* dst = grad_in[tensor] + ((b * L + l) * heads + h) * hd;
            for (int64_t e = 0; e < hd; ++e) {
              x[e] = widen(src[e]);
              gy[e] = widen(gsrc[e]);
            }
            const acc r = rope_math::inverse_rms(sum_of_squares(x.data(), hd), hd, eps_acc);
            for (int64_t e = 0; e < hd; ++e) {
              u[e] = x[e] * r;
              if (tensor == 2) {
                gu[e] = gy[e];
              } else {
                const acc gn = rope_math::rotate_channel_backward(gy.data(), cos.data(), sin.data(), t.roles[e], e);
                chunk_partial[tensor * hd + e] += gn * u[e];
                gu[e] = gn * t.weights[tensor][e];
              }
            }
            // sum(gu * u): the normalisation's projection term
            const acc mean_dot = dot_product(gu.data(), u.data(), hd) / static_cast<acc>(hd);
            for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(r * (gu[e] - u[e] * mean_dot));
          }
        }
      }
    }
  });
  for (int w = 0; w < kNumWeights; ++w) {
    void* out = grad_weight[w].mutable_data_ptr();
    for (int64_t e = 0; e < hd; ++e) {
      acc sum = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[(chunk * kNumWeights + w) * hd + e];
      rope_math::store_as<acc>(out, g.weight_kind[w], e, sum);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> qkv_norm_rope_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& q_weight, const Tensor& k_weight,
                                                     const Tensor& positions, double eps, double base_frequency,
                                                     std::optional<ScalarType> rope_dtype) {
  const char* op = "qkv_norm_rope";
  Geometry g = check_inputs(op, q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                            /*allow_double=*/true);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  Tensor outs[kNumHeadTensors];
  for (int t = 0; t < kNumHeadTensors; ++t) outs[t] = allocate_attention_output(q, g, t);
  if (g.rows() > 0 && g.head_dim > 0) {
    VITOPS_DISPATCH_FLOATING(q.scalar_type(), "qkv_norm_rope_cpu", [&] {
      HeadIO<scalar_t> io;
      scalar_t* out_ptrs[kNumHeadTensors];
      for (int t = 0; t < kNumHeadTensors; ++t) {
        io.data[t] = inputs[t]->const_data_ptr<scalar_t>();
        io.strides[t] = head_strides(*inputs[t], /*seq_major=*/true);
        out_ptrs[t] = outs[t].mutable_data_ptr<scalar_t>();
      }
      forward_impl<scalar_t>(op, g, io, out_ptrs, q_weight, k_weight, positions.const_data_ptr(), eps, base_frequency);
    });
  }
  return {outs[0], outs[1], outs[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> qkv_norm_rope_backward_cpu(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& q_weight, const Tensor& k_weight, const Tensor& positions, double eps,
    double base_frequency, std::optional<ScalarType> rope_dtype) {
  const char* op = "_qkv_norm_rope_backward";
  Geometry g = check_inputs(op, q, k, v, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                            /*allow_double=*/true);
  const Tensor* raw_grads[kNumHeadTensors] = {&grad_q, &grad_k, &grad_v};
  check_grads(op, g, raw_grads, q);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  Tensor grads[kNumHeadTensors], grad_in[kNumHeadTensors];
  for (int t = 0; t < kNumHeadTensors; ++t) {
    grads[t] = with_contiguous_head_dim(*raw_grads[t]);
    grad_in[t] = new_empty(q, sizes_of(*inputs[t]), q.scalar_type());
  }
  Tensor grad_weight[kNumWeights] = {new_empty(q, {g.head_dim}, q_weight.scalar_type()),
                                     new_empty(q, {g.head_dim}, k_weight.scalar_type())};
  if (g.head_dim > 0) {
    VITOPS_DISPATCH_FLOATING(q.scalar_type(), "qkv_norm_rope_backward_cpu", [&] {
      HeadIO<scalar_t> io;
      HeadIO<scalar_t> gio;
      scalar_t* out_ptrs[kNumHeadTensors];
      for (int t = 0; t < kNumHeadTensors; ++t) {
        io.data[t] = inputs[t]->const_data_ptr<scalar_t>();
        io.strides[t] = head_strides(*inputs[t], /*seq_major=*/true);
        gio.data[t] = grads[t].const_data_ptr<scalar_t>();
        gio.strides[t] = head_strides(grads[t], /*seq_major=*/false);
        out_ptrs[t] = grad_in[t].mutable_data_ptr<scalar_t>();
      }
      backward_impl<scalar_t>(op, g, io, gio, out_ptrs, q_weight, k_weight, positions.const_data_ptr(), eps,
                              base_frequency, grad_weight);
    });
  }
  return {grad_in[0], grad_in[1], grad_in[2], grad_weight[0], grad_weight[1]};
}

}  // namespace
}  // namespace vitops::qkv_norm_rope

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("qkv_norm_rope", TORCH_BOX(&vitops::qkv_norm_rope::qkv_norm_rope_cpu));
  m.impl("_qkv_norm_rope_backward", TORCH_BOX(&vitops::qkv_norm_rope::qkv_norm_rope_backward_cpu));
}

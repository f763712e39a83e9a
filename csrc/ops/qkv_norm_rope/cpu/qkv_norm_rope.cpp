// qkv_norm_rope on the CPU: parallel over (b, l) rows. A row's cos/sin per pair (kernels/rope/cpu.h)
// is computed once and shared by all of its q and k heads; every head row is normalised
// (kernels/norm/norm.h), rounded to the input dtype (HF casts the RMSNorm output) and rotated (q, k)
// straight into the contiguous [B, L, N, hd] output. Llama 4's orders (the norm after the rotation,
// no rotation, q scaled per row) run a staged path that rounds after every stage as HF does.
// Weight gradients are reduced deterministically: fixed-size row chunks write partial sums, which
// are added in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "../qkv_norm_rope.h"
#include "kernels/norm/cpu.h"
#include "kernels/rope/cpu.h"

namespace vitops::qkv_norm_rope {
namespace {

// Rows per weight-gradient partial; fixed so the summation order is independent of threading.
constexpr int64_t kRowsPerChunk = 32;

template <typename scalar_t>
struct HeadIO {
  const scalar_t* data[kNumHeadTensors];
  HeadStrides strides[kNumHeadTensors];
};

// n values of a given cos/sin table row (element stride `stride`) widened to acc, with the dtype
// switch outside the loop so the contiguous case vectorizes.
template <typename acc>
void load_table_row(const void* data, ValueKind kind, int64_t offset, int64_t stride, int64_t n, acc* dst) {
  auto run = [&](const auto* base) {
    const auto* src = base + offset;
    if (stride == 1) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc>(widen(src[k]));
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc>(widen(src[k * stride]));
    }
  };
  switch (kind) {
    case ValueKind::Float32: run(static_cast<const float*>(data)); break;
    case ValueKind::Float64: run(static_cast<const double*>(data)); break;
    case ValueKind::BFloat16: run(static_cast<const torch::headeronly::BFloat16*>(data)); break;
    case ValueKind::Float16: run(static_cast<const torch::headeronly::Half*>(data)); break;
    default: break;  // never: check_inputs accepts floating tables only
  }
}

// Whether a value stored as `stored` can change when rounded to `target` (else the rounding is skipped).
inline bool rounding_changes(ValueKind stored, ValueKind target) {
  if (stored == target || target == ValueKind::Float64) return false;
  if (target == ValueKind::Float32) return stored == ValueKind::Float64;
  return true;  // to bf16 / fp16 from another dtype
}

// Everything a row needs that does not depend on the row: weight factors, angles.
template <typename acc>
struct Tables {
  std::vector<acc> weights[kNumWeights];  // w, or 1 + w (norm::weight_factor); empty without weights
  std::optional<rope::cpu::RowAngles<acc>> angles;  // evaluated angles, unless cos/sin are given
  const void* given[2] = {nullptr, nullptr};  // rope_cos, rope_sin
  bool round_given[2] = {false, false};
  acc sin_sign = acc(1);

  // A row's cos/sin in rope::cpu::rotate_row's table form: read from the given tables (rounded to
  // rope_dtype like evaluated ones) or evaluated. `scratch`: hd values (interleaved pairs).
  void fill(const Geometry& g, int64_t row, acc* cos, acc* sin, acc* scratch) const {
    if (angles.has_value()) return angles->fill(row, cos, sin);
    const int64_t b = row / g.seq_len, l = row % g.seq_len;
    const int64_t pairs = g.layout.num_pairs();
    const bool interleaved = g.layout.pairing == rope::Pairing::Interleaved;
    acc* dst[2] = {interleaved ? scratch : cos, interleaved ? scratch + pairs : sin};
    for (int t = 0; t < 2; ++t) {
      load_table_row(given[t], g.angle_kind[t], b * g.angle_strides[t][0] + l * g.angle_strides[t][1],
                     g.angle_strides[t][2], pairs, dst[t]);
      if (round_given[t])
        for (int64_t k = 0; k < pairs; ++k) dst[t][k] = round_as(g.rope_kind, dst[t][k]);
    }
    if (sin_sign != acc(1))
      for (int64_t k = 0; k < pairs; ++k) dst[1][k] = sin_sign * dst[1][k];
    if (interleaved)
      for (int64_t k = 0; k < pairs; ++k) rope::cpu::put_pair(true, k, dst[0][k], dst[1][k], cos, sin);
  }
};

template <typename acc>
std::vector<acc> inverse_frequencies(const Geometry& g, double base, const std::optional<Tensor>& rope_freqs) {
  if (!g.has_freq_table) return rope::inverse_frequencies<acc>(g.layout, base);
  std::vector<acc> inv(g.layout.num_pairs());
  for (int64_t p = 0; p < g.layout.num_pairs(); ++p)
    inv[p] = load_as<acc>(rope_freqs->const_data_ptr(), g.freq_kind, p * g.freq_stride);
  return inv;
}

// Also validates the positions (every angle finite, else a clear error). sin_sign -1: the
// transposed rotation (the backward).
template <typename acc>
Tables<acc> make_tables(const char* op, const Geometry& g, const std::optional<Tensor>& q_weight,
                        const std::optional<Tensor>& k_weight, const void* positions, double base,
                        const std::optional<Tensor>& rope_freqs, const std::optional<Tensor>& rope_cos,
                        const std::optional<Tensor>& rope_sin, acc sin_sign) {
  Tables<acc> t;
  t.sin_sign = sin_sign;
  const int64_t hd = g.head_dim;
  const std::optional<Tensor>* weights[kNumWeights] = {&q_weight, &k_weight};
  for (int w = 0; w < kNumWeights; ++w) {
    if (!weights[w]->has_value()) continue;
    t.weights[w].resize(hd);
    for (int64_t e = 0; e < hd; ++e)
      t.weights[w][e] = norm::weight_factor(
          g.options.norm, load_as<acc>((*weights[w])->const_data_ptr(), g.weight_kind[w], e * g.weight_stride[w]));
  }
  if (!g.options.rotate) return t;  // pairing "none": no angles (fill is never called)
  if (g.has_angle_table) {
    t.given[0] = rope_cos->const_data_ptr();
    t.given[1] = rope_sin->const_data_ptr();
    for (int i = 0; i < 2; ++i) t.round_given[i] = rounding_changes(g.angle_kind[i], g.rope_kind);
    return t;
  }
  rope::cpu::PositionView pos;
  pos.data = positions;
  pos.kind = g.position_kind;
  pos.seq_len = std::max<int64_t>(g.seq_len, 1);
  pos.stride_b = g.position_strides[0];
  pos.stride_l = g.position_strides[1];
  pos.stride_axis = g.position_strides[2];
  pos.axes = g.layout.num_chunks;
  t.angles.emplace(op, g.layout, inverse_frequencies<acc>(g, base, rope_freqs), acc(1), g.rope_kind, pos, g.rows(),
                   sin_sign);
  return t;
}

// 1-D half-split RoPE (one chunk spanning the head dim: text decoders) of a normalised row in one
// pass: each half-pair is normalised (x r w, or x r), rounded to scalar_t as HF's norm output, and
// rotated straight into dst. The same expressions as the three-pass path (norm, rotate_row,
// narrow), so the same bits. It skips the staging copy, the normalised row and (bf16 / fp16) two
// rounding passes: W7 g3_qk_norm_rope bf16 forward 4.7 -> 3.4-4.0 ms at S 4096; float32 (once
// norm_rotate_halves vectorized) 2.4-2.8 -> 1.7-1.9 ms at S 1024, 1 thread (NOTES entry 25).
template <bool weighted, typename scalar_t, typename acc>
inline void norm_rotate_halves(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ xb, acc r,
                               const acc* __restrict__ wa, const acc* __restrict__ wb, const acc* __restrict__ c,
                               const acc* __restrict__ s, scalar_t* __restrict__ out_a, scalar_t* __restrict__ out_b,
                               int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    acc a, b;
    if constexpr (weighted) {
      a = widen(narrow<scalar_t>((widen(xa[i]) * r) * wa[i]));
      b = widen(narrow<scalar_t>((widen(xb[i]) * r) * wb[i]));
    } else {
      a = widen(narrow<scalar_t>(widen(xa[i]) * r));
      b = widen(narrow<scalar_t>(widen(xb[i]) * r));
    }
    out_a[i] = narrow<scalar_t>(a * c[i] - b * s[i]);
    out_b[i] = narrow<scalar_t>(b * c[i] + a * s[i]);
  }
}

// The pointers are restrict-qualified parameters of norm_rotate_halves (GCC ignores restrict on
// local pointers): with float in and out it otherwise cannot rule out aliasing and left the loop
// scalar.
template <bool weighted, typename scalar_t, typename acc>
inline void norm_rotate_half_split_1d(const scalar_t* x, acc r, const acc* w, const acc* cos_table,
                                      const acc* sin_table, int64_t hd, scalar_t* dst) {
  const int64_t half = hd / 2;
  norm_rotate_halves<weighted>(x, x + half, r, w, weighted ? w + half : w, cos_table, sin_table, dst, dst + half,
                               half);
}

// q_scale's factor of row (b, l), widened to acc (1 when there is no q_scale).
template <typename acc>
inline acc q_scale_of(const Geometry& g, const void* q_scale, int64_t b, int64_t l) {
  if (!g.has_q_scale) return acc(1);
  return load_as<acc>(q_scale, g.q_scale_kind, b * g.q_scale_strides[0] + l * g.q_scale_strides[1]);
}

// Normalises a staged row in place and rounds it to scalar_t (HF casts the norm output): the same
// expressions as the fast paths, so the same bits.
template <typename scalar_t, typename acc>
inline void normalise_staged(norm::Kind kind, const acc* w, acc eps, int64_t hd, acc* x) {
  const acc r = norm::inverse_rms(norm::sum_of_squares(x, hd), hd, eps);
  if (norm::has_weight(kind)) {
    for (int64_t e = 0; e < hd; ++e) x[e] = widen(narrow<scalar_t>((x[e] * r) * w[e]));
  } else {
    for (int64_t e = 0; e < hd; ++e) x[e] = widen(narrow<scalar_t>(x[e] * r));
  }
}

// The staged forward of a q/k head row for the orders the fast paths do not take (the norm after
// the rotation, no rotation, a q scale): each stage rounds to scalar_t as HF's module chain does
// (the norm's cast, apply_rotary_emb's type_as, (q * scale).to(dtype)). x: the widened input row;
// tmp: hd values.
template <typename scalar_t, typename acc>
inline void forward_staged(const Geometry& g, norm::Kind kind, const acc* w, acc eps, const acc* cos, const acc* sin,
                           acc scale, bool scaled, acc* x, acc* tmp, scalar_t* dst) {
  const int64_t hd = g.head_dim;
  const bool normalized = norm::normalizes(kind);
  if (normalized && !g.options.norm_after_rope) normalise_staged<scalar_t>(kind, w, eps, hd, x);
  if (g.options.rotate) {
    rope::cpu::rotate_row(g.layout, x, tmp, cos, sin);
    for (int64_t e = 0; e < hd; ++e) x[e] = widen(narrow<scalar_t>(tmp[e]));
  }
  if (normalized && g.options.norm_after_rope) normalise_staged<scalar_t>(kind, w, eps, hd, x);
  if (scaled)
    for (int64_t e = 0; e < hd; ++e) x[e] = x[e] * scale;
  for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(x[e]);
}

template <typename scalar_t>
void forward_impl(const char* op, const Geometry& g, const HeadIO<scalar_t>& in, scalar_t* const out[kNumHeadTensors],
                  const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight, const void* positions,
                  double eps, double base, const std::optional<Tensor>& rope_freqs,
                  const std::optional<Tensor>& rope_cos, const std::optional<Tensor>& rope_sin,
                  const std::optional<Tensor>& q_scale) {
  using acc = acc_t<scalar_t>;
  const Tables<acc> t =
      make_tables<acc>(op, g, q_weight, k_weight, positions, base, rope_freqs, rope_cos, rope_sin, acc(1));
  const void* q_scale_data = g.has_q_scale ? q_scale->const_data_ptr() : nullptr;
  // norm then rotation (the fast paths below), unless Llama 4's orders ask for the staged path
  const bool norm_then_rotate = g.options.rotate && !g.options.norm_after_rope;
  const int64_t hd = g.head_dim, L = g.seq_len;
  const acc eps_acc = static_cast<acc>(eps);
  const norm::Kind kind = g.options.norm;
  const bool v_norm = g.options.v_norm;
  // one half-split chunk over the whole head dim (1-D text RoPE), bf16 / fp16: norm and rotation in one pass
  const bool fused_1d = g.layout.pairing == rope::Pairing::HalfSplit && g.layout.num_chunks == 1 &&
                        g.layout.rotated == hd && hd >= 2;
  torch::stable::parallel_for(0, g.rows(), /*grain_size=*/4, [&](int64_t begin, int64_t end) {
    const int64_t table = rope::cpu::table_length(g.layout);
    std::vector<acc> cos(table), sin(table), x(hd), n(hd), rotated(hd), scratch(hd + 2);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, l = row % L;
      if (g.options.rotate) t.fill(g, row, cos.data(), sin.data(), scratch.data());
      const acc q_row_scale = q_scale_of<acc>(g, q_scale_data, b, l);
      for (int tensor = 0; tensor < kNumHeadTensors; ++tensor) {
        const HeadStrides& s = in.strides[tensor];
        const int64_t heads = g.heads[tensor];
        const bool scaled = tensor == 0 && g.has_q_scale;
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* src = in.data[tensor] + b * s.batch + l * s.seq + h * s.head;
          scalar_t* dst = out[tensor] + ((b * L + l) * heads + h) * hd;
          if (tensor < 2 && (!norm_then_rotate || scaled)) {
            for (int64_t e = 0; e < hd; ++e) x[e] = widen(src[e]);
            forward_staged<scalar_t>(g, kind, norm::has_weight(kind) ? t.weights[tensor].data() : nullptr, eps_acc,
                                     cos.data(), sin.data(), q_row_scale, scaled, x.data(), rotated.data(), dst);
            continue;
          }
          if (tensor == 2) {  // v: normalised (no weight) or passed through; never rotated
            if (!v_norm) {
              std::copy(src, src + hd, dst);
              continue;
            }
            // widen/narrow (common.h) rather than c10's conversions: branch-free, so these loops vectorize.
            for (int64_t e = 0; e < hd; ++e) x[e] = widen(src[e]);
            const acc r = norm::inverse_rms(norm::sum_of_squares(x.data(), hd), hd, eps_acc);
            for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(x[e] * r);
            continue;
          }
          if (kind == norm::Kind::None) {  // no normalisation: rotate the input row straight into the output
            rope::cpu::rotate_row(g.layout, src, dst, cos.data(), sin.data());
            continue;
          }
          if (fused_1d) {  // read straight from the input row (no float staging)
            const acc r = norm::inverse_rms(norm::sum_of_squares_widened<acc>(src, hd), hd, eps_acc);
            if (norm::has_weight(kind))
              norm_rotate_half_split_1d<true>(src, r, t.weights[tensor].data(), cos.data(), sin.data(), hd, dst);
            else
              norm_rotate_half_split_1d<false>(src, r, static_cast<const acc*>(nullptr), cos.data(), sin.data(), hd,
                                               dst);
            continue;
          }
          for (int64_t e = 0; e < hd; ++e) x[e] = widen(src[e]);
          if (norm::has_weight(kind)) {
            const acc r = norm::inverse_rms(norm::sum_of_squares(x.data(), hd), hd, eps_acc);
            const acc* w = t.weights[tensor].data();
            for (int64_t e = 0; e < hd; ++e) n[e] = widen(narrow<scalar_t>((x[e] * r) * w[e]));
          } else {  // Rms
            const acc r = norm::inverse_rms(norm::sum_of_squares(x.data(), hd), hd, eps_acc);
            for (int64_t e = 0; e < hd; ++e) n[e] = widen(narrow<scalar_t>(x[e] * r));
          }
          if constexpr (std::is_same_v<scalar_t, acc>) {
            rope::cpu::rotate_row(g.layout, n.data(), dst, cos.data(), sin.data());
          } else {
            // bf16/fp16: rotate in float, then narrow the whole head row. Narrowing inside the
            // rotation's chunk-half loops (a few dozen elements) kept them from vectorizing.
            rope::cpu::rotate_row(g.layout, n.data(), rotated.data(), cos.data(), sin.data());
            for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(rotated[e]);
          }
        }
      }
    }
  });
}

// The norm's backward pass over a row read from storage (x) with d loss / d norm output in grad:
// u = x * r, the weight-gradient terms into partial and grad scaled by the weight (kWeighted), and
// the dot product of the scaled grad with u, all in one loop. The products and the summation lanes
// are norm::lane_dot's (the same bits as staging x in floats, then scaling, then lane_dot).
template <bool kWeighted, typename scalar_t, typename acc>
acc norm_backward_dot(const scalar_t* __restrict__ x, acc r, acc* __restrict__ grad, const acc* __restrict__ weight,
                      acc* __restrict__ partial, acc* __restrict__ u, int64_t n) {
  acc lanes[norm::kLanes] = {};
  auto step = [&](int64_t i, int64_t lane) {
    const acc ui = widen(x[i]) * r;
    u[i] = ui;
    acc gi = grad[i];
    if constexpr (kWeighted) {
      partial[i] += gi * ui;
      gi = gi * weight[i];
      grad[i] = gi;
    }
    lanes[lane] += gi * ui;
  };
  int64_t e = 0;
  for (; e + norm::kLanes <= n; e += norm::kLanes)
    for (int64_t j = 0; j < norm::kLanes; ++j) step(e + j, j);
  for (int64_t j = 0; e < n; ++e, ++j) step(e, j);
  for (int64_t width = norm::kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

template <typename scalar_t>
void backward_impl(const char* op, const Geometry& g, const HeadIO<scalar_t>& in, const HeadIO<scalar_t>& grad,
                   scalar_t* const grad_in[kNumHeadTensors], const std::optional<Tensor>& q_weight,
                   const std::optional<Tensor>& k_weight, const void* positions, double eps, double base,
                   const std::optional<Tensor>& rope_freqs, const std::optional<Tensor>& rope_cos,
                   const std::optional<Tensor>& rope_sin, const std::optional<Tensor>& q_scale,
                   Tensor grad_weight[kNumWeights]) {
  using acc = acc_t<scalar_t>;
  // the transposed rotation is the rotation with sin negated (rope::cpu::rotate_row)
  const Tables<acc> t =
      make_tables<acc>(op, g, q_weight, k_weight, positions, base, rope_freqs, rope_cos, rope_sin, acc(-1));
  const int64_t hd = g.head_dim, L = g.seq_len;
  const acc eps_acc = static_cast<acc>(eps);
  const norm::Kind kind = g.options.norm;
  const bool weighted = norm::has_weight(kind);
  const bool v_norm = g.options.v_norm;
  const int64_t num_chunks = (g.rows() + kRowsPerChunk - 1) / kRowsPerChunk;
  // partial[chunk][w][e]: weight-gradient sum over the chunk's rows
  std::vector<acc> partial(weighted ? static_cast<size_t>(num_chunks) * kNumWeights * hd : 0, acc(0));
  const void* q_scale_data = g.has_q_scale ? q_scale->const_data_ptr() : nullptr;
  const bool norm_then_rotate = g.options.rotate && !g.options.norm_after_rope;
  const bool rotate = g.options.rotate;
  torch::stable::parallel_for(0, num_chunks, /*grain_size=*/1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t table = rope::cpu::table_length(g.layout);
    std::vector<acc> cos(table), sin(table), sin_forward(table), x(hd), gy(hd), u(hd), gu(hd), scratch(hd + 2);
    // The norm's backward for a head row whose norm input is xin (staged floats, or the row in
    // storage): grad (d loss / d norm output) in, d loss / d norm input written to out (which may be
    // grad itself), rounded to out's type; adds the row's weight-gradient terms to the chunk
    // partial. v's norm (tensor 2) has no weight. Staged and storage rows take the same expressions
    // and summation lanes, so the same bits.
    auto norm_backward = [&](const auto* xin, acc* grad_row, auto* out, int tensor, acc* chunk_partial) {
      using out_t = std::remove_cv_t<std::remove_pointer_t<decltype(out)>>;
      const acc r = norm::inverse_rms(norm::sum_of_squares_widened<acc>(xin, hd), hd, eps_acc);
      const acc dot = tensor < 2 && weighted
                          ? norm_backward_dot<true>(xin, r, grad_row, t.weights[tensor].data(),
                                                    chunk_partial + tensor * hd, u.data(), hd)
                          : norm_backward_dot<false>(xin, r, grad_row, static_cast<const acc*>(nullptr),
                                                     static_cast<acc*>(nullptr), u.data(), hd);
      const acc mean_dot = dot / static_cast<acc>(hd);
      for (int64_t e = 0; e < hd; ++e) out[e] = narrow<out_t>(r * (grad_row[e] - u[e] * mean_dot));
    };
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc* chunk_partial = weighted ? partial.data() + chunk * kNumWeights * hd : nullptr;
      const int64_t row_end = std::min(g.rows(), (chunk + 1) * kRowsPerChunk);
      for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
        const int64_t b = row / L, l = row % L;
        if (rotate) t.fill(g, row, cos.data(), sin.data(), scratch.data());
        if (rotate && g.options.norm_after_rope)  // the forward rotation, to recompute the norm's input
          for (int64_t k = 0; k < table; ++k) sin_forward[k] = -sin[k];
        const acc q_row_scale = q_scale_of<acc>(g, q_scale_data, b, l);
        for (int tensor = 0; tensor < kNumHeadTensors; ++tensor) {
          const HeadStrides& s = in.strides[tensor];
          const HeadStrides& gs = grad.strides[tensor];
          const int64_t heads = g.heads[tensor];
          const bool normalized = tensor == 2 ? v_norm : norm::normalizes(kind);
          const bool scaled = tensor == 0 && g.has_q_scale;
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* src = in.data[tensor] + b * s.batch + l * s.seq + h * s.head;
            const scalar_t* gsrc = grad.data[tensor] + b * gs.batch + l * gs.seq + h * gs.head;
            scalar_t* dst = grad_in[tensor] + ((b * L + l) * heads + h) * hd;
            if (tensor < 2 && (!norm_then_rotate || scaled)) {  // forward_staged's stages in reverse
              for (int64_t e = 0; e < hd; ++e) gy[e] = scaled ? widen(gsrc[e]) * q_row_scale : widen(gsrc[e]);
              for (int64_t e = 0; e < hd; ++e) x[e] = widen(src[e]);
              acc* result = gy.data();
              if (normalized && g.options.norm_after_rope) {
                if (rotate) {  // the norm's input: the rotated row, rounded as the forward rounded it
                  rope::cpu::rotate_row(g.layout, x.data(), gu.data(), cos.data(), sin_forward.data());
                  for (int64_t e = 0; e < hd; ++e) x[e] = widen(narrow<scalar_t>(gu[e]));
                }
                norm_backward(x.data(), gy.data(), gy.data(), tensor, chunk_partial);
                if (rotate) {
                  rope::cpu::rotate_row(g.layout, gy.data(), gu.data(), cos.data(), sin.data());
                  result = gu.data();
                }
              } else {
                if (rotate) {
                  rope::cpu::rotate_row(g.layout, gy.data(), gu.data(), cos.data(), sin.data());
                  result = gu.data();
                }
                if (normalized) norm_backward(x.data(), result, result, tensor, chunk_partial);
              }
              for (int64_t e = 0; e < hd; ++e) dst[e] = narrow<scalar_t>(result[e]);
              continue;
            }
            if (!normalized) {  // the gradient is the transposed rotation (q, k) or itself (v)
              if (tensor < 2)
                rope::cpu::rotate_row(g.layout, gsrc, dst, cos.data(), sin.data());
              else
                std::copy(gsrc, gsrc + hd, dst);
              continue;
            }
            // The common order (norm, then rotation) in four passes over the row, each reading its
            // input straight from storage: d(loss)/d(normalised row) (the transposed rotation for q
            // and k), the row's sum of squares, the norm's backward terms and their dot product,
            // and the result narrowed into dst.
            if (tensor < 2)
              rope::cpu::rotate_row(g.layout, gsrc, gu.data(), cos.data(), sin.data());
            else
              for (int64_t e = 0; e < hd; ++e) gu[e] = widen(gsrc[e]);
            norm_backward(src, gu.data(), dst, tensor, chunk_partial);
          }
        }
      }
    }
  });
  if (!weighted) return;
  for (int w = 0; w < kNumWeights; ++w) {
    void* out = grad_weight[w].mutable_data_ptr();
    for (int64_t e = 0; e < hd; ++e) {
      acc sum = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[(chunk * kNumWeights + w) * hd + e];
      store_as<acc>(out, g.weight_kind[w], e, sum);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> qkv_norm_rope_cpu(const Tensor& q, const Tensor& k, const std::optional<Tensor>& v_arg,
                                                     const std::optional<Tensor>& q_weight,
                                                     const std::optional<Tensor>& k_weight, const Tensor& positions,
                                                     double eps, double base_frequency,
                                                     std::optional<ScalarType> rope_dtype, std::string norm_name,
                                                     bool v_norm, std::string pairing,
                                                     const std::optional<Tensor>& rope_freqs,
                                                     const std::optional<Tensor>& rope_cos,
                                                     const std::optional<Tensor>& rope_sin, bool norm_after_rope,
                                                     const std::optional<Tensor>& q_scale) {
  const char* op = "qkv_norm_rope";
  Geometry g = check_inputs(op, q, k, v_arg, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                            norm_name, v_norm, pairing, rope_freqs, rope_cos, rope_sin, norm_after_rope, q_scale,
                            /*allow_double=*/true);
  const Tensor v = v_or_absent(q, v_arg);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  Tensor outs[kNumHeadTensors];
  for (int t = 0; t < kNumHeadTensors; ++t) outs[t] = allocate_attention_output(q, g, t);
  if (g.rows() > 0 && g.head_dim > 0) {
    VITOPS_DISPATCH_FLOATING(q.scalar_type(), "qkv_norm_rope_cpu", [&] {
      HeadIO<scalar_t> io;
      scalar_t* out_ptrs[kNumHeadTensors];
      for (int t = 0; t < kNumHeadTensors; ++t) {
        io.data[t] = inputs[t]->const_data_ptr<scalar_t>();
        io.strides[t] = head_strides(*inputs[t]);
        out_ptrs[t] = outs[t].mutable_data_ptr<scalar_t>();
      }
      forward_impl<scalar_t>(op, g, io, out_ptrs, q_weight, k_weight, positions.const_data_ptr(), eps, base_frequency,
                             rope_freqs, rope_cos, rope_sin, q_scale);
    });
  }
  return {outs[0], outs[1], outs[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> qkv_norm_rope_backward_cpu(
    const Tensor& grad_q, const Tensor& grad_k, const std::optional<Tensor>& grad_v, const Tensor& q, const Tensor& k,
    const std::optional<Tensor>& v_arg, const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight,
    const Tensor& positions, double eps, double base_frequency, std::optional<ScalarType> rope_dtype,
    std::string norm_name, bool v_norm, std::string pairing, const std::optional<Tensor>& rope_freqs,
    const std::optional<Tensor>& rope_cos, const std::optional<Tensor>& rope_sin, bool norm_after_rope,
    const std::optional<Tensor>& q_scale) {
  const char* op = "_qkv_norm_rope_backward";
  Geometry g = check_inputs(op, q, k, v_arg, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                            norm_name, v_norm, pairing, rope_freqs, rope_cos, rope_sin, norm_after_rope, q_scale,
                            /*allow_double=*/true);
  const Tensor v = v_or_absent(q, v_arg);
  BackwardBuffers buf =
      prepare_backward(op, g, grad_q, grad_k, grad_v, q, k, v, v_arg.has_value(), q_weight, k_weight);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  const Tensor* grads = buf.grads;
  Tensor* grad_in = buf.grad_in;
  Tensor* grad_weight = buf.grad_weight;
  if (g.head_dim > 0) {
    VITOPS_DISPATCH_FLOATING(q.scalar_type(), "qkv_norm_rope_backward_cpu", [&] {
      HeadIO<scalar_t> io;
      HeadIO<scalar_t> gio;
      scalar_t* out_ptrs[kNumHeadTensors];
      for (int t = 0; t < kNumHeadTensors; ++t) {
        io.data[t] = inputs[t]->const_data_ptr<scalar_t>();
        io.strides[t] = head_strides(*inputs[t]);
        gio.data[t] = grads[t].const_data_ptr<scalar_t>();
        gio.strides[t] = head_strides(grads[t]);
        out_ptrs[t] = grad_in[t].mutable_data_ptr<scalar_t>();
      }
      backward_impl<scalar_t>(op, g, io, gio, out_ptrs, q_weight, k_weight, positions.const_data_ptr(), eps,
                              base_frequency, rope_freqs, rope_cos, rope_sin, q_scale, grad_weight);
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

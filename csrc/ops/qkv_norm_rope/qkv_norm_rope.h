// qkv_norm_rope: argument checks and geometry shared by the CPU and CUDA kernels.
//
// The fused attention entry of every family: per head row of q and k a normalisation
// (kernels/norm/norm.h: `scale` x*w for Gemma 4, `scale_plus_one` x*(1+w) for Gemma 3, `rms` without
// a weight, `none`), optionally v's weightless RMS norm (Gemma 4), then the RoPE of q and k
// (kernels/rope/rope.h: half-split chunks or interleaved pairs, one chunk per position axis, HF's
// frequencies or a given table), written in the layout attention wants. Llama 4's text attention
// moves the norm after the rotation (norm_after_rope: its weightless L2 norm follows the RoPE), and
// its NoPE layers skip the rotation (pairing "none") and scale q per row (q_scale: the attention
// temperature), so one op covers every family's entry.
//
// Three "head tensors" flow through the op, indexed 0 = q, 1 = k, 2 = v. Inputs are [B, L, N, hd]
// views with any strides but a contiguous head dim (slices of one fused QKV projection output are
// read in place); outputs, the gradients the backward takes and the input gradients it returns are
// [B, L, N, hd] (outputs and input gradients fresh contiguous tensors).
// v is optional: a family whose v is not normalised (Llama 4, Gemma 3) gives attention v's own
// projection view and lets the op skip v entirely (a third of the op's memory traffic). The kernels
// then see v as a tensor with no heads (absent_v), and v's output and gradient are [B, L, 0, hd].
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include "kernels/norm/norm.h"
#include "kernels/rope/rope.h"
#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::qkv_norm_rope {

constexpr int kNumHeadTensors = 3;  // q, k, v
constexpr int kNumWeights = 2;      // q_weight, k_weight (v is normalised without a weight)

// Element strides of a 4-D [B, L, N, hd] view over its (batch, seq, head) dims; the head dim has stride 1.
struct HeadStrides {
  int64_t batch, seq, head;
};

// The op's options, parsed once.
struct Options {
  norm::Kind norm = norm::Kind::Scale;
  bool v_norm = true;
  rope::Pairing pairing = rope::Pairing::HalfSplit;
  bool rotate = true;            // pairing "none": q and k are not rotated (NoPE layers)
  bool norm_after_rope = false;  // q/k norm of the rotated (and rounded) row instead of the input
};

// The pairing argument: rope::parse_pairing's two pairings, or "none" (no rotation).
inline bool parse_rotation(const char* op, const std::string& name, rope::Pairing* pairing) {
  if (name == "none") return false;
  VITOPS_CHECK(name == "half_split" || name == "interleaved", "vitops.", op,
               ": `pairing` must be \"half_split\", \"interleaved\" or \"none\" (no rotation), got \"", name, "\"");
  *pairing = rope::parse_pairing(op, name);
  return true;
}

struct Geometry {
  int64_t batch, seq_len, head_dim;
  int64_t heads[kNumHeadTensors];  // H, KV, KV
  rope::Layout layout;
  Options options;
  // positions [B, L, ndim] of any dtype and strides
  ValueKind position_kind;
  int64_t position_strides[3];
  ValueKind weight_kind[kNumWeights];  // only with a weighted norm
  int64_t weight_stride[kNumWeights];
  ValueKind rope_kind;  // dtype the cos/sin tables are rounded to (rope_dtype, default q's dtype)
  // the frequency table (rope_freqs) when given: [num_pairs] of any floating dtype and stride
  bool has_freq_table = false;
  ValueKind freq_kind = ValueKind::Float32;
  int64_t freq_stride = 0;
  // precomputed cos/sin (rope_cos, rope_sin) when given: [B or 1, L, hd / 2] of any floating dtype and
  // strides, read instead of evaluating angles (a batch of 1 is read with batch stride 0)
  bool has_angle_table = false;
  ValueKind angle_kind[2] = {ValueKind::Float32, ValueKind::Float32};  // cos, sin
  int64_t angle_strides[2][3] = {};
  // q_scale when given: [B or 1, L] of any floating dtype and strides, one factor per q row applied
  // after the norm and rotation (batch stride 0 for a batch of 1)
  bool has_q_scale = false;
  ValueKind q_scale_kind = ValueKind::Float32;
  int64_t q_scale_strides[2] = {};
  int64_t rows() const { return batch * seq_len; }
  int64_t total_heads() const { return heads[0] + heads[1] + heads[2]; }
};

inline HeadStrides head_strides(const Tensor& t) { return HeadStrides{t.stride(0), t.stride(1), t.stride(2)}; }

// v as the kernels read it: the given view, or (v is None) a [B, L, 0, hd] tensor with no heads.
inline Tensor v_or_absent(const Tensor& q, const std::optional<Tensor>& v) {
  return v.has_value() ? *v : new_empty(q, {q.size(0), q.size(1), 0, q.size(3)}, q.scalar_type());
}

inline void check_last_dim_contiguous(const char* op, const char* arg, const Tensor& t) {
  VITOPS_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "vitops.", op, ": `", arg,
               "` must have a contiguous head dim (stride 1 in its last dim), got stride ", t.stride(3));
}

// Checks q, k, v, the weights, positions and the options; fills everything but strides of q/k/v.
inline Geometry check_inputs(const char* op, const Tensor& q, const Tensor& k, const std::optional<Tensor>& v,
                             const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight,
                             const Tensor& positions, double eps, double base_frequency,
                             std::optional<ScalarType> rope_dtype, const std::string& norm_name, bool v_norm,
                             const std::string& pairing_name, const std::optional<Tensor>& rope_freqs,
                             const std::optional<Tensor>& rope_cos, const std::optional<Tensor>& rope_sin,
                             bool norm_after_rope, const std::optional<Tensor>& q_scale, bool allow_double) {
  VITOPS_CHECK(q.dim() == 4, "vitops.", op, ": `q` must have shape [B, L, H, hd], got ", shape_str(q));
  VITOPS_CHECK(k.dim() == 4, "vitops.", op, ": `k` must have shape [B, L, KV, hd], got ", shape_str(k));
  if (v.has_value())
    VITOPS_CHECK(v->dim() == 4, "vitops.", op, ": `v` must have shape [B, L, KV, hd] or be None, got ",
                 shape_str(*v));
  check_float(op, "q", q, allow_double);
  if (v.has_value())
    VITOPS_CHECK(k.scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(), "vitops.", op,
                 ": `q`, `k` and `v` must have the same dtype, got ", dtype_name(q.scalar_type()), ", ",
                 dtype_name(k.scalar_type()), " and ", dtype_name(v->scalar_type()));
  else
    VITOPS_CHECK(k.scalar_type() == q.scalar_type(), "vitops.", op, ": `q` and `k` must have the same dtype, got ",
                 dtype_name(q.scalar_type()), " and ", dtype_name(k.scalar_type()));
  VITOPS_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "vitops.", op,
               ": `k` shape ", shape_str(k), " does not match `q` shape ", shape_str(q),
               " (same B, L and head dim expected)");
  if (v.has_value())
    VITOPS_CHECK(sizes_of(*v) == sizes_of(k), "vitops.", op, ": `v` shape ", shape_str(*v),
                 " must equal `k` shape ", shape_str(k));
  VITOPS_CHECK(v.has_value() || !v_norm, "vitops.", op,
               ": `v_norm` must be False when `v` is None (there is no v to normalise)");
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  if (v.has_value()) check_last_dim_contiguous(op, "v", *v);
  check_same_device(op, "q", q, "k", k);
  if (v.has_value()) check_same_device(op, "q", q, "v", *v);
  if (q_weight.has_value()) check_same_device(op, "q", q, "q_weight", *q_weight);
  if (k_weight.has_value()) check_same_device(op, "q", q, "k_weight", *k_weight);
  check_same_device(op, "q", q, "positions", positions);
  check_shape_fits(op, "the q output", sizes_of(q));  // outputs: contiguous, shaped like the inputs
  check_shape_fits(op, "the k and v outputs", sizes_of(k));

  Geometry g;
  g.batch = q.size(0);
  g.seq_len = q.size(1);
  g.head_dim = q.size(3);
  g.heads[0] = q.size(2);
  g.heads[1] = k.size(2);
  g.heads[2] = v.has_value() ? v->size(2) : 0;
  g.options.norm = norm::parse_kind(op, norm_name);
  g.options.v_norm = v_norm;
  g.options.rotate = parse_rotation(op, pairing_name, &g.options.pairing);
  g.options.norm_after_rope = norm_after_rope;

  const char* weight_names[kNumWeights] = {"q_weight", "k_weight"};
  const std::optional<Tensor>* weights[kNumWeights] = {&q_weight, &k_weight};
  const bool weighted = norm::has_weight(g.options.norm);
  for (int w = 0; w < kNumWeights; ++w) {
    VITOPS_CHECK(weights[w]->has_value() == weighted, "vitops.", op, ": `", weight_names[w], "` must be ",
                 weighted ? "given" : "None", " with norm=\"", norm_name, "\"");
    g.weight_kind[w] = ValueKind::Float32;
    g.weight_stride[w] = 0;
    if (!weighted) continue;
    const Tensor& t = **weights[w];
    VITOPS_CHECK(t.dim() == 1 && t.size(0) == g.head_dim, "vitops.", op, ": `", weight_names[w],
                 "` must have shape [hd] = [", g.head_dim, "], got ", shape_str(t));
    check_float_table(op, weight_names[w], t, allow_double);
    value_kind_of(t.scalar_type(), &g.weight_kind[w]);
    g.weight_stride[w] = t.stride(0);
  }

  VITOPS_CHECK(positions.dim() == 3 && positions.size(0) == g.batch && positions.size(1) == g.seq_len, "vitops.",
               op, ": `positions` must have shape [B, L, ndim] = [", g.batch, ", ", g.seq_len, ", ndim], got ",
               shape_str(positions));
  VITOPS_CHECK(value_kind_of(positions.scalar_type(), &g.position_kind) &&
                   (allow_double || positions.scalar_type() != ScalarType::Double),
               "vitops.", op, ": `positions` must be an int32, int64 or floating tensor, got ",
               dtype_name(positions.scalar_type()));
  for (int i = 0; i < 3; ++i) g.position_strides[i] = positions.stride(i);
  VITOPS_CHECK(std::isfinite(base_frequency) && base_frequency > 0, "vitops.", op,
               ": `base_frequency` must be a positive finite number, got ", base_frequency);
  VITOPS_CHECK(std::isfinite(eps) && eps >= 0, "vitops.", op, ": `eps` must be a finite number >= 0, got ", eps);
  const ScalarType table_dtype = rope_dtype.value_or(q.scalar_type());
  VITOPS_CHECK(is_float_dtype(table_dtype), "vitops.", op,
               ": `rope_dtype` must be None or a floating dtype (float32, float64, bfloat16, float16), got ",
               dtype_name(table_dtype));
  value_kind_of(table_dtype, &g.rope_kind);

  const int64_t ndim = positions.size(2);
  VITOPS_CHECK(ndim >= 1, "vitops.", op, ": `positions` must have at least one axis in its last dim, got ", ndim);
  if (!g.options.rotate) {
    // No rotation: no layout to check, and nothing may describe one.
    VITOPS_CHECK(!rope_freqs.has_value() && !rope_cos.has_value() && !rope_sin.has_value(), "vitops.", op,
                 ": `rope_freqs`, `rope_cos` and `rope_sin` must be None with pairing=\"none\" (no rotation)");
    g.layout = rope::Layout{};  // nothing rotated (num_chunks 0)
  } else {
    VITOPS_CHECK(2 * (g.head_dim / 2 / ndim) > 0, "vitops.", op, ": head dim ", g.head_dim,
                 " of `q` leaves no channels to rotate for ", ndim, " position axes (need at least 2 per axis)");
    VITOPS_CHECK(g.head_dim % 2 == 0, "vitops.", op, ": the head dim of `q` must be even for RoPE, got ",
                 g.head_dim);
    g.layout = rope::n_d_layout(op, g.head_dim, ndim, std::nullopt, g.options.pairing);
  }
  if (rope_freqs.has_value()) {
    const Tensor& f = *rope_freqs;
    check_same_device(op, "q", q, "rope_freqs", f);
    VITOPS_CHECK(f.dim() == 1 && f.size(0) == g.layout.num_pairs(), "vitops.", op,
                 ": `rope_freqs` must have shape [hd / 2] = [", g.layout.num_pairs(),
                 "] (one inverse frequency per rotated pair), got ", shape_str(f));
    check_float_table(op, "rope_freqs", f, allow_double);
    g.has_freq_table = true;
    value_kind_of(f.scalar_type(), &g.freq_kind);
    g.freq_stride = f.stride(0);
  }

  VITOPS_CHECK(rope_cos.has_value() == rope_sin.has_value(), "vitops.", op,
               ": `rope_cos` and `rope_sin` must be given together (or both None)");
  if (rope_cos.has_value()) {
    VITOPS_CHECK(!rope_freqs.has_value(), "vitops.", op,
                 ": give either `rope_freqs` or the precomputed `rope_cos` / `rope_sin`, not both");
    const char* names[2] = {"rope_cos", "rope_sin"};
    const Tensor* tables[2] = {&*rope_cos, &*rope_sin};
    for (int t = 0; t < 2; ++t) {
      const Tensor& c = *tables[t];
      check_same_device(op, "q", q, names[t], c);
      VITOPS_CHECK(c.dim() == 3 && (c.size(0) == g.batch || c.size(0) == 1) && c.size(1) == g.seq_len &&
                       c.size(2) == g.layout.num_pairs(),
                   "vitops.", op, ": `", names[t], "` must have shape [B or 1, L, hd / 2] = [", g.batch, " or 1, ",
                   g.seq_len, ", ", g.layout.num_pairs(), "] (one value per row and rotated pair), got ",
                   shape_str(c));
      check_float_table(op, names[t], c, allow_double);
      value_kind_of(c.scalar_type(), &g.angle_kind[t]);
      g.angle_strides[t][0] = c.size(0) == 1 ? 0 : c.stride(0);
      g.angle_strides[t][1] = c.stride(1);
      g.angle_strides[t][2] = c.stride(2);
    }
    g.has_angle_table = true;
  }

  if (q_scale.has_value()) {
    const Tensor& s = *q_scale;
    check_same_device(op, "q", q, "q_scale", s);
    VITOPS_CHECK(s.dim() == 2 && (s.size(0) == g.batch || s.size(0) == 1) && s.size(1) == g.seq_len, "vitops.", op,
                 ": `q_scale` must have shape [B or 1, L] = [", g.batch, " or 1, ", g.seq_len,
                 "] (one factor per q row), got ", shape_str(s));
    check_float_table(op, "q_scale", s, allow_double);
    value_kind_of(s.scalar_type(), &g.q_scale_kind);
    g.q_scale_strides[0] = s.size(0) == 1 ? 0 : s.stride(0);
    g.q_scale_strides[1] = s.stride(1);
    g.has_q_scale = true;
  }
  return g;
}

// Checks the gradients of the backward (in the outputs' [B, L, N, hd] layout) against the geometry.
inline void check_grads(const char* op, const Geometry& g, const Tensor* grads[kNumHeadTensors], const Tensor& like) {
  const ScalarType dtype = like.scalar_type();
  const char* names[kNumHeadTensors] = {"grad_q", "grad_k", "grad_v"};
  for (int t = 0; t < kNumHeadTensors; ++t) {
    const Tensor& gr = *grads[t];
    VITOPS_CHECK(gr.dim() == 4 && gr.size(0) == g.batch && gr.size(1) == g.seq_len && gr.size(2) == g.heads[t] &&
                     gr.size(3) == g.head_dim,
                 "vitops.", op, ": `", names[t], "` must have shape [", g.batch, ", ", g.seq_len, ", ", g.heads[t],
                 ", ", g.head_dim, "] (the output's [B, L, N, hd]), got ", shape_str(gr));
    VITOPS_CHECK(gr.scalar_type() == dtype, "vitops.", op, ": `", names[t], "` must have the dtype of `q` (",
                 dtype_name(dtype), "), got ", dtype_name(gr.scalar_type()));
    check_same_device(op, "q", like, names[t], gr);
  }
}

// A gradient view with a contiguous head dim (copies only the rare fully strided case).
inline Tensor with_contiguous_head_dim(const Tensor& t) {
  return (t.size(3) <= 1 || t.stride(3) == 1) ? t : torch::stable::contiguous(t);
}

// The op's outputs are contiguous [B, L, heads, hd]: each (b, l) row is written in one place, and
// it is the memory layout flash/SDPA kernels read natively. The Python wrapper presents them as
// [B, heads, L, hd] through transpose views (as HF's q.transpose(1, 2)), outside the op, so that
// torch.compile sees a contiguous custom-op output.
inline Tensor allocate_attention_output(const Tensor& like, const Geometry& g, int tensor) {
  return new_empty(like, {g.batch, g.seq_len, g.heads[tensor], g.head_dim}, like.scalar_type());
}

// Weight gradients: [hd] in each weight's dtype, or [0] when the norm has no weight.
inline Tensor allocate_weight_grad(const Tensor& like, const Geometry& g, const std::optional<Tensor>& weight) {
  return weight.has_value() ? new_empty(like, {g.head_dim}, weight->scalar_type())
                            : new_empty(like, {0}, like.scalar_type());
}

// What both backward kernels start from: the checked gradients as views with a contiguous head dim,
// the fresh input gradients ([B, L, N, hd] like q, k, v, in q's dtype) and the weight gradients.
struct BackwardBuffers {
  Tensor grads[kNumHeadTensors];
  Tensor grad_in[kNumHeadTensors];
  Tensor grad_weight[kNumWeights];
};

// `v` is v_or_absent's tensor; `has_v` whether the caller gave one (then grad_v must be given too).
inline BackwardBuffers prepare_backward(const char* op, const Geometry& g, const Tensor& grad_q, const Tensor& grad_k,
                                        const std::optional<Tensor>& grad_v, const Tensor& q, const Tensor& k,
                                        const Tensor& v, bool has_v, const std::optional<Tensor>& q_weight,
                                        const std::optional<Tensor>& k_weight) {
  VITOPS_CHECK(grad_v.has_value() == has_v, "vitops.", op, ": `grad_v` must be ", has_v ? "given" : "None",
               " when `v` is ", has_v ? "given" : "None");
  const Tensor grad_v_or_absent = grad_v.has_value() ? *grad_v : v;  // absent: v's empty [B, L, 0, hd]
  const Tensor* raw_grads[kNumHeadTensors] = {&grad_q, &grad_k, &grad_v_or_absent};
  check_grads(op, g, raw_grads, q);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  BackwardBuffers b;
  for (int t = 0; t < kNumHeadTensors; ++t) {
    b.grads[t] = with_contiguous_head_dim(*raw_grads[t]);
    b.grad_in[t] = new_empty(q, sizes_of(*inputs[t]), q.scalar_type());
  }
  b.grad_weight[0] = allocate_weight_grad(q, g, q_weight);
  b.grad_weight[1] = allocate_weight_grad(q, g, k_weight);
  return b;
}

}  // namespace vitops::qkv_norm_rope

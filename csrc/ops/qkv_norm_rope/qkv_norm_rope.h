// qkv_norm_rope: argument checks and geometry shared by the CPU and CUDA kernels.
//
// Three "head tensors" flow through the op, indexed 0 = q, 1 = k, 2 = v. Inputs are
// [B, L, N, hd] views with any strides but a contiguous head dim (slices of one fused QKV
// projection output are read in place); outputs and input gradients are fresh contiguous tensors.
#pragma once

#include <cmath>
#include <optional>

#include "vitops/common.h"
#include "vitops/rope_math.h"

namespace vitops::qkv_norm_rope {

using rope_math::ChunkLayout;
using rope_math::ValueKind;

constexpr int kNumHeadTensors = 3;  // q, k, v
constexpr int kNumWeights = 2;      // q_weight, k_weight (v is normalised without a weight)

// Element strides of a 4-D view over its (batch, seq, head) dims; the head dim has stride 1.
struct HeadStrides {
  int64_t batch, seq, head;
};

struct Geometry {
  int64_t batch, seq_len, head_dim;
  int64_t heads[kNumHeadTensors];  // H, KV, KV
  ChunkLayout chunks;
  // positions [B, L, ndim] of any dtype and strides
  ValueKind position_kind;
  int64_t position_strides[3];
  ValueKind weight_kind[kNumWeights];
  int64_t weight_stride[kNumWeights];
  ValueKind rope_kind;  // dtype the cos/sin tables are rounded to (rope_dtype, default q's dtype)
  int64_t rows() const { return batch * seq_len; }
  int64_t total_heads() const { return heads[0] + heads[1] + heads[2]; }
};

inline ChunkLayout make_chunk_layout(const char* op, int64_t head_dim, int64_t ndim) {
  VITOPS_CHECK(ndim >= 1, "vitops.", op, ": `positions` must have at least one axis in its last dim, got ", ndim);
  const int64_t per_axis = 2 * (head_dim / 2 / ndim);  // 2 * (hd // (2 * ndim)), overflow-free
  VITOPS_CHECK(per_axis > 0, "vitops.", op, ": head dim ", head_dim, " of `q` leaves no channels to rotate for ", ndim,
               " position axes (need at least 2 per axis)");
  VITOPS_CHECK(head_dim % 2 == 0, "vitops.", op, ": the head dim of `q` must be even for RoPE, got ", head_dim);
  return ChunkLayout{ndim, per_axis, head_dim - per_axis * (ndim - 1)};
}

inline HeadStrides head_strides(const Tensor& t, bool seq_major) {
  // seq_major: [B, L, N, hd] (inputs); otherwise [B, N, L, hd] (attention layout gradients)
  return seq_major ? HeadStrides{t.stride(0), t.stride(1), t.stride(2)}
                   : HeadStrides{t.stride(0), t.stride(2), t.stride(1)};
}

inline void check_last_dim_contiguous(const char* op, const char* arg, const Tensor& t) {
  VITOPS_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "vitops.", op, ": `", arg,
               "` must have a contiguous head dim (stride 1 in its last dim), got stride ", t.stride(3));
}

// Checks q, k, v, the weights and positions; fills everything but strides of q/k/v.
inline Geometry check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& q_weight, const Tensor& k_weight, const Tensor& positions, double eps,
                             double base_frequency, std::optional<ScalarType> rope_dtype, bool allow_double) {
  VITOPS_CHECK(q.dim() == 4, "vitops.", op, ": `q` must have shape [B, L, H, hd], got ", shape_str(q));
  VITOPS_CHECK(k.dim() == 4, "vitops.", op, ": `k` must have shape [B, L, KV, hd], got ", shape_str(k));
  VITOPS_CHECK(v.dim() == 4, "vitops.", op, ": `v` must have shape [B, L, KV, hd], got ", shape_str(v));
  check_float(op, "q", q, allow_double);
  VITOPS_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "vitops.", op,
               ": `q`, `k` and `v` must have the same dtype, got ", dtype_name(q.scalar_type()), ", ",
               dtype_name(k.scalar_type()), " and ", dtype_name(v.scalar_type()));
  VITOPS_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "vitops.", op,
               ": `k` shape ", shape_str(k), " does not match `q` shape ", shape_str(q),
               " (same B, L and head dim expected)");
  VITOPS_CHECK(sizes_of(v) == sizes_of(k), "vitops.", op, ": `v` shape ", shape_str(v), " must equal `k` shape ",
               shape_str(k));
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  check_same_device(op, "q", q, "k", k);
  check_same_device(op, "q", q, "v", v);
  check_same_device(op, "q", q, "q_weight", q_weight);
  check_same_device(op, "q", q, "k_weight", k_weight);
  check_same_device(op, "q", q, "positions", positions);
  check_shape_fits(op, "the q output", sizes_of(q));  // outputs: contiguous, shaped like the inputs
  check_shape_fits(op, "the k and v outputs", sizes_of(k));

  Geometry g;
  g.batch = q.size(0);
  g.seq_len = q.size(1);
  g.head_dim = q.size(3);
  g.heads[0] = q.size(2);
  g.heads[1] = k.size(2);
  g.heads[2] = v.size(2);

  const char* weight_names[kNumWeights] = {"q_weight", "k_weight"};
  const Tensor* weights[kNumWeights] = {&q_weight, &k_weight};
  for (int w = 0; w < kNumWeights; ++w) {
    const Tensor& t = *weights[w];
    VITOPS_CHECK(t.dim() == 1 && t.size(0) == g.head_dim, "vitops.", op, ": `", weight_names[w],
                 "` must have shape [hd] = [", g.head_dim, "], got ", shape_str(t));
    VITOPS_CHECK(is_float_dtype(t.scalar_type()) && (allow_double || t.scalar_type() != ScalarType::Double),
                 "vitops.", op, ": `", weight_names[w], "` must be a float32, bfloat16 or float16",
                 allow_double ? " or float64" : "", " tensor, got ", dtype_name(t.scalar_type()));
    rope_math::value_kind_of(t.scalar_type(), &g.weight_kind[w]);
    g.weight_stride[w] = t.stride(0);
  }

  VITOPS_CHECK(positions.dim() == 3 && positions.size(0) == g.batch && positions.size(1) == g.seq_len, "vitops.",
               op, ": `positions` must have shape [B, L, ndim] = [", g.batch, ", ", g.seq_len, ", ndim], got ",
               shape_str(positions));
  VITOPS_CHECK(rope_math::value_kind_of(positions.scalar_type(), &g.position_kind) &&
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
  rope_math::value_kind_of(table_dtype, &g.rope_kind);
  g.chunks = make_chunk_layout(op, g.head_dim, positions.size(2));
  return g;
}

// Checks the attention-layout gradients of the backward against the forward geometry.
inline void check_grads(const char* op, const Geometry& g, const Tensor* grads[kNumHeadTensors],
                        const Tensor& like) {
  const ScalarType dtype = like.scalar_type();
  const char* names[kNumHeadTensors] = {"grad_q", "grad_k", "grad_v"};
  for (int t = 0; t < kNumHeadTensors; ++t) {
    const Tensor& gr = *grads[t];
    VITOPS_CHECK(gr.dim() == 4 && gr.size(0) == g.batch && gr.size(1) == g.heads[t] && gr.size(2) == g.seq_len &&
                     gr.size(3) == g.head_dim,
                 "vitops.", op, ": `", names[t], "` must have shape [", g.batch, ", ", g.heads[t], ", ", g.seq_len,
                 ", ", g.head_dim, "], got ", shape_str(gr));
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

}  // namespace vitops::qkv_norm_rope

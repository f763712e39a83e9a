// Shared RoPE / RMS-norm math for the fused vitops ops (host and device code).
//
// One definition of the channel layout, inverse frequencies and dtype flow used by the fused ops'
// CPU and CUDA kernels, so both backends round in exactly the same places:
//   * chunk layout = reference.rope_chunks(hd, ndim, None): every position axis rotates
//     2 * (hd // (2 * ndim)) channels, the last axis takes the remainder;
//   * inverse frequencies = reference.rope_inv_freq (HF): 1 / base^((2i) / width), in the
//     accumulation type (float32, float64 for float64 inputs);
//   * cos/sin rounded to the activation dtype (HF casts them), rotation in the accumulation type.
// Values whose dtype is only known at run time (weights, positions, std buffers) are read with
// load_as(), so kernels need no template instantiation per auxiliary dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "vitops/common.h"

#if defined(__CUDACC__)
#define VITOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITOPS_HOST_DEVICE inline
#endif

namespace vitops::rope_math {

// ceil(a / b) for host and device code (cuda_utils.cuh's ceil_div is host-only).
VITOPS_HOST_DEVICE int64_t div_round_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dtype of an auxiliary tensor read element by element.
enum class ValueKind : int32_t { Float32, Float64, BFloat16, Float16, Int32, Int64 };

inline bool value_kind_of(ScalarType t, ValueKind* kind) {
  switch (t) {
    case ScalarType::Float: *kind = ValueKind::Float32; return true;
    case ScalarType::Double: *kind = ValueKind::Float64; return true;
    case ScalarType::BFloat16: *kind = ValueKind::BFloat16; return true;
    case ScalarType::Half: *kind = ValueKind::Float16; return true;
    case ScalarType::Int: *kind = ValueKind::Int32; return true;
    case ScalarType::Long: *kind = ValueKind::Int64; return true;
    default: return false;
  }
}

// Element i of a tensor of run-time dtype `kind`, converted like torch's .to(acc) would.
template <typename acc>
VITOPS_HOST_DEVICE acc load_as(const void* data, ValueKind kind, int64_t i) {
  switch (kind) {
    case ValueKind::Float32: return static_cast<acc>(static_cast<const float*>(data)[i]);
    case ValueKind::Float64: return static_cast<acc>(static_cast<const double*>(data)[i]);
    case ValueKind::BFloat16:
      return static_cast<acc>(static_cast<float>(static_cast<const torch::headeronly::BFloat16*>(data)[i]));
    case ValueKind::Float16:
      return static_cast<acc>(static_cast<float>(static_cast<const torch::headeronly::Half*>(data)[i]));
    case ValueKind::Int32: return static_cast<acc>(static_cast<const int32_t*>(data)[i]);
    case ValueKind::Int64: return static_cast<acc>(static_cast<const int64_t*>(data)[i]);
  }
  return static_cast<acc>(NAN);  // unreachable: every ValueKind is handled above
}

// Stores v (float32 or float64) into a floating tensor of run-time dtype `kind`.
template <typename acc>
VITOPS_HOST_DEVICE void store_as(void* data, ValueKind kind, int64_t i, acc v) {
  switch (kind) {
    case ValueKind::Float32: static_cast<float*>(data)[i] = static_cast<float>(v); break;
    case ValueKind::Float64: static_cast<double*>(data)[i] = static_cast<double>(v); break;
    case ValueKind::BFloat16:
      static_cast<torch::headeronly::BFloat16*>(data)[i] = torch::headeronly::BFloat16(static_cast<float>(v));
      break;
    case ValueKind::Float16:
      static_cast<torch::headeronly::Half*>(data)[i] = torch::headeronly::Half(static_cast<float>(v));
      break;
    case ValueKind::Int32:
    case ValueKind::Int64:
      break;  // never a destination: gradients are floating (value_kind_of callers check)
  }
}

// v rounded to the storage dtype and widened back (HF's intermediate casts).
template <typename scalar_t, typename acc>
VITOPS_HOST_DEVICE acc round_to(acc v) {
  return static_cast<acc>(static_cast<scalar_t>(v));
}

// v rounded to the floating dtype `kind` (known only at run time) and widened back: the cos/sin
// tables of qkv_norm_rope are rounded to the dtype HF's rotary embedding casts them to, which under
// autocast is the residual stream's (float32), not the activations'.
template <typename acc>
VITOPS_HOST_DEVICE acc round_as(ValueKind kind, acc v) {
  switch (kind) {
    case ValueKind::Float32: return static_cast<acc>(static_cast<float>(v));
    case ValueKind::BFloat16:
      return static_cast<acc>(static_cast<float>(torch::headeronly::BFloat16(static_cast<float>(v))));
    case ValueKind::Float16:
      return static_cast<acc>(static_cast<float>(torch::headeronly::Half(static_cast<float>(v))));
    default: return v;  // Float64 (and never-used integer kinds): no rounding beyond acc
  }
}

// Overloads so templates over the accumulation type call the float or double math function.
VITOPS_HOST_DEVICE float math_pow(float a, float b) { return powf(a, b); }
VITOPS_HOST_DEVICE double math_pow(double a, double b) { return pow(a, b); }
VITOPS_HOST_DEVICE float math_cos(float a) { return cosf(a); }
VITOPS_HOST_DEVICE double math_cos(double a) { return cos(a); }
VITOPS_HOST_DEVICE float math_sin(float a) { return sinf(a); }
VITOPS_HOST_DEVICE double math_sin(double a) { return sin(a); }
VITOPS_HOST_DEVICE float math_sqrt(float a) { return sqrtf(a); }
VITOPS_HOST_DEVICE double math_sqrt(double a) { return sqrt(a); }

// Products that nvcc must not fuse into an FMA with a following add: the references compute every
// product as its own torch op (rounded), so the kernels round them too.
VITOPS_HOST_DEVICE float mul_rounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
VITOPS_HOST_DEVICE double mul_rounded(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Gemma4RMSNorm's factor torch.pow(mean(x^2) + eps, -0.5). torch.pow special-cases the exponent
// -0.5 as a reciprocal square root, which on the CPU is exactly 1 / sqrt(x) (correctly rounded
// sqrt, then a division); a generic powf differs from it in the last bit for about a third of all
// inputs. Same expression on CUDA (IEEE sqrtf and division by default).
template <typename acc>
VITOPS_HOST_DEVICE acc inverse_rms(acc sum_of_squares, int64_t width, acc eps) {
  const acc mean_squared = sum_of_squares / static_cast<acc>(width) + eps;
  return acc(1) / math_sqrt(mean_squared);
}

// Channel layout of N-D RoPE over a head of `head_dim` channels and `ndim` position axes.
struct ChunkLayout {
  int64_t ndim;      // position axes
  int64_t per_axis;  // channels rotated by every axis but the last
  int64_t last;      // channels rotated by the last axis (the remainder)

  VITOPS_HOST_DEVICE int64_t width(int64_t axis) const { return axis == ndim - 1 ? last : per_axis; }
  // Axis that rotates channel e.
  VITOPS_HOST_DEVICE int64_t axis_of_channel(int64_t e) const {
    const int64_t a = e / per_axis;
    return a < ndim - 1 ? a : ndim - 1;
  }
  // The cos/sin table of one row holds head_dim / 2 entries: axis a's frequencies start at
  // a * per_axis / 2 (chunk starts are even). Axis of table entry k:
  VITOPS_HOST_DEVICE int64_t axis_of_table_entry(int64_t k) const {
    const int64_t a = k / (per_axis / 2);
    return a < ndim - 1 ? a : ndim - 1;
  }
};

// Where channel e finds its rotation partner and its cos/sin table entry.
struct ChannelRole {
  int64_t partner;      // the other channel of its (a, b) pair
  int64_t table_index;  // index into the row's cos/sin table
  bool first_half;      // true: e is `a` (a*cos - b*sin); false: e is `b` (b*cos + a*sin)
};

VITOPS_HOST_DEVICE ChannelRole channel_role(const ChunkLayout& layout, int64_t e) {
  const int64_t axis = layout.axis_of_channel(e);
  const int64_t start = axis * layout.per_axis;
  const int64_t half = layout.width(axis) / 2;
  const int64_t j = e - start;
  ChannelRole role;
  role.first_half = j < half;
  const int64_t i = role.first_half ? j : j - half;
  role.partner = role.first_half ? e + half : e - half;
  role.table_index = start / 2 + i;
  return role;
}

// Inverse frequency of table entry k (HF/reference: computed in the accumulation type).
template <typename acc>
VITOPS_HOST_DEVICE acc inverse_frequency(const ChunkLayout& layout, int64_t k, acc base) {
  const int64_t axis = layout.axis_of_table_entry(k);
  const int64_t i = k - axis * (layout.per_axis / 2);
  const int64_t width = layout.width(axis);
  const acc exponent = static_cast<acc>(2 * i) / static_cast<acc>(width);
  return acc(1) / math_pow(base, exponent);
}

// Rotated value of channel e given the row `n` (already rounded to the activation dtype) and the
// row's cos/sin tables (also rounded), in the accumulation type: reference._rope_chunk.
template <typename acc>
VITOPS_HOST_DEVICE acc rotate_channel(const acc* n, const acc* cos_table, const acc* sin_table,
                                      const ChannelRole& role, int64_t e) {
  const acc c = cos_table[role.table_index], s = sin_table[role.table_index];
  const acc self = n[e], partner = n[role.partner];
  return role.first_half ? mul_rounded(self, c) - mul_rounded(partner, s) : mul_rounded(self, c) + mul_rounded(partner, s);
}

// Gradient w.r.t. channel e of the rotation input, from the output gradient g (transposed
// rotation): a' = a c - b s, b' = b c + a s  =>  ga = ga' c + gb' s, gb = gb' c - ga' s.
template <typename acc>
VITOPS_HOST_DEVICE acc rotate_channel_backward(const acc* g, const acc* cos_table, const acc* sin_table,
                                               const ChannelRole& role, int64_t e) {
  const acc c = cos_table[role.table_index], s = sin_table[role.table_index];
  const acc self = g[e], partner = g[role.partner];
  return role.first_half ? mul_rounded(self, c) + mul_rounded(partner, s) : mul_rounded(self, c) - mul_rounded(partner, s);
}

}  // namespace vitops::rope_math

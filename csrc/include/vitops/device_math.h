// Generic helpers for code that runs on the host and on the device (CUDA kernels, and the same
// kernels built for the CPU emulator): one HOST_DEVICE macro, one ceil_div, one vector type and one
// alignment predicate for vectorised loads, and the run-time dtype values (weights, positions,
// buffers) that kernels read without a template instantiation per auxiliary dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "vitops/common.h"

#if defined(__CUDACC__)
#define VITOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITOPS_HOST_DEVICE inline
#endif

namespace vitops {

// ceil(a / b) for positive b.
VITOPS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// N consecutive elements loaded or stored as one aligned access (16 bytes for the wide paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Whether N-element vectors can be used: every pointer aligned to N elements and every extent (a
// dim or a stride, in elements) a multiple of N, so each vector access stays aligned.
inline bool vector_fits(int vec, int64_t elem_bytes, std::initializer_list<const void*> pointers,
                        std::initializer_list<int64_t> extents) {
  if (vec <= 1) return true;
  const uintptr_t bytes = static_cast<uintptr_t>(vec) * static_cast<uintptr_t>(elem_bytes);
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  for (int64_t e : extents)
    if (e % vec != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Values of a run-time dtype
// ---------------------------------------------------------------------------------------------
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

inline bool is_integer_kind(ValueKind k) { return k == ValueKind::Int32 || k == ValueKind::Int64; }

// The ValueKind of a kernel's storage type.
template <typename T>
constexpr ValueKind value_kind_for();
template <>
constexpr ValueKind value_kind_for<float>() { return ValueKind::Float32; }
template <>
constexpr ValueKind value_kind_for<double>() { return ValueKind::Float64; }
template <>
constexpr ValueKind value_kind_for<torch::headeronly::BFloat16>() { return ValueKind::BFloat16; }
template <>
constexpr ValueKind value_kind_for<torch::headeronly::Half>() { return ValueKind::Float16; }

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

// Element i of an integer tensor (int32 or int64) as int64.
VITOPS_HOST_DEVICE int64_t load_index_as_int64(const void* data, ValueKind kind, int64_t i) {
  return kind == ValueKind::Int32 ? static_cast<int64_t>(static_cast<const int32_t*>(data)[i])
                                  : static_cast<const int64_t*>(data)[i];
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

// v rounded to the floating dtype `kind` (known only at run time) and widened back.
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

}  // namespace vitops

// Shared helpers for vitops kernels. Only the LibTorch stable ABI is used (torch/csrc/stable and
// torch/headeronly), so the compiled library loads on every torch >= TORCH_TARGET_VERSION (2.10).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace vitops {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Argument errors: every message names the op, the argument and the expected form.
#define VITOPS_CHECK(cond, ...) STD_TORCH_CHECK((cond), __VA_ARGS__)

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Bool: return "bool";
    default: return "an unsupported dtype";
  }
}

inline bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 ||
         t == ScalarType::Half;
}

inline bool is_index_dtype(ScalarType t) { return t == ScalarType::Long || t == ScalarType::Int; }

inline void check_float(const char* op, const char* arg, const Tensor& t, bool allow_double) {
  VITOPS_CHECK(is_float_dtype(t.scalar_type()) && (allow_double || t.scalar_type() != ScalarType::Double),
               "vitops.", op, ": `", arg, "` must be float32, bfloat16, float16",
               allow_double ? " or float64" : " (float64 is CPU only)", ", got ", dtype_name(t.scalar_type()));
}

inline void check_index(const char* op, const char* arg, const Tensor& t) {
  VITOPS_CHECK(is_index_dtype(t.scalar_type()), "vitops.", op, ": `", arg,
               "` must be an int64 or int32 tensor, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* a, const Tensor& ta, const char* b, const Tensor& tb) {
  VITOPS_CHECK(ta.device() == tb.device(), "vitops.", op, ": `", a, "` and `", b,
               "` must be on the same device, got ", ta.is_cuda() ? "cuda" : "cpu", ":", (int)ta.get_device(),
               " and ", tb.is_cuda() ? "cuda" : "cpu", ":", (int)tb.get_device());
}

inline std::vector<int64_t> sizes_of(const Tensor& t) {
  std::vector<int64_t> s(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) s[i] = t.size(i);
  return s;
}

// A fresh contiguous tensor on `like`'s device.
inline Tensor new_empty(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType dtype) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(sizes.data(), sizes.size()), dtype,
                              std::nullopt, like.device());
}

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// Reads an index element (int32 or int64) as int64.
template <typename index_t>
inline int64_t load_index(const index_t* p, int64_t i) {
  return static_cast<int64_t>(p[i]);
}

// Float <-> storage conversions used by kernels that accumulate in float32 (or double for float64).
template <typename scalar_t> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename scalar_t> using acc_t = typename acc_type<scalar_t>::type;

}  // namespace vitops

// Dispatch over the floating dtypes a kernel supports.
#define VITOPS_DISPATCH_FLOATING(TYPE, NAME, ...)                                                     \
  THO_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), torch::headeronly::ScalarType::Float,             \
                  torch::headeronly::ScalarType::Double, torch::headeronly::ScalarType::BFloat16,     \
                  torch::headeronly::ScalarType::Half)

// Dispatch over the index dtypes (int32, int64) as `index_t`.
#define VITOPS_DISPATCH_INDEX(TYPE, NAME, ...)                                                        \
  [&] {                                                                                               \
    if ((TYPE) == torch::headeronly::ScalarType::Int) {                                               \
      using index_t = int32_t;                                                                        \
      return __VA_ARGS__();                                                                           \
    } else {                                                                                          \
      using index_t = int64_t;                                                                        \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
  }()

namespace vitops {

// Element conversions for CPU inner loops. For bfloat16 they are written as plain integer ops
// (a shift to widen; round-to-nearest-even with NaN kept quiet to narrow) so GCC vectorizes them;
// the results equal c10::BFloat16's conversions bit for bit.
template <typename scalar_t>
inline acc_t<scalar_t> widen(scalar_t v) {
  return static_cast<acc_t<scalar_t>>(v);
}
template <>
inline float widen<torch::headeronly::BFloat16>(torch::headeronly::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t>
inline scalar_t narrow(acc_t<scalar_t> v) {
  return static_cast<scalar_t>(v);
}
template <>
inline torch::headeronly::BFloat16 narrow<torch::headeronly::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;  // NaN -> canonical quiet NaN
  return torch::headeronly::BFloat16(static_cast<uint16_t>(rounded), torch::headeronly::BFloat16::from_bits());
}

}  // namespace vitops

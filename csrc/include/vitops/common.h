// Shared helpers for vitops kernels. Only the LibTorch stable ABI is used (torch/csrc/stable and
// torch/headeronly), so the compiled library loads on every torch >= TORCH_TARGET_VERSION (2.10).
#pragma once

#include <cmath>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vitops {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Argument errors: every message names the op, the argument and the expected form. They reach
// Python as RuntimeError with exactly that message (STD_TORCH_CHECK would prefix the C++ function
// name and source path, which tells a user nothing).
namespace detail {
template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace detail

#define VITOPS_CHECK(cond, ...)                                   \
  do {                                                            \
    if (!(cond)) ::vitops::detail::fail(__VA_ARGS__);             \
  } while (0)

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

// torch's Python name of a dtype, for messages ("float32", "int8", "complex64", ...).
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Short: return "int16";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::UInt16: return "uint16";
    case ScalarType::UInt32: return "uint32";
    case ScalarType::UInt64: return "uint64";
    case ScalarType::Bool: return "bool";
    case ScalarType::ComplexHalf: return "complex32";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    case ScalarType::Float8_e5m2: return "float8_e5m2";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Float8_e5m2fnuz: return "float8_e5m2fnuz";
    case ScalarType::Float8_e4m3fnuz: return "float8_e4m3fnuz";
    case ScalarType::QInt8: return "qint8";
    case ScalarType::QUInt8: return "quint8";
    case ScalarType::QInt32: return "qint32";
    default: return torch::headeronly::toString(t);  // the C++ enumerator name of rarer dtypes
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

// A float table read in its own dtype (a norm weight, a frequency or standardisation table): any float
// dtype the kernels read, float64 only where the kernels have float64 (the CPU).
inline void check_float_table(const char* op, const char* arg, const Tensor& t, bool allow_double) {
  VITOPS_CHECK(is_float_dtype(t.scalar_type()) && (allow_double || t.scalar_type() != ScalarType::Double), "vitops.",
               op, ": `", arg, "` must be a float32, bfloat16 or float16", allow_double ? " or float64" : "",
               " tensor, got ", dtype_name(t.scalar_type()));
}

inline void check_index(const char* op, const char* arg, const Tensor& t) {
  VITOPS_CHECK(is_index_dtype(t.scalar_type()), "vitops.", op, ": `", arg,
               "` must be an int64 or int32 tensor, got ", dtype_name(t.scalar_type()));
}

// "cpu", "cuda:0", "meta", ... as torch prints devices.
inline std::string device_str(const Tensor& t) {
  const auto d = t.device();
  std::string s;
  switch (d.type()) {
    case torch::headeronly::DeviceType::CPU: return "cpu";
    case torch::headeronly::DeviceType::Meta: return "meta";
    case torch::headeronly::DeviceType::CUDA: s = "cuda"; break;
    default: s = "device type " + std::to_string(static_cast<int>(d.type())); break;
  }
  if (d.index() >= 0) s += ":" + std::to_string(static_cast<int>(d.index()));
  return s;
}

inline void check_same_device(const char* op, const char* a, const Tensor& ta, const char* b, const Tensor& tb) {
  VITOPS_CHECK(ta.device() == tb.device(), "vitops.", op, ": `", a, "` and `", b,
               "` must be on the same device, got ", device_str(ta), " and ", device_str(tb));
}

// A size argument of a backward op (height, seq_len, num_positions, ...) must be >= 0.
inline void check_nonnegative(const char* op, const char* arg, int64_t value) {
  VITOPS_CHECK(value >= 0, "vitops.", op, ": `", arg, "` must be a non-negative int, got ", value);
}

// a * b for sizes, or an error naming what overflowed: a shape whose element count does not fit
// int64 cannot exist, and a wrapped product would pass later checks and index out of bounds.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t r = 0;
  VITOPS_CHECK(!__builtin_mul_overflow(a, b, &r), "vitops.", op, ": ", what, " (", a, " * ", b,
               ") does not fit in int64");
  return r;
}

// Product of sizes with overflow checking; 0 when any size is 0 (an empty shape is valid even
// when the product of its other dims would not fit int64).
inline int64_t checked_product(const char* op, const char* what, const std::vector<int64_t>& sizes) {
  for (int64_t s : sizes)
    if (s == 0) return 0;
  int64_t r = 1;
  for (int64_t s : sizes) r = checked_mul(op, what, r, s);
  return r;
}

// An output's shape must have a contiguous layout whose strides and element count fit int64.
// Inputs can be expanded (stride-0) views of any size, so an output shaped like them, or sized by
// a backward op's arguments, can fail that even when it is empty; torch would then fail inside
// its allocator ("Stride calculation overflowed") without naming the op or the argument.
inline void check_shape_fits(const char* op, const char* what, const std::vector<int64_t>& sizes) {
  bool fits = true, empty = false;
  int64_t stride = 1, numel = 1;
  for (int64_t s : sizes) empty = empty || s == 0;
  for (size_t i = sizes.size(); i-- > 0;) {
    // torch's contiguous strides: stride[i - 1] = stride[i] * max(size[i], 1)
    if (i > 0) fits = fits && !__builtin_mul_overflow(stride, sizes[i] > 1 ? sizes[i] : int64_t{1}, &stride);
    if (!empty) fits = fits && !__builtin_mul_overflow(numel, sizes[i], &numel);
  }
  if (fits) return;
  std::ostringstream shape;
  shape << "[";
  for (size_t i = 0; i < sizes.size(); ++i) shape << (i ? ", " : "") << sizes[i];
  shape << "]";
  detail::fail("vitops.", op, ": ", what, " would have shape ", shape.str(),
               ", whose size or strides do not fit in int64");
}

// Host scratch buffers sized by the problem: an allocation failure becomes an error that names the
// op and the size instead of a bare std::bad_alloc / std::length_error.
template <typename T>
std::vector<T> scratch_vector(const char* op, const char* what, int64_t count, const T& value = T()) {
  VITOPS_CHECK(count >= 0, "vitops.", op, ": internal error: negative scratch size for ", what);
  constexpr int64_t kMaxCount = INT64_MAX / static_cast<int64_t>(sizeof(T));
  VITOPS_CHECK(count <= kMaxCount, "vitops.", op, ": ", what, " would need ", count, " elements of scratch memory");
  try {
    return std::vector<T>(static_cast<size_t>(count), value);
  } catch (const std::exception&) {
    detail::fail("vitops.", op, ": could not allocate ", count * static_cast<int64_t>(sizeof(T)),
                 " bytes of scratch memory for ", what);
  }
  return {};
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

// Dispatch over the index dtypes (int32, int64) as `index_t`. Any other dtype raises: callers check
// first (check_index), so this is the backstop that keeps a new caller from reading int8 data as
// int64.
#define VITOPS_DISPATCH_INDEX(TYPE, NAME, ...)                                                        \
  [&] {                                                                                               \
    const auto vitops_index_type_ = (TYPE);                                                           \
    if (vitops_index_type_ == torch::headeronly::ScalarType::Int) {                                   \
      using index_t = int32_t;                                                                        \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    VITOPS_CHECK(vitops_index_type_ == torch::headeronly::ScalarType::Long, NAME,                     \
                 ": index tensors must be int32 or int64, got ", ::vitops::dtype_name(vitops_index_type_));    \
    using index_t = int64_t;                                                                          \
    return __VA_ARGS__();                                                                             \
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

// floor(sqrt(n)) for any n >= 0, exact: the double estimate is corrected in integer arithmetic that
// cannot overflow (r <= 3037000499 for n <= INT64_MAX, so r * r fits).
inline int64_t isqrt(int64_t n) {
  if (n < 2) return n;
  int64_t r = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  if (r > 3037000499) r = 3037000499;
  while (r * r > n) --r;
  while (r < 3037000499 && (r + 1) * (r + 1) <= n) ++r;
  return r;
}

}  // namespace vitops

// Pooling by patch position (host and device code): the slot rule, the kernel size, the argument
// checks and the epilogue shared by avg_pool_by_positions and avg_pool_scale_standardize, whose CPU
// and CUDA kernels (kernels/pool/cpu.h, kernels/pool/cuda.cuh) are one implementation.
//
// Slot rule (reference.avg_pool_by_positions / HF Gemma4VisionPooler / MaxText): k = isqrt(L /
// length); image b's grid width W_b = max x over its non-padding patches + 1; patch (x, y) lands in
// slot x/k + (W_b/k) * (y/k); padding patches have both coordinates -1. Gemma 3's square k x k
// AvgPool over a full row-major grid is the case without padding (positions of a square grid).
#pragma once
#include <cmath>
#include <tuple>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::pool {

// Slot value for a patch that contributes nothing: padding, or (CUDA only, where it is not an error)
// a negative coordinate or a slot past `length`.
constexpr int64_t kSkip = -1;
// Slot value the CPU validation pass records for an out-of-range patch before it raises.
constexpr int64_t kNegativeCoordinate = -2;
constexpr int64_t kPastLength = -3;

// Problem sizes after the checks: x[B, L, D] pooled by k x k into `length` slots per image.
struct Geometry {
  int64_t batch, seq_len, dim, length, kernel;
};

// k with k*k*length == seq_len, or 0 when there is none. Written as "length divides seq_len and
// the quotient is a perfect square" so no product can overflow.
inline int64_t kernel_size(int64_t seq_len, int64_t length) {
  if (length < 1 || seq_len < 1 || seq_len % length != 0) return 0;
  const int64_t q = seq_len / length;
  const int64_t k = isqrt(q);
  return k * k == q ? k : 0;
}

// Both pooling ops (and both backends) validate `length` against the sequence length here.
inline int64_t check_kernel_size(const char* op, int64_t seq_len, int64_t length) {
  VITOPS_CHECK(length >= 1, "vitops.", op, ": `length` must be a positive int, got ", length);
  const int64_t k = kernel_size(seq_len, length);
  VITOPS_CHECK(k >= 1, "vitops.", op, ": `length` (", length, ") must be L/k² for an integer k >= 1, where L = ",
               seq_len, " is the sequence length");
  return k;
}

inline void check_positions(const char* op, const Tensor& positions, int64_t batch, int64_t seq_len) {
  check_index(op, "positions_xy", positions);
  VITOPS_CHECK(positions.dim() == 3 && positions.size(0) == batch && positions.size(1) == seq_len &&
                   positions.size(2) == 2,
               "vitops.", op, ": `positions_xy` must have shape [B, L, 2] = [", batch, ", ", seq_len, ", 2], got ",
               shape_str(positions));
}

// Checks of both pooling ops' forward (`op` names the op in messages): x [B, L, D] floating,
// positions_xy [B, L, 2] int on x's device, length = L / k².
inline Geometry check_forward(const char* op, const Tensor& x, const Tensor& positions, int64_t length,
                              bool allow_double) {
  VITOPS_CHECK(x.dim() == 3, "vitops.", op, ": `x` must have shape [B, L, D], got ", shape_str(x));
  check_float(op, "x", x, allow_double);
  check_same_device(op, "x", x, "positions_xy", positions);
  check_positions(op, positions, x.size(0), x.size(1));
  const int64_t k = check_kernel_size(op, x.size(1), length);
  check_shape_fits(op, "the output", {x.size(0), length, x.size(2)});
  return Geometry{x.size(0), x.size(1), x.size(2), length, k};
}

// Checks of both pooling ops' backward: grad_output [B, length, D], positions_xy [B, seq_len, 2].
inline Geometry check_backward(const char* op, const Tensor& grad, const Tensor& positions, int64_t length,
                               int64_t seq_len, bool allow_double) {
  check_nonnegative(op, "seq_len", seq_len);
  VITOPS_CHECK(grad.dim() == 3 && grad.size(1) == length, "vitops.", op,
               ": `grad_output` must have shape [B, length, D] with length = ", length, ", got ", shape_str(grad));
  check_float(op, "grad_output", grad, allow_double);
  check_same_device(op, "grad_output", grad, "positions_xy", positions);
  check_positions(op, positions, grad.size(0), seq_len);
  const int64_t k = check_kernel_size(op, seq_len, length);
  check_shape_fits(op, "the gradient of x", {grad.size(0), seq_len, grad.size(2)});
  return Geometry{grad.size(0), seq_len, grad.size(2), length, k};
}

// HF's per-image grid width divided by k, (max_x + 1) / k, without overflowing at INT64_MAX.
VITOPS_HOST_DEVICE int64_t pooled_width(int64_t max_x, int64_t k) {
  return max_x / k + (max_x % k == k - 1 ? 1 : 0);
}

// Slot of patch (px, py) in an image whose pooled width is `pooled_w`: px/k + pooled_w * (py/k),
// or kSkip for padding, kNegativeCoordinate / kPastLength for patches no slot can hold. The range
// test is done in division form so huge coordinates cannot overflow into a valid-looking slot.
VITOPS_HOST_DEVICE int64_t slot_of(int64_t px, int64_t py, int64_t pooled_w, int64_t k, int64_t length) {
  if (px == -1 && py == -1) return kSkip;
  if (px < 0 || py < 0) return kNegativeCoordinate;
  const int64_t col = px / k, row = py / k;
  if (col >= length) return kPastLength;
  if (row > 0 && pooled_w > (length - 1 - col) / row) return kPastLength;
  return col + pooled_w * row;
}

// Padding is excluded from the width; a negative non-padding x is clamped to 0 as HF does (it can
// only make the width 1, which an all-padding image gets anyway).
VITOPS_HOST_DEVICE int64_t clamped_x_for_width(int64_t px, int64_t py) {
  if (px == -1 && py == -1) return 0;
  return px > 0 ? px : 0;
}

// What the pooling kernels do to a pooled value before storing it. avg_pool_by_positions stores the
// sum as is (`active` false). avg_pool_scale_standardize (the Gemma 4 exit) rounds the sum to x's
// dtype, multiplies it by `scale` (sqrt(D)) and optionally standardizes it, (y - bias) * std_scale,
// in float32 (float64 for float64 x) as HF does; its backward is grad * std_scale * scale. Applied
// after the sum, so both ops share the summation order and hence the pooled bits.
struct Epilogue {
  bool active = false;
  double scale = 1.0;
  bool standardize = false;
  const void* bias = nullptr;  // [D], any float dtype and stride
  const void* std_scale = nullptr;
  ValueKind bias_kind = ValueKind::Float32, scale_kind = ValueKind::Float32;
  int64_t bias_stride = 0, scale_stride = 0;
};

// Forward epilogue for channel d; only called when e.active.
template <typename scalar_t, typename acc>
VITOPS_HOST_DEVICE acc finish_pooled(acc sum, const Epilogue& e, int64_t d) {
  acc y = mul_rounded(round_to<scalar_t>(sum), static_cast<acc>(e.scale));
  if (e.standardize) {
    const acc bias = load_as<acc>(e.bias, e.bias_kind, d * e.bias_stride);
    const acc std_scale = load_as<acc>(e.std_scale, e.scale_kind, d * e.scale_stride);
    y = mul_rounded(y - bias, std_scale);
  }
  return y;
}

// Backward epilogue for channel d, before the 1/k² weight; only called when e.active.
template <typename acc>
VITOPS_HOST_DEVICE acc unfinish_grad(acc grad, const Epilogue& e, int64_t d) {
  if (e.standardize) grad = mul_rounded(grad, load_as<acc>(e.std_scale, e.scale_kind, d * e.scale_stride));
  return mul_rounded(grad, static_cast<acc>(e.scale));
}

// The outputs every pooling op allocates: (pooled [B, length, D] in x's dtype, mask [B, length] bool),
// and the input gradient [B, L, D] of the backward.
inline std::tuple<Tensor, Tensor> allocate_forward(const Tensor& x, const Geometry& g) {
  return {new_empty(x, {g.batch, g.length, g.dim}, x.scalar_type()),
          new_empty(x, {g.batch, g.length}, ScalarType::Bool)};
}
inline Tensor allocate_backward(const Tensor& grad_output, const Geometry& g) {
  return new_empty(grad_output, {g.batch, g.seq_len, g.dim}, grad_output.scalar_type());
}

}  // namespace vitops::pool

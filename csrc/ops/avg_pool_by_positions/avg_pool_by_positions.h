// avg_pool_by_positions: argument checks and slot arithmetic shared by the CPU and CUDA kernels.
#pragma once
#include "vitops/common.h"

#ifdef __CUDACC__
#define VITOPS_POOL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITOPS_POOL_HOST_DEVICE inline
#endif

namespace vitops::avg_pool_by_positions {

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

// k with k*k*length == seq_len, or 0 when there is none.
inline int64_t kernel_size(int64_t seq_len, int64_t length) {
  if (length < 1) return 0;
  const int64_t q = seq_len / length;
  int64_t k = 0;
  while ((k + 1) * (k + 1) <= q) ++k;  // q <= seq_len, so this is at most ~sqrt(seq_len) steps
  return k >= 1 && k * k * length == seq_len ? k : 0;
}

inline int64_t check_kernel_size(const char* op, int64_t seq_len, int64_t length) {
  VITOPS_CHECK(length >= 1, "vitops.", op, ": `length` must be a positive int, got ", length);
  const int64_t k = kernel_size(seq_len, length);
  VITOPS_CHECK(k >= 1, "vitops.", op, ": `length` (", length, ") must be L/k² for an integer k >= 1, where L = ",
               seq_len, " is the sequence length of `x`");
  return k;
}

inline void check_positions(const char* op, const Tensor& positions, int64_t batch, int64_t seq_len) {
  check_index(op, "positions_xy", positions);
  VITOPS_CHECK(positions.dim() == 3 && positions.size(0) == batch && positions.size(1) == seq_len &&
                   positions.size(2) == 2,
               "vitops.", op, ": `positions_xy` must have shape [B, L, 2] = [", batch, ", ", seq_len, ", 2], got ",
               shape_str(positions));
}

inline Geometry check_forward(const Tensor& x, const Tensor& positions, int64_t length, bool allow_double) {
  const char* op = "avg_pool_by_positions";
  VITOPS_CHECK(x.dim() == 3, "vitops.", op, ": `x` must have shape [B, L, D], got ", shape_str(x));
  check_float(op, "x", x, allow_double);
  check_same_device(op, "x", x, "positions_xy", positions);
  check_positions(op, positions, x.size(0), x.size(1));
  const int64_t k = check_kernel_size(op, x.size(1), length);
  return Geometry{x.size(0), x.size(1), x.size(2), length, k};
}

inline Geometry check_backward(const Tensor& grad, const Tensor& positions, int64_t length, int64_t seq_len,
                               bool allow_double) {
  const char* op = "_avg_pool_by_positions_backward";
  VITOPS_CHECK(grad.dim() == 3 && grad.size(1) == length, "vitops.", op,
               ": `grad_output` must have shape [B, length, D] with length = ", length, ", got ", shape_str(grad));
  check_float(op, "grad_output", grad, allow_double);
  check_same_device(op, "grad_output", grad, "positions_xy", positions);
  check_positions(op, positions, grad.size(0), seq_len);
  const int64_t k = check_kernel_size(op, seq_len, length);
  return Geometry{grad.size(0), seq_len, grad.size(2), length, k};
}

// HF's per-image grid width divided by k, (max_x + 1) / k, without overflowing at INT64_MAX.
VITOPS_POOL_HOST_DEVICE int64_t pooled_width(int64_t max_x, int64_t k) {
  return max_x / k + (max_x % k == k - 1 ? 1 : 0);
}

// Slot of patch (px, py) in an image whose pooled width is `pooled_w`: px/k + pooled_w * (py/k),
// or kSkip for padding, kNegativeCoordinate / kPastLength for patches no slot can hold. The range
// test is done in division form so huge coordinates cannot overflow into a valid-looking slot.
VITOPS_POOL_HOST_DEVICE int64_t slot_of(int64_t px, int64_t py, int64_t pooled_w, int64_t k, int64_t length) {
  if (px == -1 && py == -1) return kSkip;
  if (px < 0 || py < 0) return kNegativeCoordinate;
  const int64_t col = px / k, row = py / k;
  if (col >= length) return kPastLength;
  if (row > 0 && pooled_w > (length - 1 - col) / row) return kPastLength;
  return col + pooled_w * row;
}

// Padding is excluded from the width; a negative non-padding x is clamped to 0 as HF does (it can
// only make the width 1, which an all-padding image gets anyway).
VITOPS_POOL_HOST_DEVICE int64_t clamped_x_for_width(int64_t px, int64_t py) {
  if (px == -1 && py == -1) return 0;
  return px > 0 ? px : 0;
}

}  // namespace vitops::avg_pool_by_positions

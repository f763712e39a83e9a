// factorized_posemb on CUDA.
//
// Forward: one thread per (patch, VEC-wide chunk of D); consecutive threads cover consecutive
// chunks of one output row, so table reads and output writes are coalesced, and 16-byte vectors
// are used whenever D, the table strides and the pointers allow it.
// Out-of-range coordinates: checking them on the host would need a device->host sync, so the
// kernel never reads the table for them and instead writes NaN over that patch's whole output
// row, the same poisoning MaxText's one-hot formulation applies. -1 is padding and contributes 0.
//
// Backward (bitwise deterministic, no float atomics):
//   1. every (patch, axis) pair gets key = axis * N_pos + coordinate (padding and invalid
//      coordinates get the sentinel 2 * N_pos) and value = patch index, in increasing patch order;
//   2. cub::DeviceRadixSort::SortPairs, a stable sort, groups the pairs by key while keeping the
//      patches of each key in increasing order;
//   3. one block per table row (key) binary-searches its run of patches and sums their gradient
//      rows in that order in float32, each thread owning its own columns. Rows without patches
//      write zeros. Nothing depends on scheduling, so repeated runs give identical bits.
#if !defined(VITOPS_CUDA_EMULATION)
#include <cub/device/device_radix_sort.cuh>  // the emulator provides its own SortPairs
#endif

#include <climits>

#include "../factorized_posemb.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::factorized_posemb {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <typename scalar_t, typename index_t, int VEC>
__global__ void forward_kernel(const scalar_t* __restrict__ table, int64_t axis_stride, int64_t row_stride,
                               int64_t num_positions, int64_t dim, const index_t* __restrict__ pos,
                               scalar_t* __restrict__ out, int64_t num_patches) {
  const int64_t chunks_per_row = dim / VEC;
  const int64_t total = num_patches * chunks_per_row;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += stride) {
    const int64_t p = u / chunks_per_row;
    const int64_t d0 = (u - p * chunks_per_row) * VEC;
    const int64_t x = static_cast<int64_t>(pos[2 * p]);
    const int64_t y = static_cast<int64_t>(pos[2 * p + 1]);
    const bool x_in = x >= 0 && x < num_positions;
    const bool y_in = y >= 0 && y < num_positions;
    const bool poisoned = (!x_in && x != -1) || (!y_in && y != -1);
    // x and y contributions kept apart and added once, as the reference does (x + y, each 0 if absent).
    float xs[VEC], ys[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) xs[i] = ys[i] = 0.f;
    if (x_in && !poisoned) {
      const Vec<scalar_t, VEC> r = *reinterpret_cast<const Vec<scalar_t, VEC>*>(table + x * row_stride + d0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) xs[i] = to_float(r.v[i]);
    }
    if (y_in && !poisoned) {
      const Vec<scalar_t, VEC> r =
          *reinterpret_cast<const Vec<scalar_t, VEC>*>(table + axis_stride + y * row_stride + d0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) ys[i] = to_float(r.v[i]);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(poisoned ? quiet_nan() : xs[i] + ys[i]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + p * dim + d0) = o;
  }
}

template <typename scalar_t, typename index_t>
void launch_forward(const scalar_t* table, const TableView& t, const index_t* pos, scalar_t* out, int64_t num_patches,
                    cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  // Every row start must be 16-byte aligned for the vector path: base pointers, both strides and D.
  const bool vec_ok = vector_fits(kVec, sizeof(scalar_t), {table, out}, {t.dim, t.axis_stride, t.row_stride});
  const int64_t units = num_patches * (vec_ok ? t.dim / kVec : t.dim);
  const int64_t blocks = std::min<int64_t>(ceil_div(units, kThreads), 65535LL * 8);
  if (vec_ok) {
    VITOPS_LAUNCH((unsigned)blocks, kThreads, 0, stream, forward_kernel<scalar_t, index_t, kVec>)(
        table, t.axis_stride, t.row_stride, t.num_positions, t.dim, pos, out, num_patches);
  } else {
    VITOPS_LAUNCH((unsigned)blocks, kThreads, 0, stream, forward_kernel<scalar_t, index_t, 1>)(
        table, t.axis_stride, t.row_stride, t.num_positions, t.dim, pos, out, num_patches);
  }
  VITOPS_CUDA_CHECK_LAUNCH();
}

Tensor factorized_posemb_cuda(const Tensor& posemb_in, const Tensor& positions_xy, int64_t table_dim) {
  Tensor posemb = posemb_in;
  int64_t num_patches = 0;
  const TableView t = check_forward(posemb, positions_xy, table_dim, /*allow_double=*/false, &num_patches);
  CudaDeviceGuard guard(posemb.get_device());
  Tensor out = new_empty(posemb, patch_sizes_with(positions_xy, t.dim), posemb.scalar_type());
  if (num_patches == 0 || t.dim == 0) return out;
  // positions_xy is tiny next to the output; a contiguous copy (only when strided) keeps indexing simple.
  const Tensor pos = as_contiguous(positions_xy);
  cudaStream_t stream = current_cuda_stream(posemb.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(posemb.scalar_type(), "factorized_posemb_cuda", [&] {
    with_index_type(pos.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      launch_forward<scalar_t, index_t>(posemb.const_data_ptr<scalar_t>(), t, pos.const_data_ptr<index_t>(),
                                        out.mutable_data_ptr<scalar_t>(), num_patches, stream);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Entry e = 2 * patch + axis. Keys are table rows (axis * N_pos + coordinate); the sentinel
// 2 * N_pos (padding or out of range) sorts after every real row and is never read back.
template <typename index_t>
__global__ void make_keys_kernel(const index_t* __restrict__ pos, int64_t num_entries, int64_t num_positions,
                                 uint32_t* __restrict__ keys, int64_t* __restrict__ patch_of) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < num_entries; e += stride) {
    const int64_t c = static_cast<int64_t>(pos[e]);
    const int64_t axis = e & 1;
    const bool valid = c >= 0 && c < num_positions;
    keys[e] = static_cast<uint32_t>(valid ? axis * num_positions + c : 2 * num_positions);
    patch_of[e] = e >> 1;
  }
}

// First index i in sorted[0, n) with sorted[i] >= key.
__device__ __forceinline__ int64_t lower_bound(const uint32_t* sorted, int64_t n, uint32_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One block per table row (blockIdx.x = key = axis * N_pos + n); thread i owns chunks i, i + blockDim, ...
template <typename scalar_t, int VEC>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ grad, const uint32_t* __restrict__ sorted_keys,
                                     const int64_t* __restrict__ sorted_patches, int64_t num_entries,
                                     int64_t num_positions, int64_t dim, int64_t table_dim, scalar_t* __restrict__ out) {
  __shared__ int64_t run[2];
  const uint32_t key = blockIdx.x;
  if (threadIdx.x == 0) {
    run[0] = lower_bound(sorted_keys, num_entries, key);
    run[1] = lower_bound(sorted_keys, num_entries, key + 1);
  }
  __syncthreads();
  const int64_t begin = run[0], end = run[1];
  const int64_t axis = key / num_positions, n = key - axis * num_positions;
  scalar_t* out_row = out + (table_dim == 0 ? (axis * num_positions + n) * dim : (n * 2 + axis) * dim);
  const int64_t chunks = dim / VEC;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t j = begin; j < end; ++j) {  // increasing patch order (stable sort)
      const Vec<scalar_t, VEC> g = *reinterpret_cast<const Vec<scalar_t, VEC>*>(grad + sorted_patches[j] * dim + c * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += to_float(g.v[i]);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out_row + c * VEC) = o;
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  VITOPS_CHECK(err == cudaSuccess, "vitops._factorized_posemb_backward: ", what, " failed: ", cudaGetErrorString(err));
}

template <typename scalar_t>
void launch_backward_rows(const scalar_t* grad, const uint32_t* sorted_keys, const int64_t* sorted_patches,
                          int64_t num_entries, int64_t num_positions, int64_t dim, int64_t table_dim, scalar_t* out,
                          cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec_ok = vector_fits(kVec, sizeof(scalar_t), {grad, out}, {dim});
  const int64_t chunks = vec_ok ? dim / kVec : dim;
  const int threads = (int)std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(chunks, 32) * 32));
  const unsigned blocks = (unsigned)(2 * num_positions);
  if (vec_ok) {
    VITOPS_LAUNCH(blocks, threads, 0, stream, backward_rows_kernel<scalar_t, kVec>)(grad, sorted_keys, sorted_patches, num_entries,
                                                                         num_positions, dim, table_dim, out);
  } else {
    VITOPS_LAUNCH(blocks, threads, 0, stream, backward_rows_kernel<scalar_t, 1>)(grad, sorted_keys, sorted_patches, num_entries,
                                                                      num_positions, dim, table_dim, out);
  }
  VITOPS_CUDA_CHECK_LAUNCH();
}

Tensor factorized_posemb_backward_cuda(const Tensor& grad_output, const Tensor& positions_xy, int64_t num_positions,
                                       int64_t table_dim) {
  const int64_t num_patches = check_backward(grad_output, positions_xy, num_positions, table_dim, /*allow_double=*/false);
  // Keys are uint32 and one block per table row: 2 * N_pos + 1 must fit both.
  VITOPS_CHECK(num_positions < (int64_t(1) << 30), "vitops._factorized_posemb_backward: `num_positions` (",
               num_positions, ") must be below 2^30 on CUDA");
  CudaDeviceGuard guard(grad_output.get_device());
  const int64_t D = grad_output.size(grad_output.dim() - 1);
  Tensor out = new_empty(grad_output, table_sizes(num_positions, D, table_dim), grad_output.scalar_type());
  if (out.numel() == 0) return out;
  cudaStream_t stream = current_cuda_stream(grad_output.get_device());
  const int64_t num_entries = 2 * num_patches;

  // Sorted (key, patch) pairs; with no patches every row simply receives zeros.
  Tensor sorted_keys = new_empty(grad_output, {std::max<int64_t>(num_entries, 1)}, ScalarType::Int);
  Tensor sorted_patches = new_empty(grad_output, {std::max<int64_t>(num_entries, 1)}, ScalarType::Long);
  auto* sorted_keys_ptr = static_cast<uint32_t*>(sorted_keys.mutable_data_ptr());
  auto* sorted_patches_ptr = sorted_patches.mutable_data_ptr<int64_t>();
  if (num_entries > 0) {
    const Tensor pos = as_contiguous(positions_xy);
    Tensor keys = new_empty(grad_output, {num_entries}, ScalarType::Int);
    Tensor patches = new_empty(grad_output, {num_entries}, ScalarType::Long);
    auto* keys_ptr = static_cast<uint32_t*>(keys.mutable_data_ptr());
    auto* patches_ptr = patches.mutable_data_ptr<int64_t>();
    const int64_t blocks = std::min<int64_t>(ceil_div(num_entries, kThreads), 65535LL * 8);
    with_index_type(pos.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      VITOPS_LAUNCH((unsigned)blocks, kThreads, 0, stream, make_keys_kernel<index_t>)(pos.const_data_ptr<index_t>(), num_entries,
                                                                          num_positions, keys_ptr, patches_ptr);
    });
    VITOPS_CUDA_CHECK_LAUNCH();
#if !defined(VITOPS_CUDA_EMULATION) && CUB_VERSION < 200100
    // CUB before 2.1 takes num_items as int: larger counts would be narrowed (and sort garbage).
    VITOPS_CHECK(num_entries <= INT_MAX, "vitops._factorized_posemb_backward: ", num_patches,
                 " patches are more than this CUB version (", CUB_VERSION, ") can sort on CUDA (at most ",
                 INT_MAX / 2, ")");
#endif
    // Only the bits that can be set by keys up to the sentinel 2 * N_pos take part in the sort.
    int end_bit = 1;
    while (end_bit < 32 && (uint64_t(1) << end_bit) <= uint64_t(2 * num_positions)) ++end_bit;
    size_t temp_bytes = 0;
    check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_ptr, sorted_keys_ptr, patches_ptr,
                                               sorted_patches_ptr, num_entries, 0, end_bit, stream),
               "cub::DeviceRadixSort::SortPairs (sizing)");
    Tensor temp = new_empty(grad_output, {static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, ScalarType::Byte);
    check_cuda(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, keys_ptr, sorted_keys_ptr,
                                               patches_ptr, sorted_patches_ptr, num_entries, 0, end_bit, stream),
               "cub::DeviceRadixSort::SortPairs");
  }
  const Tensor grad = as_contiguous(grad_output);
  VITOPS_DISPATCH_CUDA_FLOATING(grad.scalar_type(), "factorized_posemb_backward_cuda", [&] {
    launch_backward_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), sorted_keys_ptr, sorted_patches_ptr, num_entries,
                                   num_positions, D, table_dim, out.mutable_data_ptr<scalar_t>(), stream);
  });
  return out;
}

}  // namespace
}  // namespace vitops::factorized_posemb

VITOPS_CUDA_KERNELS(m) {
  m.impl("factorized_posemb", TORCH_BOX(&vitops::factorized_posemb::factorized_posemb_cuda));
  m.impl("_factorized_posemb_backward", TORCH_BOX(&vitops::factorized_posemb::factorized_posemb_backward_cuda));
}

// The CUDA pooling kernels of avg_pool_by_positions and avg_pool_scale_standardize (the latter with an
// active Epilogue, applied when a slot is stored / to each gradient): one launch per op, no host
// synchronisation, no atomics.
//
// Forward: one block per (image, tile of consecutive slots, chunk of D columns). The block reduces
// the image's grid width from its positions, then walks the positions in increasing patch order, a
// block-width chunk at a time: each chunk is compacted (warp ballots, order kept) into the list of
// patches that land in this block's slots, and every thread adds those rows into the float32
// accumulators of the columns it alone owns (shared memory, [slot][vector lane][thread], so a warp
// touches consecutive words: no bank conflicts). The summation order
// is therefore the patch order, whatever the launch shape: bitwise reproducible.
//
// Backward: one block per (image, tile of rows). The block reduces the grid width the same way,
// then gathers grad_output[b, slot] * (1/k²) (or zero) into each row of its tile.
//
// Invalid patches (a negative coordinate that is not padding, a slot >= length) are skipped here:
// raising would need a host synchronisation; the CPU kernel raises instead.
#pragma once

#include <algorithm>

#include "kernels/pool/pool.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::pool {
// Unnamed: both ops' translation units instantiate the same kernel templates; each keeps its own
// copy rather than relying on the linker to merge identical device code across modules.
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;
constexpr int kMaxSlotsPerTile = 32;
constexpr int64_t kAccumulatorBytes = 32 * 1024;  // dynamic shared memory budget, below the 48 KiB default
constexpr int64_t kTargetBlocks = 264;            // about two blocks per SM on the largest GPUs
constexpr int64_t kRowsPerBackwardBlock = 32;     // amortises the per-block width reduction

// Strided view of positions_xy[B, L, 2].
template <typename index_t>
struct Positions {
  const index_t* data;
  int64_t stride_b, stride_l, stride_c;
  __device__ __forceinline__ int64_t x(int64_t b, int64_t l) const {
    return static_cast<int64_t>(data[b * stride_b + l * stride_l]);
  }
  __device__ __forceinline__ int64_t y(int64_t b, int64_t l) const {
    return static_cast<int64_t>(data[b * stride_b + l * stride_l + stride_c]);
  }
};

// (max clamped x over image b's non-padding patches + 1) / k, returned to every thread.
// Contains __syncthreads(): every thread of the block must call it.
template <typename index_t>
__device__ int64_t block_pooled_width(const Positions<index_t>& pos, int64_t b, int64_t L, int64_t k) {
  __shared__ int64_t warp_max[kMaxThreads / kWarp];
  int64_t m = 0;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) m = max(m, clamped_x_for_width(pos.x(b, l), pos.y(b, l)));
  for (int offset = kWarp / 2; offset > 0; offset /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (threadIdx.x % kWarp == 0) warp_max[threadIdx.x / kWarp] = m;
  __syncthreads();
  int64_t result = 0;
  for (int w = 0; w < (int)(blockDim.x / kWarp); ++w) result = max(result, warp_max[w]);
  return pooled_width(result, k);
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    pool_forward_kernel(const scalar_t* __restrict__ x, int64_t xs_b, int64_t xs_l, int64_t xs_d,
                        Positions<index_t> pos, scalar_t* __restrict__ out, bool* __restrict__ mask, int64_t L,
                        int64_t D, int64_t length, int64_t k, float weight, int64_t slot_tiles, int64_t d_chunks,
                        int slots_per_tile, const Epilogue epilogue) {
  VITOPS_DYNAMIC_SHARED(float, accumulators);  // [slots_per_tile][VEC][blockDim.x]
  __shared__ int64_t matched_patch[kMaxThreads];
  __shared__ int matched_slot[kMaxThreads];
  __shared__ int warp_matches[kMaxThreads / kWarp];
  __shared__ bool slot_hit[kMaxSlotsPerTile];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  const int64_t block = blockIdx.x;
  const int64_t chunk = block % d_chunks;
  const int64_t tile = (block / d_chunks) % slot_tiles;
  const int64_t b = block / (d_chunks * slot_tiles);
  const int64_t first_slot = tile * slots_per_tile;
  const int tile_slots = (int)min((int64_t)slots_per_tile, length - first_slot);
  const int64_t cols = (int64_t)blockDim.x * VEC;
  // This thread's VEC columns; with VEC > 1, D % VEC == 0 so the group is all in or all out.
  const int64_t col = chunk * cols + (int64_t)tid * VEC;
  const bool owns_columns = col < D;

  for (int i = tid; i < tile_slots * cols; i += blockDim.x) accumulators[i] = 0.f;
  if (tid < tile_slots) slot_hit[tid] = false;
  const int64_t pooled_w = block_pooled_width(pos, b, L, k);  // syncs, so the zeroing is visible too

  for (int64_t start = 0; start < L; start += blockDim.x) {
    const int64_t l = start + tid;
    int local_slot = -1;
    if (l < L) {
      const int64_t s = slot_of(pos.x(b, l), pos.y(b, l), pooled_w, k, length);
      if (s >= first_slot && s < first_slot + tile_slots) local_slot = (int)(s - first_slot);
    }
    // Order-preserving compaction: rank within the warp from the ballot, warps in order.
    const unsigned ballot = __ballot_sync(0xffffffffu, local_slot >= 0);
    if (lane == 0) warp_matches[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_matches[w] : 0;
      total += warp_matches[w];
    }
    if (local_slot >= 0) {
      const int at = before + __popc(ballot & ((1u << lane) - 1u));
      matched_patch[at] = l;
      matched_slot[at] = local_slot;
      slot_hit[local_slot] = true;  // every writer stores the same value
    }
    __syncthreads();
    if (owns_columns) {
      for (int i = 0; i < total; ++i) {
        const scalar_t* row = x + b * xs_b + matched_patch[i] * xs_l;
        float* acc = accumulators + matched_slot[i] * cols + tid;
        if constexpr (VEC > 1) {
          const Vec<scalar_t, VEC> v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(row + col);
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            acc[j * blockDim.x] = __fadd_rn(acc[j * blockDim.x], __fmul_rn(to_float(v.v[j]), weight));
        } else {
          acc[0] = __fadd_rn(acc[0], __fmul_rn(to_float(row[col * xs_d]), weight));
        }
      }
    }
    __syncthreads();  // the next chunk reuses matched_* and warp_matches
  }

  if (owns_columns) {
    for (int s = 0; s < tile_slots; ++s) {
      const float* acc = accumulators + s * cols + tid;
      scalar_t* dst = out + (b * length + first_slot + s) * D + col;
      Vec<scalar_t, VEC> v;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float sum = acc[j * blockDim.x];
        v.v[j] = static_cast<scalar_t>(epilogue.active ? finish_pooled<scalar_t>(sum, epilogue, col + j) : sum);
      }
      *reinterpret_cast<Vec<scalar_t, VEC>*>(dst) = v;
    }
  }
  if (chunk == 0 && tid < tile_slots) mask[b * length + first_slot + tid] = slot_hit[tid];
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    pool_backward_kernel(const scalar_t* __restrict__ grad, int64_t gs_b, int64_t gs_s, int64_t gs_d,
                         Positions<index_t> pos, scalar_t* __restrict__ grad_x, int64_t L, int64_t D, int64_t length,
                         int64_t k, float weight, int64_t row_tiles, const Epilogue epilogue) {
  const int64_t b = blockIdx.x / row_tiles;
  const int64_t first_row = (blockIdx.x % row_tiles) * kRowsPerBackwardBlock;
  const int64_t last_row = min(L, first_row + kRowsPerBackwardBlock);
  const int64_t pooled_w = block_pooled_width(pos, b, L, k);
  const int64_t groups = D / VEC;  // VEC > 1 only when D % VEC == 0
  for (int64_t l = first_row; l < last_row; ++l) {
    const int64_t s = slot_of(pos.x(b, l), pos.y(b, l), pooled_w, k, length);
    const bool valid = s >= 0 && s < length;
    scalar_t* dst = grad_x + (b * L + l) * D;
    const scalar_t* src = grad + b * gs_b + (valid ? s : 0) * gs_s;
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      Vec<scalar_t, VEC> v{};  // zeros, kept for rows with no valid slot
      if (valid) {
        if constexpr (VEC > 1) {
          v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + g * VEC);
        } else {
          v.v[0] = src[g * gs_d];
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float gv = to_float(v.v[j]);
          if (epilogue.active) gv = unfinish_grad(gv, epilogue, g * VEC + j);
          v.v[j] = static_cast<scalar_t>(__fmul_rn(gv, weight));
        }
      }
      *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + g * VEC) = v;
    }
  }
}

// 16-byte vectors need unit stride along D, D a multiple of the vector width and aligned rows.
template <typename scalar_t>
bool can_vectorize(const Tensor& t, int64_t D) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  return t.stride(2) == 1 && vector_fits(vec, sizeof(scalar_t), {t.const_data_ptr()}, {D, t.stride(1), t.stride(0)});
}

template <typename index_t>
Positions<index_t> positions_view(const Tensor& p) {
  return Positions<index_t>{p.const_data_ptr<index_t>(), p.stride(0), p.stride(1), p.stride(2)};
}

int threads_for(int64_t groups) {
  return (int)std::clamp<int64_t>(ceil_div(groups, kWarp) * kWarp, kWarp, kMaxThreads);
}

template <typename scalar_t, typename index_t, int VEC>
void launch_forward(const char* op, const Tensor& x, const Tensor& positions, const Geometry& g, Tensor& out,
                    Tensor& mask, const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t groups = ceil_div(g.dim, VEC);
  const int threads = threads_for(groups);
  const int64_t d_chunks = std::max<int64_t>(1, ceil_div(groups, threads));  // >= 1: D = 0 still writes the mask
  const int64_t cols = (int64_t)threads * VEC;
  // Fewer slots per block means more blocks but more redundant position scans; aim for enough blocks
  // to fill the GPU within the shared-memory budget.
  const int64_t budget_slots = std::max<int64_t>(1, kAccumulatorBytes / (cols * (int64_t)sizeof(float)));
  const int64_t wanted_slots = std::max<int64_t>(1, g.batch * d_chunks * g.length / kTargetBlocks);
  const int slots_per_tile =
      (int)std::min<int64_t>({budget_slots, wanted_slots, (int64_t)kMaxSlotsPerTile, g.length});
  const int64_t slot_tiles = ceil_div(g.length, slots_per_tile);
  const int64_t blocks = g.batch * slot_tiles * d_chunks;
  VITOPS_CHECK(blocks <= 0x7fffffffLL, "vitops.", op, ": problem too large for one launch (", blocks, " blocks)");
  const size_t smem = (size_t)slots_per_tile * cols * sizeof(float);
  const float weight = 1.f / (float)(g.kernel * g.kernel);
  VITOPS_LAUNCH((unsigned)blocks, threads, smem, stream, pool_forward_kernel<scalar_t, index_t, VEC>)(
      x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), positions_view<index_t>(positions),
      out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(), g.seq_len, g.dim, g.length, g.kernel, weight,
      slot_tiles, d_chunks, slots_per_tile, epilogue);
  VITOPS_CUDA_CHECK_LAUNCH();
}

template <typename scalar_t, typename index_t, int VEC>
void launch_backward(const char* op, const Tensor& grad, const Tensor& positions, const Geometry& g, Tensor& grad_x,
                     const Epilogue& epilogue, cudaStream_t stream) {
  const int threads = threads_for(g.dim / VEC);
  const int64_t row_tiles = ceil_div(g.seq_len, kRowsPerBackwardBlock);
  const int64_t blocks = g.batch * row_tiles;
  VITOPS_CHECK(blocks <= 0x7fffffffLL, "vitops.", op, ": problem too large for one launch (", blocks, " blocks)");
  const float weight = 1.f / (float)(g.kernel * g.kernel);
  VITOPS_LAUNCH((unsigned)blocks, threads, 0, stream, pool_backward_kernel<scalar_t, index_t, VEC>)(
      grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
      positions_view<index_t>(positions), grad_x.mutable_data_ptr<scalar_t>(), g.seq_len, g.dim, g.length, g.kernel,
      weight, row_tiles, epilogue);
  VITOPS_CUDA_CHECK_LAUNCH();
}

// THO_DISPATCH_V2 splits its body on top-level commas, so the (index type, vector width) choice
// lives here rather than inside the dispatch lambda.
template <typename scalar_t>
void forward_for_dtype(const char* op, const Tensor& x, const Tensor& positions, const Geometry& g, Tensor& out,
                       Tensor& mask, const Epilogue& epilogue, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorize = can_vectorize<scalar_t>(x, g.dim);
  VITOPS_DISPATCH_INDEX(positions.scalar_type(), "avg_pool_by_positions_cuda", [&] {
    if (vectorize) {
      launch_forward<scalar_t, index_t, kVec>(op, x, positions, g, out, mask, epilogue, stream);
    } else {
      launch_forward<scalar_t, index_t, 1>(op, x, positions, g, out, mask, epilogue, stream);
    }
  });
}

template <typename scalar_t>
void backward_for_dtype(const char* op, const Tensor& grad, const Tensor& positions, const Geometry& g,
                        Tensor& grad_x, const Epilogue& epilogue, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorize = can_vectorize<scalar_t>(grad, g.dim);
  VITOPS_DISPATCH_INDEX(positions.scalar_type(), "avg_pool_by_positions_backward_cuda", [&] {
    if (vectorize) {
      launch_backward<scalar_t, index_t, kVec>(op, grad, positions, g, grad_x, epilogue, stream);
    } else {
      launch_backward<scalar_t, index_t, 1>(op, grad, positions, g, grad_x, epilogue, stream);
    }
  });
}

}  // namespace
}  // namespace vitops::pool

// qkv_norm_rope on CUDA.
//
// Forward: ONE launch. A block owns a tile of kRowsPerTile (b, l) rows: its threads first fill the
// tile's cos/sin tables (rounded to the dtype) in shared memory, then each warp takes head rows
// (row, q/k/v head) in turn: it loads the row (16-byte vectors when the view allows), reduces the
// sum of squares with warp shuffles, writes the normalised row (rounded to the dtype) to its
// shared-memory scratch row, and writes the rotated row into contiguous [B, L, N, hd] memory (the
// Python wrapper returns [B, N, L, hd] transpose views of it).
//
// Llama 4's orders (the norm after the rotation, no rotation, q scaled per row) are stages of the
// same item body: the rotated row is staged in registers (at most kMaxHeadDim / 32 values per lane)
// and written back over the scratch row, so they need no extra shared memory.
//
// Backward: the same tiling for dq/dk/dv; weight gradients are accumulated per warp in shared
// memory (each lane owns fixed channels, so no atomics), summed over warps in fixed order into a
// [blocks, 2, hd] float32 buffer, and a second small kernel sums that buffer over blocks in fixed
// order. The grid size depends only on the shape, so results are bitwise reproducible.
#include "../qkv_norm_rope.h"
#include "vitops/cuda_utils.cuh"
#include "vitops/device_math.h"

namespace vitops::qkv_norm_rope {
namespace {

using rope::ChannelRole;

constexpr int kWarpSize = 32;
constexpr int kRowsPerTile = 2;
constexpr int kForwardWarps = 8;
constexpr int kBackwardWarps = 4;
constexpr int64_t kMaxBackwardBlocks = 1024;  // fixed cap: part of the deterministic reduction order
constexpr int64_t kMaxHeadDim = 512;          // keeps the shared-memory tables under 48 KiB

// 16-byte vectors of a storage type.
template <typename scalar_t>
struct Vec16 : Vec<scalar_t, 16 / sizeof(scalar_t)> {
  static constexpr int kSize = 16 / sizeof(scalar_t);
};

struct Params {
  const void* in[kNumHeadTensors];
  HeadStrides in_strides[kNumHeadTensors];
  bool in_vectorized[kNumHeadTensors];
  const void* grad[kNumHeadTensors];  // backward only: [B, L, N, hd] views (the outputs' layout)
  HeadStrides grad_strides[kNumHeadTensors];
  bool grad_vectorized[kNumHeadTensors];
  void* out[kNumHeadTensors];  // forward and backward: contiguous [B, L, N, hd]
  const void* weight[kNumWeights];  // only with a weighted norm
  ValueKind weight_kind[kNumWeights];
  int64_t weight_stride[kNumWeights];
  norm::Kind norm_kind;
  bool v_norm;
  bool rotate;           // pairing "none": no rotation, no cos/sin tables
  bool norm_after_rope;  // q/k norm of the rotated (rounded) row
  const void* q_scale;   // [B or 1, L] factors of q's rows, or null
  ValueKind q_scale_kind;
  int64_t q_scale_strides[2];
  const void* positions;
  ValueKind position_kind;
  int64_t position_strides[3];
  int64_t batch, seq_len, head_dim;
  int64_t heads[kNumHeadTensors];
  rope::Layout layout;
  ValueKind rope_kind;  // dtype the cos/sin tables are rounded to
  float eps;
  // Computed on the host with the CPU kernel's function (HF builds inv_freq on the CPU too):
  // device powf may differ from it in the last bits. 1 KiB of the kernel parameter space. A given
  // table (rope_freqs) is read from device memory instead (copying it to the host would sync).
  float inverse_frequency[kMaxHeadDim / 2];
  const void* freq_table;
  ValueKind freq_kind;
  int64_t freq_stride;
  // precomputed cos/sin (rope_cos, rope_sin), read instead of evaluating angles; null when not given
  const void* angle_table[2];
  ValueKind angle_kind[2];
  int64_t angle_strides[2][3];  // batch stride 0 for a [1, L, hd / 2] table
  float* weight_partials;  // backward: [gridDim.x, 2, hd]
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Loads one head row into `row` (float) and returns the lane's partial sum of squares.
template <typename scalar_t>
__device__ __forceinline__ float load_row(const scalar_t* src, bool vectorized, int64_t hd, float* row, int lane) {
  float sum_sq = 0.f;
  if (vectorized) {
    using V = Vec16<scalar_t>;
    const int64_t num_vecs = hd / V::kSize;
    for (int64_t i = lane; i < num_vecs; i += kWarpSize) {
      const V vec = reinterpret_cast<const V*>(src)[i];
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const float x = static_cast<float>(vec.v[j]);
        row[i * V::kSize + j] = x;
        sum_sq += x * x;
      }
    }
  } else {
    for (int64_t e = lane; e < hd; e += kWarpSize) {
      const float x = static_cast<float>(src[e]);
      row[e] = x;
      sum_sq += x * x;
    }
  }
  return sum_sq;
}

// (b, l, cos/sin tables) of every row in the tile starting at `row0`.
__device__ void fill_tile_tables(const Params& p, int64_t row0, const float* inverse_frequency, float* cos_tab,
                                 float* sin_tab) {
  const int64_t half = p.head_dim / 2;
  for (int64_t idx = threadIdx.x; idx < kRowsPerTile * half; idx += blockDim.x) {
    const int64_t r = idx / half, k = idx - r * half;
    const int64_t row = row0 + r;
    if (row >= p.batch * p.seq_len) continue;
    const int64_t b = row / p.seq_len, l = row - b * p.seq_len;
    if (p.angle_table[0] != nullptr) {  // given tables, rounded to rope_dtype like evaluated ones
      cos_tab[idx] = round_as(p.rope_kind, load_as<float>(p.angle_table[0], p.angle_kind[0],
                                                          b * p.angle_strides[0][0] + l * p.angle_strides[0][1] +
                                                              k * p.angle_strides[0][2]));
      sin_tab[idx] = round_as(p.rope_kind, load_as<float>(p.angle_table[1], p.angle_kind[1],
                                                          b * p.angle_strides[1][0] + l * p.angle_strides[1][1] +
                                                              k * p.angle_strides[1][2]));
      continue;
    }
    const int64_t axis = p.layout.chunk_of_pair(k);
    const float pos = load_as<float>(p.positions, p.position_kind,
                                     b * p.position_strides[0] + l * p.position_strides[1] + axis * p.position_strides[2]);
    // A non-finite angle (a NaN/inf or huge position: the CPU kernel raises) gives NaN rows here.
    const float angle = pos * inverse_frequency[k];
    cos_tab[idx] = round_as(p.rope_kind, cosf(angle));
    sin_tab[idx] = round_as(p.rope_kind, sinf(angle));
  }
}

__device__ void fill_block_constants(const Params& p, float* inverse_frequency, float* weights) {
  const int64_t hd = p.head_dim;
  for (int64_t k = threadIdx.x; k < hd / 2; k += blockDim.x)
    inverse_frequency[k] =
        p.freq_table != nullptr ? load_as<float>(p.freq_table, p.freq_kind, k * p.freq_stride) : p.inverse_frequency[k];
  if (!norm::has_weight(p.norm_kind)) return;
  for (int64_t e = threadIdx.x; e < kNumWeights * hd; e += blockDim.x) {
    const int w = static_cast<int>(e / hd);
    weights[e] = norm::weight_factor(p.norm_kind,
                                     load_as<float>(p.weight[w], p.weight_kind[w], (e - w * hd) * p.weight_stride[w]));
  }
}

// Which tensor (0 = q, 1 = k, 2 = v) and head an item index within a row selects.
struct HeadItem {
  int tensor;
  int64_t head;
};

__device__ __forceinline__ HeadItem split_head(const Params& p, int64_t h) {
  if (h < p.heads[0]) return {0, h};
  if (h < p.heads[0] + p.heads[1]) return {1, h - p.heads[0]};
  return {2, h - p.heads[0] - p.heads[1]};
}

// The shared-memory tables both kernels start with: [hd/2] inverse frequencies, [2, hd] weight
// factors, the tile's [rows, hd/2] cos and sin; each kernel's scratch follows at `rest`.
struct SharedTables {
  float *inverse_frequency, *weights, *cos_tab, *sin_tab, *rest;
};

VITOPS_HOST_DEVICE int64_t shared_table_floats(int64_t hd) {
  return hd / 2 + kNumWeights * hd + 2 * kRowsPerTile * (hd / 2);
}

__device__ __forceinline__ SharedTables shared_tables(float* smem, int64_t hd) {
  SharedTables t;
  t.inverse_frequency = smem;
  t.weights = t.inverse_frequency + hd / 2;
  t.cos_tab = t.weights + kNumWeights * hd;
  t.sin_tab = t.cos_tab + kRowsPerTile * (hd / 2);
  t.rest = smem + shared_table_floats(hd);
  return t;
}

// One (row, head) item of a tile: where the row is, which tensor and head, and the row's cos/sin.
struct HeadRow {
  int64_t r, b, l;  // row within the tile, batch, position
  int tensor;
  int64_t head;
  const float* cos_row;
  const float* sin_row;
};

// The tile loop both kernels run: tiles of kRowsPerTile rows strided over the grid, the tile's cos/sin
// tables filled by the whole block, then one warp per (row, head) item: body(item) does the head row
// and ends with the warp converged (its scratch row is reused by the next item).
template <int kWarps, typename Body>
__device__ __forceinline__ void for_each_head_row(const Params& p, const float* inverse_frequency, float* cos_tab,
                                                  float* sin_tab, int warp, Body&& body) {
  const int64_t half = p.head_dim / 2;
  const int64_t rows = p.batch * p.seq_len;
  const int64_t total_heads = p.heads[0] + p.heads[1] + p.heads[2];
  const int64_t num_tiles = ceil_div(rows, kRowsPerTile);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kRowsPerTile;
    __syncthreads();  // previous tile's tables are no longer read (and block constants are ready)
    if (p.rotate) fill_tile_tables(p, row0, inverse_frequency, cos_tab, sin_tab);
    __syncthreads();
    const int64_t tile_rows = rows - row0 < kRowsPerTile ? rows - row0 : kRowsPerTile;
    for (int64_t item = warp; item < tile_rows * total_heads; item += kWarps) {
      const int64_t r = item / total_heads;
      const HeadItem which = split_head(p, item - r * total_heads);
      const int64_t row = row0 + r, b = row / p.seq_len;
      body(HeadRow{r, b, row - b * p.seq_len, which.tensor, which.head, cos_tab + r * half, sin_tab + r * half});
    }
  }
}

constexpr int kMaxChannelsPerLane = kMaxHeadDim / kWarpSize;

// q_scale's factor of row (b, l) (1 without q_scale).
__device__ __forceinline__ float q_scale_of(const Params& p, int64_t b, int64_t l) {
  if (p.q_scale == nullptr) return 1.f;
  return load_as<float>(p.q_scale, p.q_scale_kind, b * p.q_scale_strides[0] + l * p.q_scale_strides[1]);
}

// Replaces a warp's row with value(e) for every channel, where value may read any channel of the
// old row: the lane's values (channels lane, lane + 32, ...) are staged in registers, then written
// back. Enter and leave converged.
template <typename Value>
__device__ __forceinline__ void restage_row(float* row, int64_t hd, int lane, Value&& value) {
  float staged[kMaxChannelsPerLane];
#pragma unroll
  for (int j = 0; j < kMaxChannelsPerLane; ++j) {
    const int64_t e = lane + j * kWarpSize;
    if (e < hd) staged[j] = value(e);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kMaxChannelsPerLane; ++j) {
    const int64_t e = lane + j * kWarpSize;
    if (e < hd) row[e] = staged[j];
  }
  __syncwarp();
}

// The inverse RMS of a warp's row in shared memory (lanes read channels lane, lane + 32, ...).
__device__ __forceinline__ float row_inverse_rms(const float* row, int64_t hd, int lane, float eps) {
  float sum_sq = 0.f;
  for (int64_t e = lane; e < hd; e += kWarpSize) sum_sq += row[e] * row[e];
  return norm::inverse_rms(warp_sum(sum_sq), hd, eps);
}

// Params (~1.4 KB) stays in the kernel parameter space: __grid_constant__ lets the lambdas below take
// its address without the compiler copying it to per-thread local memory.
template <typename scalar_t>
__global__ void forward_kernel(const __grid_constant__ Params p) {
  VITOPS_DYNAMIC_SHARED(float, smem);
  const int64_t hd = p.head_dim;
  const SharedTables tables = shared_tables(smem, hd);
  float* inverse_frequency = tables.inverse_frequency;
  float* weights = tables.weights;
  float* scratch = tables.rest;  // [warps, hd]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* row_buf = scratch + warp * hd;

  fill_block_constants(p, inverse_frequency, weights);
  for_each_head_row<kForwardWarps>(p, inverse_frequency, tables.cos_tab, tables.sin_tab, warp, [&](const HeadRow& it) {
    const int tensor = it.tensor;
    const int64_t head = it.head, b = it.b, l = it.l;
    const HeadStrides& s = p.in_strides[tensor];
    const scalar_t* src = static_cast<const scalar_t*>(p.in[tensor]) + b * s.batch + l * s.seq + head * s.head;
    const float sum_sq = warp_sum(load_row(src, p.in_vectorized[tensor], hd, row_buf, lane));
    const float inv_rms = norm::inverse_rms(sum_sq, hd, p.eps);
    // each lane rewrites exactly the channels it loaded, so no sync is needed before this pass
    const bool is_qk = tensor < 2;
    const bool rotate = is_qk && p.rotate;
    // q/k: the op's norm; v: its weightless RMS norm, or nothing (then the row is copied)
    const norm::Kind kind = is_qk ? p.norm_kind : (p.v_norm ? norm::Kind::Rms : norm::Kind::None);
    const bool norm_after = is_qk && p.norm_after_rope && kind != norm::Kind::None;
    const bool scaled = tensor == 0 && p.q_scale != nullptr;
    const float* w = weights + (is_qk ? tensor : 0) * hd;
    const float* cos_row = it.cos_row;
    const float* sin_row = it.sin_row;
    auto normalised = [&](float x, float r, int64_t e) -> float {
      const float u = mul_rounded(x, r);
      return norm::has_weight(kind) ? round_to<scalar_t>(mul_rounded(u, w[e])) : round_to<scalar_t>(u);
    };
    auto normalise = [&](int64_t e) {
      if (kind == norm::Kind::None || norm_after) return;  // row_buf holds the input, exactly
      row_buf[e] = normalised(row_buf[e], inv_rms, e);
    };
    if (p.in_vectorized[tensor]) {
      constexpr int kVec = Vec16<scalar_t>::kSize;
      for (int64_t i = lane; i < hd / kVec; i += kWarpSize)
        for (int j = 0; j < kVec; ++j) normalise(i * kVec + j);
    } else {
      for (int64_t e = lane; e < hd; e += kWarpSize) normalise(e);
    }
    __syncwarp();
    if (norm_after) {  // Llama 4: the rotated row, rounded (apply_rotary_emb's type_as), then its norm
      if (rotate)
        restage_row(row_buf, hd, lane, [&](int64_t e) {
          return round_to<scalar_t>(rope::rotate_channel(row_buf, cos_row, sin_row, rope::channel_role(p.layout, e), e));
        });
      const float r = row_inverse_rms(row_buf, hd, lane, p.eps);
      for (int64_t e = lane; e < hd; e += kWarpSize) row_buf[e] = normalised(row_buf[e], r, e);
      __syncwarp();
    }
    const float row_scale = scaled ? q_scale_of(p, b, l) : 1.f;
    scalar_t* dst = static_cast<scalar_t*>(p.out[tensor]) + ((b * p.seq_len + l) * p.heads[tensor] + head) * hd;
    auto output = [&](int64_t e) -> scalar_t {
      float value = row_buf[e];
      if (rotate && !norm_after) value = rope::rotate_channel(row_buf, cos_row, sin_row, rope::channel_role(p.layout, e), e);
      // HF's (q * scale).to(dtype): the rounded row times the float32 factor, rounded once more
      if (scaled) value = round_to<scalar_t>(value) * row_scale;
      return static_cast<scalar_t>(value);
    };
    using V = Vec16<scalar_t>;
    if (hd % V::kSize == 0) {  // the output is a fresh contiguous tensor: aligned rows
      for (int64_t i = lane; i < hd / V::kSize; i += kWarpSize) {
        V vec;
#pragma unroll
        for (int j = 0; j < V::kSize; ++j) vec.v[j] = output(i * V::kSize + j);
        reinterpret_cast<V*>(dst)[i] = vec;
      }
    } else {
      for (int64_t e = lane; e < hd; e += kWarpSize) dst[e] = output(e);
    }
    __syncwarp();  // the scratch row is reused by this warp's next item
  });
}

template <typename scalar_t>
__global__ void backward_kernel(const __grid_constant__ Params p) {
  VITOPS_DYNAMIC_SHARED(float, smem);
  const int64_t hd = p.head_dim;
  const SharedTables tables = shared_tables(smem, hd);
  float* inverse_frequency = tables.inverse_frequency;
  float* weights = tables.weights;
  float* x_rows = tables.rest;                                     // [warps, hd]
  float* g_rows = x_rows + kBackwardWarps * hd;                    // [warps, hd]
  float* weight_grads = g_rows + kBackwardWarps * hd;              // [warps, 2, hd]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* x_row = x_rows + warp * hd;
  float* g_row = g_rows + warp * hd;
  float* my_weight_grads = weight_grads + warp * kNumWeights * hd;

  fill_block_constants(p, inverse_frequency, weights);
  for (int64_t e = threadIdx.x; e < kBackwardWarps * kNumWeights * hd; e += blockDim.x) weight_grads[e] = 0.f;
  for_each_head_row<kBackwardWarps>(p, inverse_frequency, tables.cos_tab, tables.sin_tab, warp, [&](const HeadRow& it) {
    const int tensor = it.tensor;
    const int64_t head = it.head, b = it.b, l = it.l;
    const HeadStrides& s = p.in_strides[tensor];
    const HeadStrides& gs = p.grad_strides[tensor];
    const scalar_t* src = static_cast<const scalar_t*>(p.in[tensor]) + b * s.batch + l * s.seq + head * s.head;
    const scalar_t* gsrc = static_cast<const scalar_t*>(p.grad[tensor]) + b * gs.batch + l * gs.seq + head * gs.head;
    const float sum_sq = warp_sum(load_row(src, p.in_vectorized[tensor], hd, x_row, lane));
    load_row(gsrc, p.grad_vectorized[tensor], hd, g_row, lane);
    __syncwarp();  // lanes read partners loaded by other lanes
    const bool is_qk = tensor < 2;
    const bool rotate = is_qk && p.rotate;
    const norm::Kind kind = is_qk ? p.norm_kind : (p.v_norm ? norm::Kind::Rms : norm::Kind::None);
    const bool weighted = is_qk && norm::has_weight(kind);
    const float* cos_row = it.cos_row;
    const float* sin_row = it.sin_row;
    if (tensor == 0 && p.q_scale != nullptr) {  // the q scale is the forward's last stage
      const float row_scale = q_scale_of(p, b, l);
      for (int64_t e = lane; e < hd; e += kWarpSize) g_row[e] *= row_scale;
      __syncwarp();
    }
    scalar_t* dst = static_cast<scalar_t*>(p.out[tensor]) + ((b * p.seq_len + l) * p.heads[tensor] + head) * hd;
    if (is_qk && p.norm_after_rope && kind != norm::Kind::None) {
      // The norm's input: the rotated row as the forward rounded it.
      if (rotate)
        restage_row(x_row, hd, lane, [&](int64_t e) {
          return round_to<scalar_t>(rope::rotate_channel(x_row, cos_row, sin_row, rope::channel_role(p.layout, e), e));
        });
      const float r = row_inverse_rms(x_row, hd, lane, p.eps);
      float dot = 0.f;
      for (int64_t e = lane; e < hd; e += kWarpSize) {
        const float u = x_row[e] * r;
        float gu = g_row[e];
        if (weighted) {
          my_weight_grads[tensor * hd + e] += gu * u;
          gu = gu * weights[tensor * hd + e];
        }
        dot += gu * u;
      }
      const float mean_dot = warp_sum(dot) / static_cast<float>(hd);
      // d(loss)/d(rotated row), then the transposed rotation
      auto grad_rotated = [&](int64_t e) -> float {
        const float u = x_row[e] * r;
        const float gu = weighted ? g_row[e] * weights[tensor * hd + e] : g_row[e];
        return r * (gu - mul_rounded(u, mean_dot));
      };
      if (!rotate) {
        for (int64_t e = lane; e < hd; e += kWarpSize) dst[e] = static_cast<scalar_t>(grad_rotated(e));
        __syncwarp();
        return;
      }
      restage_row(g_row, hd, lane, grad_rotated);
      for (int64_t e = lane; e < hd; e += kWarpSize)
        dst[e] = static_cast<scalar_t>(rope::rotate_channel_backward(g_row, cos_row, sin_row,
                                                                     rope::channel_role(p.layout, e), e));
      __syncwarp();
      return;
    }
    const float inv_rms = norm::inverse_rms(sum_sq, hd, p.eps);
    // d(loss)/d(normalised, weighted row) at channel e
    auto grad_normed = [&](int64_t e) -> float {
      if (!rotate) return g_row[e];
      const ChannelRole role = rope::channel_role(p.layout, e);
      return rope::rotate_channel_backward(g_row, cos_row, sin_row, role, e);
    };
    if (kind == norm::Kind::None) {  // no normalisation: the (transposed) rotation alone
      for (int64_t e = lane; e < hd; e += kWarpSize) dst[e] = static_cast<scalar_t>(grad_normed(e));
      __syncwarp();
      return;
    }
    // Pass 1: weight gradients and the projection term mean(gu * u).
    float dot = 0.f;
    for (int64_t e = lane; e < hd; e += kWarpSize) {
      const float u = x_row[e] * inv_rms;
      const float gn = grad_normed(e);
      float gu = gn;
      if (weighted) {
        my_weight_grads[tensor * hd + e] += gn * u;
        gu = gn * weights[tensor * hd + e];
      }
      dot += gu * u;
    }
    const float mean_dot = warp_sum(dot) / static_cast<float>(hd);
    // Pass 2: dx = inv_rms * (gu - u * mean(gu * u)), written to [B, L, N, hd].
    for (int64_t e = lane; e < hd; e += kWarpSize) {
      const float u = x_row[e] * inv_rms;
      const float gn = grad_normed(e);
      const float gu = weighted ? gn * weights[tensor * hd + e] : gn;
      dst[e] = static_cast<scalar_t>(inv_rms * (gu - mul_rounded(u, mean_dot)));
    }
    __syncwarp();
  });
  __syncthreads();
  if (p.weight_partials == nullptr) return;  // a norm without weights
  // Block partial of the weight gradients: warps summed in index order.
  for (int64_t e = threadIdx.x; e < kNumWeights * hd; e += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < kBackwardWarps; ++w) sum += weight_grads[w * kNumWeights * hd + e];
    p.weight_partials[blockIdx.x * kNumWeights * hd + e] = sum;
  }
}

// Sums partials[num_blocks, width] over blocks in a fixed order: thread (column c, group g) sums
// blocks g, g + kGroups, ... in order; the kGroups results are then added in group order.
constexpr int kReduceColumns = 32, kReduceGroups = 8;

__global__ void reduce_weight_grads_kernel(const float* __restrict__ partials, int64_t num_blocks, int64_t hd,
                                           void* grad_q_weight, ValueKind q_kind, void* grad_k_weight,
                                           ValueKind k_kind) {
  __shared__ float group_sums[kReduceGroups][kReduceColumns];
  const int column = threadIdx.x % kReduceColumns, group = threadIdx.x / kReduceColumns;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceColumns + column;
  const int64_t width = kNumWeights * hd;
  float sum = 0.f;
  if (c < width)
    for (int64_t blk = group; blk < num_blocks; blk += kReduceGroups) sum += partials[blk * width + c];
  group_sums[group][column] = sum;
  __syncthreads();
  if (group == 0 && c < width) {
    float total = 0.f;
    for (int g = 0; g < kReduceGroups; ++g) total += group_sums[g][column];
    if (c < hd) {
      store_as<float>(grad_q_weight, q_kind, c, total);
    } else {
      store_as<float>(grad_k_weight, k_kind, c - hd, total);
    }
  }
}

bool is_vectorizable(const void* ptr, const HeadStrides& s, int64_t hd, size_t elem) {
  return vector_fits(static_cast<int>(16 / elem), static_cast<int64_t>(elem), {ptr}, {hd, s.batch, s.seq, s.head});
}

Params make_params(const Geometry& g, const Tensor* inputs[kNumHeadTensors], const std::optional<Tensor>& q_weight,
                   const std::optional<Tensor>& k_weight, const Tensor& positions, double eps, double base,
                   const std::optional<Tensor>& rope_freqs, const std::optional<Tensor>& rope_cos,
                   const std::optional<Tensor>& rope_sin, const std::optional<Tensor>& q_scale) {
  Params p{};
  for (int t = 0; t < kNumHeadTensors; ++t) {
    p.in[t] = inputs[t]->const_data_ptr();
    p.in_strides[t] = head_strides(*inputs[t]);
    p.in_vectorized[t] = is_vectorizable(p.in[t], p.in_strides[t], g.head_dim, inputs[t]->element_size());
    p.heads[t] = g.heads[t];
  }
  p.weight[0] = q_weight.has_value() ? q_weight->const_data_ptr() : nullptr;
  p.weight[1] = k_weight.has_value() ? k_weight->const_data_ptr() : nullptr;
  for (int w = 0; w < kNumWeights; ++w) {
    p.weight_kind[w] = g.weight_kind[w];
    p.weight_stride[w] = g.weight_stride[w];
  }
  p.norm_kind = g.options.norm;
  p.v_norm = g.options.v_norm;
  p.rotate = g.options.rotate;
  p.norm_after_rope = g.options.norm_after_rope;
  p.q_scale = g.has_q_scale ? q_scale->const_data_ptr() : nullptr;
  p.q_scale_kind = g.q_scale_kind;
  for (int i = 0; i < 2; ++i) p.q_scale_strides[i] = g.q_scale_strides[i];
  p.positions = positions.const_data_ptr();
  p.position_kind = g.position_kind;
  for (int i = 0; i < 3; ++i) p.position_strides[i] = g.position_strides[i];
  p.batch = g.batch;
  p.seq_len = g.seq_len;
  p.head_dim = g.head_dim;
  p.layout = g.layout;
  p.rope_kind = g.rope_kind;
  p.eps = static_cast<float>(eps);
  for (int64_t k = 0; k < g.layout.num_pairs(); ++k)
    p.inverse_frequency[k] = rope::inverse_frequency<float>(g.layout, k, static_cast<float>(base));
  p.freq_table = g.has_freq_table ? rope_freqs->const_data_ptr() : nullptr;
  p.freq_kind = g.freq_kind;
  p.freq_stride = g.freq_stride;
  p.angle_table[0] = g.has_angle_table ? rope_cos->const_data_ptr() : nullptr;
  p.angle_table[1] = g.has_angle_table ? rope_sin->const_data_ptr() : nullptr;
  for (int t = 0; t < 2; ++t) {
    p.angle_kind[t] = g.angle_kind[t];
    for (int i = 0; i < 3; ++i) p.angle_strides[t][i] = g.angle_strides[t][i];
  }
  return p;
}

void check_head_dim_fits(const char* op, int64_t hd) {
  VITOPS_CHECK(hd <= kMaxHeadDim, "vitops.", op, ": the CUDA kernel supports head dims up to ", kMaxHeadDim,
               ", got ", hd, " (the head dim of `q`)");
}

size_t forward_smem_bytes(int64_t hd) {
  return sizeof(float) * (shared_table_floats(hd) + kForwardWarps * hd);
}

size_t backward_smem_bytes(int64_t hd) {
  return sizeof(float) * (shared_table_floats(hd) + 2 * kBackwardWarps * hd + kBackwardWarps * kNumWeights * hd);
}

// Launch helpers (kept out of the dispatch macros: launch configurations contain commas).
template <typename scalar_t>
void launch_forward(const Params& p, unsigned blocks, cudaStream_t stream) {
  VITOPS_LAUNCH(blocks, kForwardWarps * kWarpSize, forward_smem_bytes(p.head_dim), stream, forward_kernel<scalar_t>)(p);
}

template <typename scalar_t>
void launch_backward(const Params& p, unsigned blocks, cudaStream_t stream) {
  VITOPS_LAUNCH(blocks, kBackwardWarps * kWarpSize, backward_smem_bytes(p.head_dim), stream, backward_kernel<scalar_t>)(p);
}

std::tuple<Tensor, Tensor, Tensor> qkv_norm_rope_cuda(const Tensor& q, const Tensor& k, const std::optional<Tensor>& v_arg,
                                                      const std::optional<Tensor>& q_weight,
                                                      const std::optional<Tensor>& k_weight, const Tensor& positions,
                                                      double eps, double base_frequency,
                                                      std::optional<ScalarType> rope_dtype, std::string norm_name,
                                                      bool v_norm, std::string pairing,
                                                      const std::optional<Tensor>& rope_freqs,
                                                      const std::optional<Tensor>& rope_cos,
                                                      const std::optional<Tensor>& rope_sin, bool norm_after_rope,
                                                      const std::optional<Tensor>& q_scale) {
  const char* op = "qkv_norm_rope";
  const Geometry g = check_inputs(op, q, k, v_arg, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                                  norm_name, v_norm, pairing, rope_freqs, rope_cos, rope_sin, norm_after_rope, q_scale,
                                  /*allow_double=*/false);
  check_head_dim_fits(op, g.head_dim);
  CudaDeviceGuard guard(q.get_device());
  const Tensor v = v_or_absent(q, v_arg);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  Tensor outs[kNumHeadTensors];
  for (int t = 0; t < kNumHeadTensors; ++t)
    outs[t] = allocate_attention_output(q, g, t);
  if (g.rows() == 0 || g.total_heads() == 0)
    return {outs[0], outs[1], outs[2]};
  Params p = make_params(g, inputs, q_weight, k_weight, positions, eps, base_frequency, rope_freqs, rope_cos,
                         rope_sin, q_scale);
  for (int t = 0; t < kNumHeadTensors; ++t) p.out[t] = outs[t].mutable_data_ptr();
  const int64_t tiles = ceil_div(g.rows(), kRowsPerTile);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, 0x7fffffffLL));
  cudaStream_t stream = current_cuda_stream(q.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(q.scalar_type(), "qkv_norm_rope_cuda", [&] {
    launch_forward<scalar_t>(p, blocks, stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return {outs[0], outs[1], outs[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> qkv_norm_rope_backward_cuda(
    const Tensor& grad_q, const Tensor& grad_k, const std::optional<Tensor>& grad_v, const Tensor& q, const Tensor& k,
    const std::optional<Tensor>& v_arg, const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight,
    const Tensor& positions, double eps, double base_frequency, std::optional<ScalarType> rope_dtype,
    std::string norm_name, bool v_norm, std::string pairing, const std::optional<Tensor>& rope_freqs,
    const std::optional<Tensor>& rope_cos, const std::optional<Tensor>& rope_sin, bool norm_after_rope,
    const std::optional<Tensor>& q_scale) {
  const char* op = "_qkv_norm_rope_backward";
  const Geometry g = check_inputs(op, q, k, v_arg, q_weight, k_weight, positions, eps, base_frequency, rope_dtype,
                                  norm_name, v_norm, pairing, rope_freqs, rope_cos, rope_sin, norm_after_rope, q_scale,
                                  /*allow_double=*/false);
  check_head_dim_fits(op, g.head_dim);
  CudaDeviceGuard guard(q.get_device());
  const Tensor v = v_or_absent(q, v_arg);
  BackwardBuffers buf =
      prepare_backward(op, g, grad_q, grad_k, grad_v, q, k, v, v_arg.has_value(), q_weight, k_weight);
  const Tensor* inputs[kNumHeadTensors] = {&q, &k, &v};
  const Tensor* grads = buf.grads;
  Tensor* grad_in = buf.grad_in;
  Tensor& grad_q_weight = buf.grad_weight[0];
  Tensor& grad_k_weight = buf.grad_weight[1];
  const bool weighted = norm::has_weight(g.options.norm);
  const int64_t tiles = ceil_div(g.rows(), kRowsPerTile);
  const int64_t blocks = std::max<int64_t>(1, std::min(tiles, kMaxBackwardBlocks));
  // [blocks, 2, hd] float32 partials; every block writes its row (zeros when it had no tiles).
  Tensor partials = new_empty(q, {weighted ? blocks : 0, kNumWeights, g.head_dim}, ScalarType::Float);
  Params p = make_params(g, inputs, q_weight, k_weight, positions, eps, base_frequency, rope_freqs, rope_cos,
                         rope_sin, q_scale);
  for (int t = 0; t < kNumHeadTensors; ++t) {
    p.grad[t] = grads[t].const_data_ptr();
    p.grad_strides[t] = head_strides(grads[t]);
    p.grad_vectorized[t] = is_vectorizable(p.grad[t], p.grad_strides[t], g.head_dim, grads[t].element_size());
    p.out[t] = grad_in[t].mutable_data_ptr();
  }
  p.weight_partials = weighted ? partials.mutable_data_ptr<float>() : nullptr;
  cudaStream_t stream = current_cuda_stream(q.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(q.scalar_type(), "qkv_norm_rope_backward_cuda", [&] {
    launch_backward<scalar_t>(p, static_cast<unsigned>(blocks), stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  if (!weighted) return {grad_in[0], grad_in[1], grad_in[2], grad_q_weight, grad_k_weight};
  const unsigned reduce_blocks = static_cast<unsigned>(ceil_div(kNumWeights * g.head_dim, kReduceColumns));
  VITOPS_LAUNCH(reduce_blocks, kReduceColumns * kReduceGroups, 0, stream, reduce_weight_grads_kernel)(
      partials.const_data_ptr<float>(), blocks, g.head_dim, grad_q_weight.mutable_data_ptr(), g.weight_kind[0],
      grad_k_weight.mutable_data_ptr(), g.weight_kind[1]);
  VITOPS_CUDA_CHECK_LAUNCH();
  return {grad_in[0], grad_in[1], grad_in[2], grad_q_weight, grad_k_weight};
}

}  // namespace
}  // namespace vitops::qkv_norm_rope

VITOPS_CUDA_KERNELS(m) {
  m.impl("qkv_norm_rope", TORCH_BOX(&vitops::qkv_norm_rope::qkv_norm_rope_cuda));
  m.impl("_qkv_norm_rope_backward", TORCH_BOX(&vitops::qkv_norm_rope::qkv_norm_rope_backward_cuda));
}

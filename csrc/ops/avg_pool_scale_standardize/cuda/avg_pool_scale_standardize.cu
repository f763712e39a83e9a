// avg_pool_scale_standardize on CUDA: one launch, no atomics, no host synchronisation.
//
// A block owns (image b, a chunk of kSlotsPerBlock output slots, a chunk of blockDim channels):
//   1. it reduces image b's grid width (max x + 1) over the image's positions;
//   2. every warp scans the patches in order, 32 at a time: each lane computes one patch's slot and
//      a warp ballot lists, in patch order, the patches whose slot falls in the block's chunk; each
//      thread adds x[b, patch, its channel] / k^2 to its own shared-memory column (no sharing, so
//      no atomics, and every slot is summed in patch order: deterministic);
//   3. the epilogue rounds the pooled sums to x's dtype (HF), scales and standardizes in float32.
// Bad positions (negative non-padding coordinates, slots past `length`) are skipped: checking them
// would need a host synchronisation; the CPU kernel reports them.
#include "../avg_pool_scale_standardize.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::avg_pool_scale_standardize {
namespace {

using rope_math::load_as;
using rope_math::round_to;

constexpr int kWarpSize = 32;
constexpr int kSlotsPerBlock = 32;
constexpr int kForwardThreads = 128;  // channels per block
constexpr int kBackwardThreads = 256;
constexpr int kPatchesPerBackwardBlock = 32;

struct Params {
  const void* x;  // forward: x [B, L, D]; backward: grad_output [B, length, D]
  int64_t x_strides[3];
  const void* positions;
  int64_t position_strides[3];
  const void* bias;
  const void* std_scale;
  ValueKind bias_kind, scale_kind;
  int64_t bias_stride, scale_stride;
  bool standardize;
  void* out;
  bool* mask;
  int64_t batch, seq_len, dim, length, kernel;
  float scale;
};

template <typename index_t>
__device__ __forceinline__ void load_xy(const Params& p, int64_t b, int64_t l, int64_t* px, int64_t* py) {
  const index_t* pos = static_cast<const index_t*>(p.positions);
  const int64_t off = b * p.position_strides[0] + l * p.position_strides[1];
  *px = static_cast<int64_t>(pos[off]);
  *py = static_cast<int64_t>(pos[off + p.position_strides[2]]);
}

// Largest x of image b's non-padding patches (grid width - 1), reduced by the whole block;
// `scratch` holds one value per warp.
template <typename index_t>
__device__ int64_t image_max_x(const Params& p, int64_t b, int64_t* scratch) {
  int64_t max_x = 0;
  for (int64_t l = threadIdx.x; l < p.seq_len; l += blockDim.x) {
    int64_t px, py;
    load_xy<index_t>(p, b, l, &px, &py);
    const int64_t c = width_contribution(px, py);
    max_x = c > max_x ? c : max_x;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, max_x, offset);
    max_x = other > max_x ? other : max_x;
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) scratch[warp] = max_x;
  __syncthreads();
  int64_t result = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) result = scratch[w] > result ? scratch[w] : result;
  return result;  // not + 1: pool_slot takes max x, so INT64_MAX cannot overflow
}

template <typename scalar_t, typename index_t>
__global__ void forward_kernel(const Params p) {
  __shared__ float sums[kSlotsPerBlock][kForwardThreads];
  __shared__ int slot_hit[kSlotsPerBlock];
  __shared__ int64_t width_scratch[kForwardThreads / kWarpSize];
  const int64_t slot_chunks = rope_math::div_round_up(p.length, kSlotsPerBlock);
  const int64_t dim_chunks = rope_math::div_round_up(p.dim, kForwardThreads) > 0 ? rope_math::div_round_up(p.dim, kForwardThreads) : 1;
  int64_t job = blockIdx.x;
  const int64_t dim_chunk = job % dim_chunks;
  job /= dim_chunks;
  const int64_t slot_chunk = job % slot_chunks;
  const int64_t b = job / slot_chunks;
  const int64_t s0 = slot_chunk * kSlotsPerBlock;
  const int64_t d = dim_chunk * kForwardThreads + threadIdx.x;
  const int lane = threadIdx.x % kWarpSize;

  for (int s = 0; s < kSlotsPerBlock; ++s) sums[s][threadIdx.x] = 0.f;  // own column only
  if (threadIdx.x < kSlotsPerBlock) slot_hit[threadIdx.x] = 0;
  const int64_t max_x = image_max_x<index_t>(p, b, width_scratch);  // ends with __syncthreads
  const float inv_k2 = 1.f / static_cast<float>(p.kernel * p.kernel);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + b * p.x_strides[0] + d * p.x_strides[2];

  for (int64_t p0 = 0; p0 < p.seq_len; p0 += kWarpSize) {
    int64_t slot = kPaddingSlot;
    if (p0 + lane < p.seq_len) {
      int64_t px, py;
      load_xy<index_t>(p, b, p0 + lane, &px, &py);
      slot = pool_slot(px, py, p.kernel, max_x, p.length);
    }
    const bool mine = slot >= s0 && slot < s0 + kSlotsPerBlock;
    unsigned pending = __ballot_sync(0xffffffffu, mine);
    while (pending) {  // lowest bit first: patch order
      const int bit = __ffs(pending) - 1;
      pending &= pending - 1;
      const int local = static_cast<int>(__shfl_sync(0xffffffffu, slot, bit) - s0);
      if (d < p.dim) sums[local][threadIdx.x] += __fmul_rn(static_cast<float>(x[(p0 + bit) * p.x_strides[1]]), inv_k2);
      if (threadIdx.x == 0) slot_hit[local] = 1;
    }
  }
  __syncthreads();  // slot_hit

  const int64_t slots_here = p.length - s0 < kSlotsPerBlock ? p.length - s0 : kSlotsPerBlock;
  if (d < p.dim) {
    float bias = 0.f, std_scale = 1.f;
    if (p.standardize) {
      bias = load_as<float>(p.bias, p.bias_kind, d * p.bias_stride);
      std_scale = load_as<float>(p.std_scale, p.scale_kind, d * p.scale_stride);
    }
    scalar_t* out = static_cast<scalar_t*>(p.out) + (b * p.length + s0) * p.dim + d;
    for (int64_t s = 0; s < slots_here; ++s) {
      // separate roundings, like the unfused float32 torch ops of the reference
      float y = __fmul_rn(round_to<scalar_t>(sums[s][threadIdx.x]), p.scale);
      if (p.standardize) y = __fmul_rn(y - bias, std_scale);
      out[s * p.dim] = static_cast<scalar_t>(y);
    }
  }
  if (dim_chunk == 0 && threadIdx.x < slots_here) p.mask[b * p.length + s0 + threadIdx.x] = slot_hit[threadIdx.x] != 0;
}

template <typename scalar_t, typename index_t>
__global__ void backward_kernel(const Params p) {
  __shared__ int64_t width_scratch[kBackwardThreads / kWarpSize];
  __shared__ int64_t slots[kPatchesPerBackwardBlock];
  const int64_t tiles = rope_math::div_round_up(p.seq_len, kPatchesPerBackwardBlock);
  const int64_t b = blockIdx.x / tiles;
  const int64_t l0 = (blockIdx.x % tiles) * kPatchesPerBackwardBlock;
  const int64_t max_x = image_max_x<index_t>(p, b, width_scratch);
  if (threadIdx.x < kPatchesPerBackwardBlock) {
    int64_t slot = kPaddingSlot;
    if (l0 + threadIdx.x < p.seq_len) {
      int64_t px, py;
      load_xy<index_t>(p, b, l0 + threadIdx.x, &px, &py);
      slot = pool_slot(px, py, p.kernel, max_x, p.length);
    }
    slots[threadIdx.x] = slot;
  }
  __syncthreads();
  const int64_t patches = p.seq_len - l0 < kPatchesPerBackwardBlock ? p.seq_len - l0 : kPatchesPerBackwardBlock;
  const float inv_k2 = 1.f / static_cast<float>(p.kernel * p.kernel);
  const scalar_t* grad = static_cast<const scalar_t*>(p.x);
  scalar_t* out = static_cast<scalar_t*>(p.out) + (b * p.seq_len + l0) * p.dim;
  for (int64_t idx = threadIdx.x; idx < patches * p.dim; idx += blockDim.x) {
    const int64_t i = idx / p.dim, d = idx - i * p.dim;
    const int64_t slot = slots[i];
    float g = 0.f;
    if (slot >= 0) {
      g = static_cast<float>(grad[b * p.x_strides[0] + slot * p.x_strides[1] + d * p.x_strides[2]]);
      if (p.standardize) g = __fmul_rn(g, load_as<float>(p.std_scale, p.scale_kind, d * p.scale_stride));
      g = __fmul_rn(__fmul_rn(g, p.scale), inv_k2);
    }
    out[idx] = static_cast<scalar_t>(g);
  }
}

// Kernel launch for one storage dtype; the position dtype is dispatched here (a function, not a
// dispatch macro, because template argument lists and launch configurations contain commas).
template <typename scalar_t>
void launch(const Params& p, ScalarType index_type, bool forward, int64_t blocks, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(blocks);
  if (index_type == ScalarType::Int) {
    if (forward) {
      VITOPS_LAUNCH(grid, kForwardThreads, 0, stream, forward_kernel<scalar_t, int32_t>)(p);
    } else {
      VITOPS_LAUNCH(grid, kBackwardThreads, 0, stream, backward_kernel<scalar_t, int32_t>)(p);
    }
  } else if (forward) {
    VITOPS_LAUNCH(grid, kForwardThreads, 0, stream, forward_kernel<scalar_t, int64_t>)(p);
  } else {
    VITOPS_LAUNCH(grid, kBackwardThreads, 0, stream, backward_kernel<scalar_t, int64_t>)(p);
  }
}

Params make_params(const Geometry& g, const Tensor& x, const Tensor& positions_xy, double scale) {
  Params p{};
  p.x = x.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.x_strides[i] = g.x_strides[i];
    p.position_strides[i] = g.position_strides[i];
  }
  p.positions = positions_xy.const_data_ptr();
  p.bias_kind = g.bias_kind;
  p.scale_kind = g.scale_kind;
  p.bias_stride = g.bias_stride;
  p.scale_stride = g.scale_stride;
  p.standardize = g.standardize;
  p.batch = g.batch;
  p.seq_len = g.seq_len;
  p.dim = g.dim;
  p.length = g.length;
  p.kernel = g.kernel;
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<Tensor, Tensor> avg_pool_scale_standardize_cuda(const Tensor& x, const Tensor& positions_xy,
                                                           int64_t length, double scale,
                                                           const std::optional<Tensor>& std_bias,
                                                           const std::optional<Tensor>& std_scale) {
  const char* op = "avg_pool_scale_standardize";
  const Geometry g = check_forward(op, x, positions_xy, length, std_bias, std_scale, /*allow_double=*/false);
  CudaDeviceGuard guard(x.get_device());
  Tensor out = new_empty(x, {g.batch, length, g.dim}, x.scalar_type());
  Tensor mask = new_empty(x, {g.batch, length}, ScalarType::Bool);
  if (mask.numel() == 0) return {out, mask};
  Params p = make_params(g, x, positions_xy, scale);
  if (g.standardize) {
    p.bias = std_bias->const_data_ptr();
    p.std_scale = std_scale->const_data_ptr();
  }
  p.out = out.mutable_data_ptr();
  p.mask = mask.mutable_data_ptr<bool>();
  // D == 0 still needs the mask: one (empty) channel chunk per slot chunk.
  const int64_t blocks = g.batch * rope_math::div_round_up(length, kSlotsPerBlock) * std::max<int64_t>(1, rope_math::div_round_up(g.dim, kForwardThreads));
  VITOPS_CHECK(blocks <= 0x7fffffffLL, "vitops.", op, ": `x` is too large for one launch: ", shape_str(x));
  cudaStream_t stream = current_cuda_stream(x.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "avg_pool_scale_standardize_cuda", [&] {
    launch<scalar_t>(p, positions_xy.scalar_type(), /*forward=*/true, blocks, stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return {out, mask};
}

Tensor avg_pool_scale_standardize_backward_cuda(const Tensor& grad_output, const Tensor& positions_xy, int64_t length,
                                                int64_t seq_len, double scale, const std::optional<Tensor>& std_scale) {
  const char* op = "_avg_pool_scale_standardize_backward";
  const Geometry g = check_backward(op, grad_output, positions_xy, length, seq_len, std_scale, /*allow_double=*/false);
  CudaDeviceGuard guard(grad_output.get_device());
  Tensor grad_x = new_empty(grad_output, {g.batch, seq_len, g.dim}, grad_output.scalar_type());
  if (grad_x.numel() == 0) return grad_x;
  Params p = make_params(g, grad_output, positions_xy, scale);
  if (g.standardize) p.std_scale = std_scale->const_data_ptr();
  p.out = grad_x.mutable_data_ptr();
  const int64_t blocks = g.batch * rope_math::div_round_up(seq_len, kPatchesPerBackwardBlock);
  VITOPS_CHECK(blocks <= 0x7fffffffLL, "vitops.", op, ": `grad_output` is too large for one launch");
  cudaStream_t stream = current_cuda_stream(grad_output.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad_output.scalar_type(), "avg_pool_scale_standardize_backward_cuda", [&] {
    launch<scalar_t>(p, positions_xy.scalar_type(), /*forward=*/false, blocks, stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return grad_x;
}

}  // namespace
}  // namespace vitops::avg_pool_scale_standardize

VITOPS_CUDA_KERNELS(m) {
  m.impl("avg_pool_scale_standardize",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_cuda));
  m.impl("_avg_pool_scale_standardize_backward",
         TORCH_BOX(&vitops::avg_pool_scale_standardize::avg_pool_scale_standardize_backward_cuda));
}

// moe_route on CUDA, five small launches and no host synchronisation:
//   1. one warp per token: the top expert (warp argmax, first maximum) and the rounded score;
//   2. one thread per chunk of kTokensPerChunk tokens: the chunk's count per expert;
//   3. one block: bucket ends (expert_ends) and every chunk's first row per expert, in fixed order;
//   4. one thread per chunk: its tokens' rows, in token order (stable);
//   5. the scaled rows, one block row per bucketed row.
// Integer counts only and a fixed chunking, so the bucketing is the same on every run; no atomics.
// The backward: one warp per token (its gradient row, the dot product for the router logit).
#include "../moe_route.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::moe {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kChunkThreads = 128;
constexpr int kRowThreads = 128;
constexpr int kScanThreads = 256;

__device__ __forceinline__ void warp_top(float& value, int64_t& index) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(0xffffffffu, value, offset);
    const int64_t i = __shfl_xor_sync(0xffffffffu, index, offset);
    if (ranks_above(v, i, value, index)) {
      value = v;
      index = i;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The warp's top expert of token t (every lane gets it). Lanes start from the invalid index
// INT64_MAX with -inf, which any real logit (or NaN) outranks or ties at a lower index.
__device__ __forceinline__ int64_t warp_top_expert(const void* logits, ValueKind kind, int64_t t, int64_t experts,
                                                   int lane) {
  float best = -INFINITY;
  int64_t index = INT64_MAX;
  for (int64_t e = lane; e < experts; e += kWarpSize) {
    const float v = load_as<float>(logits, kind, t * experts + e);
    if (ranks_above(v, e, best, index)) {
      best = v;
      index = e;
    }
  }
  warp_top(best, index);
  return index;
}

template <typename scalar_t>
__global__ void top_expert_kernel(const void* logits, ValueKind kind, int64_t tokens, int64_t experts,
                                  int32_t* expert, scalar_t* scores) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; t < tokens;
       t += warps) {
    const int64_t e = warp_top_expert(logits, kind, t, experts, lane);
    if (lane == 0) {
      expert[t] = static_cast<int32_t>(e);
      scores[t] = static_cast<scalar_t>(sigmoid<float>(load_as<float>(logits, kind, t * experts + e)));
    }
  }
}

// counts[c, e]: tokens of chunk c choosing expert e.
__global__ void chunk_count_kernel(const int32_t* expert, int64_t tokens, int64_t experts, int64_t chunks,
                                   int64_t* counts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  int64_t* row = counts + c * experts;
  for (int64_t e = 0; e < experts; ++e) row[e] = 0;
  const int64_t end = (c + 1) * kTokensPerChunk < tokens ? (c + 1) * kTokensPerChunk : tokens;
  for (int64_t t = c * kTokensPerChunk; t < end; ++t) ++row[expert[t]];
}

// One block: totals[e] = sum over chunks, ends = their inclusive scan (expert_ends), then counts[c, e]
// becomes the first row of chunk c's tokens of expert e.
__global__ void bucket_offsets_kernel(int64_t* counts, int64_t experts, int64_t chunks, int64_t* totals,
                                      int32_t* expert_ends) {
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += counts[c * experts + e];
    totals[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t running = 0;
    for (int64_t e = 0; e < experts; ++e) {
      running += totals[e];
      expert_ends[e] = static_cast<int32_t>(running);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t next = static_cast<int64_t>(expert_ends[e]) - totals[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = counts[c * experts + e];
      counts[c * experts + e] = next;
      next += count;
    }
  }
}

__global__ void assign_rows_kernel(const int32_t* expert, int64_t tokens, int64_t experts, int64_t chunks,
                                   int64_t* next, int64_t* order, int64_t* slot) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  int64_t* row = next + c * experts;
  const int64_t end = (c + 1) * kTokensPerChunk < tokens ? (c + 1) * kTokensPerChunk : tokens;
  for (int64_t t = c * kTokensPerChunk; t < end; ++t) {
    const int64_t j = row[expert[t]]++;
    order[j] = t;
    slot[t] = j;
  }
}

template <typename scalar_t>
__global__ void scaled_rows_kernel(const scalar_t* x, const scalar_t* scores, const int64_t* order, int64_t tokens,
                                   int64_t hidden, scalar_t* routed) {
  for (int64_t j = blockIdx.x; j < tokens; j += gridDim.x) {
    const int64_t t = order[j];
    const float score = static_cast<float>(scores[t]);
    const scalar_t* src = x + t * hidden;
    scalar_t* dst = routed + j * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
      dst[c] = static_cast<scalar_t>(static_cast<float>(src[c]) * score);
  }
}

// One warp per token: grad_x[t] = grad_routed[slot t] * score, and the selected logit's gradient
// sigmoid'(logit) * (grad_routed[slot t] . x[t] + grad_scores[t]); the other logits get 0. A slot
// out of [0, N) (a caller's bad token_slot) gives NaN rows rather than an out-of-bounds read.
template <typename scalar_t>
__global__ void route_backward_kernel(const scalar_t* grad, const scalar_t* grad_scores, const scalar_t* x,
                                      const void* logits, ValueKind kind, const int64_t* slot, int64_t tokens,
                                      int64_t hidden, int64_t experts, scalar_t* grad_x, void* grad_logits) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; t < tokens;
       t += warps) {
    const int64_t e_top = warp_top_expert(logits, kind, t, experts, lane);
    const float s = sigmoid<float>(load_as<float>(logits, kind, t * experts + e_top));
    const float score = static_cast<float>(static_cast<scalar_t>(s));
    const int64_t j = slot[t];
    const bool valid = j >= 0 && j < tokens;
    float dot = 0.f;
    for (int64_t c = lane; c < hidden; c += kWarpSize) {
      const float g = valid ? static_cast<float>(grad[j * hidden + c]) : NAN;
      grad_x[t * hidden + c] = static_cast<scalar_t>(g * score);
      dot += g * static_cast<float>(x[t * hidden + c]);
    }
    dot = warp_sum(dot);
    if (grad_scores != nullptr) dot += static_cast<float>(grad_scores[t]);
    for (int64_t e = lane; e < experts; e += kWarpSize)
      store_as<float>(grad_logits, kind, t * experts + e, e == e_top ? sigmoid_backward<float>(dot, s) : 0.f);
  }
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, per_block), 65535)));
}

// Launch helpers (kept out of the dispatch macros: launch configurations contain commas).
template <typename scalar_t>
void launch_top_expert(const Tensor& logits, const RouteGeometry& g, Tensor& expert, Tensor& scores,
                       cudaStream_t stream) {
  VITOPS_LAUNCH(grid_for(g.tokens, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0, stream, top_expert_kernel<scalar_t>)(
      logits.const_data_ptr(), g.logit_kind, g.tokens, g.experts, expert.mutable_data_ptr<int32_t>(),
      scores.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void launch_scaled_rows(const Tensor& x, const Tensor& scores, const Tensor& order, const RouteGeometry& g,
                        Tensor& routed, cudaStream_t stream) {
  VITOPS_LAUNCH(grid_for(g.tokens, 1), kRowThreads, 0, stream, scaled_rows_kernel<scalar_t>)(
      x.const_data_ptr<scalar_t>(), scores.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), g.tokens,
      g.hidden, routed.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void launch_route_backward(const Tensor& grad, const std::optional<Tensor>& grad_scores, const Tensor& x,
                           const Tensor& logits, const Tensor& slot, const RouteGeometry& g, Tensor& grad_x,
                           Tensor& grad_logits, cudaStream_t stream) {
  VITOPS_LAUNCH(grid_for(g.tokens, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0, stream,
                route_backward_kernel<scalar_t>)(
      grad.const_data_ptr<scalar_t>(), grad_scores.has_value() ? grad_scores->const_data_ptr<scalar_t>() : nullptr,
      x.const_data_ptr<scalar_t>(), logits.const_data_ptr(), g.logit_kind, slot.const_data_ptr<int64_t>(), g.tokens,
      g.hidden, g.experts, grad_x.mutable_data_ptr<scalar_t>(), grad_logits.mutable_data_ptr());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_route_cuda(const Tensor& x_arg, const Tensor& logits_arg) {
  const char* op = "moe_route";
  const RouteGeometry g = check_route(op, x_arg, logits_arg, /*allow_double=*/false);
  CudaDeviceGuard guard(x_arg.get_device());
  const Tensor x = as_contiguous(x_arg), logits = as_contiguous(logits_arg);
  const int64_t n = g.tokens, h = g.hidden, e_count = g.experts;
  RouteOutputs out = allocate_route(x, g);
  Tensor &routed = out.routed, &scores = out.scores, &order = out.token_order, &slot = out.token_slot;
  Tensor& ends = out.expert_ends;
  const int64_t chunks = ceil_div(n, kTokensPerChunk);
  Tensor expert = new_empty(x, {n}, ScalarType::Int);
  Tensor counts = new_empty(x, {checked_mul(op, "the chunk counts", chunks, e_count)}, ScalarType::Long);
  Tensor totals = new_empty(x, {e_count}, ScalarType::Long);
  cudaStream_t stream = current_cuda_stream(x.get_device());
  if (n > 0) {
    VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "moe_route_cuda",
                                  [&] { launch_top_expert<scalar_t>(logits, g, expert, scores, stream); });
    VITOPS_CUDA_CHECK_LAUNCH();
    VITOPS_LAUNCH(grid_for(chunks, kChunkThreads), kChunkThreads, 0, stream, chunk_count_kernel)(
        expert.const_data_ptr<int32_t>(), n, e_count, chunks, counts.mutable_data_ptr<int64_t>());
    VITOPS_CUDA_CHECK_LAUNCH();
  }
  // also with no tokens: expert_ends must be written (all zeros)
  VITOPS_LAUNCH(1, kScanThreads, 0, stream, bucket_offsets_kernel)(counts.mutable_data_ptr<int64_t>(), e_count,
                                                                   chunks, totals.mutable_data_ptr<int64_t>(),
                                                                   ends.mutable_data_ptr<int32_t>());
  VITOPS_CUDA_CHECK_LAUNCH();
  if (n == 0) return out.as_tuple();
  VITOPS_LAUNCH(grid_for(chunks, kChunkThreads), kChunkThreads, 0, stream, assign_rows_kernel)(
      expert.const_data_ptr<int32_t>(), n, e_count, chunks, counts.mutable_data_ptr<int64_t>(),
      order.mutable_data_ptr<int64_t>(), slot.mutable_data_ptr<int64_t>());
  VITOPS_CUDA_CHECK_LAUNCH();
  if (h > 0) {
    VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "moe_route_rows_cuda",
                                  [&] { launch_scaled_rows<scalar_t>(x, scores, order, g, routed, stream); });
    VITOPS_CUDA_CHECK_LAUNCH();
  }
  return out.as_tuple();
}

std::tuple<Tensor, Tensor> moe_route_backward_cuda(const Tensor& grad_arg, const std::optional<Tensor>& grad_scores_arg,
                                                    const Tensor& x_arg, const Tensor& logits_arg,
                                                    const Tensor& slot_arg) {
  const char* op = "_moe_route_backward";
  const RouteGeometry g = check_route(op, x_arg, logits_arg, /*allow_double=*/false);
  check_route_backward(op, g, grad_arg, grad_scores_arg, x_arg, slot_arg);
  CudaDeviceGuard guard(x_arg.get_device());
  const int64_t n = g.tokens, h = g.hidden, e_count = g.experts;
  const Tensor x = as_contiguous(x_arg), logits = as_contiguous(logits_arg), grad = as_contiguous(grad_arg);
  const Tensor slot = as_contiguous(slot_arg);
  std::optional<Tensor> grad_scores;
  if (grad_scores_arg.has_value()) grad_scores = as_contiguous(*grad_scores_arg);
  Tensor grad_x = new_empty(x, {n, h}, x.scalar_type());
  Tensor grad_logits = new_empty(x, {n, e_count}, logits.scalar_type());
  if (n == 0) return {grad_x, grad_logits};
  cudaStream_t stream = current_cuda_stream(x.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "moe_route_backward_cuda", [&] {
    launch_route_backward<scalar_t>(grad, grad_scores, x, logits, slot, g, grad_x, grad_logits, stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return {grad_x, grad_logits};
}

}  // namespace
}  // namespace vitops::moe

VITOPS_CUDA_KERNELS(m) {
  m.impl("moe_route", TORCH_BOX(&vitops::moe::moe_route_cuda));
  m.impl("_moe_route_backward", TORCH_BOX(&vitops::moe::moe_route_backward_cuda));
}

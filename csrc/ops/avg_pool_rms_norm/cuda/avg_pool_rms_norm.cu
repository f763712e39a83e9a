// avg_pool_rms_norm on CUDA: one block per (image, output token) row. Each thread owns the
// columns d = tid, tid + blockDim, ...: it sums its columns over the k x k window in row-major order
// (AvgPool2d's order, as the CPU kernel), divides by k² and rounds to x's dtype into shared memory;
// the row's sum of squares is a fixed shared-memory tree (deterministic; its order differs from the
// CPU kernel's, so the two agree to rounding). Backward: the same block shape recomputes the row,
// writes the window's gradient, and leaves float32 weight-gradient partials per row that a second
// kernel sums over rows in order. No atomics, no host synchronisation.
#include "../avg_pool_rms_norm.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::avg_pool_rms_norm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxDim = 8192;  // the pooled row lives in shared memory (32 KiB of float32)

struct Params {
  const void* x;
  int64_t xs_b, xs_l;
  const void* grad;  // backward only
  int64_t gs_b, gs_s;
  void* out;         // forward output [B, length, D] / backward grad_x [B, L, D]
  float* partials;   // backward: [B * length, D] weight-gradient terms, or null
  const void* weight;
  ValueKind weight_kind;
  int64_t weight_stride;
  int64_t dim, length, side, out_side, kernel, seq_len;
  norm::Kind norm;
  float eps;
};

// Sum of v over the block (a fixed tree: deterministic). Every thread must call it.
__device__ float block_sum(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) scratch[threadIdx.x] += scratch[threadIdx.x + width];
    __syncthreads();
  }
  const float total = scratch[0];
  __syncthreads();
  return total;
}

template <typename scalar_t>
__device__ void pooled_row(const Params& p, int64_t b, int64_t s, float* pooled) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t k = p.kernel, r0 = (s / p.out_side) * k, c0 = (s % p.out_side) * k;
  const float count = static_cast<float>(k * k);
  for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
    float sum = 0.f;
    for (int64_t r = r0; r < r0 + k; ++r)
      for (int64_t c = c0; c < c0 + k; ++c) sum = __fadd_rn(sum, static_cast<float>(x[b * p.xs_b + (r * p.side + c) * p.xs_l + d]));
    pooled[d] = round_to<scalar_t>(__fdiv_rn(sum, count));
  }
  __syncthreads();
}

__device__ float weight_factor_of(const Params& p, int64_t d) {
  return norm::weight_factor(p.norm, load_as<float>(p.weight, p.weight_kind, d * p.weight_stride));
}

template <typename scalar_t>
__global__ void forward_kernel(Params p) {
  VITOPS_DYNAMIC_SHARED(float, pooled);
  __shared__ float scratch[kThreads];
  const int64_t row = blockIdx.x, b = row / p.length, s = row % p.length;
  pooled_row<scalar_t>(p, b, s, pooled);
  scalar_t* out = static_cast<scalar_t*>(p.out) + row * p.dim;
  if (!norm::normalizes(p.norm)) {
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) out[d] = static_cast<scalar_t>(pooled[d]);
    return;
  }
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) ss = __fadd_rn(ss, __fmul_rn(pooled[d], pooled[d]));
  const float r = norm::inverse_rms(block_sum(ss, scratch), p.dim, p.eps);
  const bool weighted = norm::has_weight(p.norm);
  for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
    const float u = __fmul_rn(pooled[d], r);
    out[d] = static_cast<scalar_t>(weighted ? __fmul_rn(u, weight_factor_of(p, d)) : u);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(Params p) {
  VITOPS_DYNAMIC_SHARED(float, pooled);  // [D] pooled row, then [D] its gradient
  __shared__ float scratch[kThreads];
  const int64_t row = blockIdx.x, b = row / p.length, s = row % p.length;
  const scalar_t* gy = static_cast<const scalar_t*>(p.grad) + b * p.gs_b + s * p.gs_s;
  float* gpool = pooled + p.dim;
  if (!norm::normalizes(p.norm)) {
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) gpool[d] = static_cast<float>(gy[d]);
  } else {
    pooled_row<scalar_t>(p, b, s, pooled);
    float ss = 0.f;
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) ss = __fadd_rn(ss, __fmul_rn(pooled[d], pooled[d]));
    const float r = norm::inverse_rms(block_sum(ss, scratch), p.dim, p.eps);
    const bool weighted = norm::has_weight(p.norm);
    float dot = 0.f;
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
      const float u = __fmul_rn(pooled[d], r), g = static_cast<float>(gy[d]);
      if (weighted) p.partials[row * p.dim + d] = __fmul_rn(g, u);
      const float gu = weighted ? __fmul_rn(g, weight_factor_of(p, d)) : g;
      gpool[d] = gu;
      dot = __fadd_rn(dot, __fmul_rn(gu, u));
    }
    const float mean_dot = __fdiv_rn(block_sum(dot, scratch), static_cast<float>(p.dim));
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
      const float u = __fmul_rn(pooled[d], r);
      gpool[d] = __fmul_rn(r, __fsub_rn(gpool[d], __fmul_rn(u, mean_dot)));
    }
  }
  __syncthreads();
  scalar_t* gx = static_cast<scalar_t*>(p.out);
  const int64_t k = p.kernel, r0 = (s / p.out_side) * k, c0 = (s % p.out_side) * k;
  const float count = static_cast<float>(k * k);
  for (int64_t r = r0; r < r0 + k; ++r)
    for (int64_t c = c0; c < c0 + k; ++c) {
      scalar_t* dst = gx + (b * p.seq_len + r * p.side + c) * p.dim;
      for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) dst[d] = static_cast<scalar_t>(__fdiv_rn(gpool[d], count));
    }
}

// grad_weight[d] = sum over rows of partials[row, d], rows in order (deterministic).
__global__ void reduce_weight_kernel(const float* partials, int64_t rows, int64_t dim, void* out, ValueKind kind) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= dim) return;
  float sum = 0.f;
  for (int64_t r = 0; r < rows; ++r) sum = __fadd_rn(sum, partials[r * dim + d]);
  store_as<float>(out, kind, d, sum);
}

Params make_params(const Tensor& x, const Geometry& g, const std::optional<Tensor>& weight, double eps) {
  Params p{};
  p.x = x.const_data_ptr();
  p.xs_b = x.stride(0);
  p.xs_l = x.stride(1);
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.weight_kind = g.weight_kind;
  p.weight_stride = g.weight_stride;
  p.dim = g.dim;
  p.length = g.length;
  p.side = g.side;
  p.out_side = g.out_side;
  p.kernel = g.kernel;
  p.seq_len = g.seq_len;
  p.norm = g.norm;
  p.eps = static_cast<float>(eps);
  return p;
}

void check_cuda_limits(const char* op, const Geometry& g) {
  VITOPS_CHECK(g.dim <= kMaxDim, "vitops.", op, ": the CUDA kernel supports D up to ", kMaxDim, ", got ", g.dim);
  VITOPS_CHECK(g.batch * g.length <= 0x7fffffffLL, "vitops.", op, ": B * length (", g.batch * g.length,
               ") exceeds the CUDA grid limit 2^31 - 1");
}

template <typename scalar_t>
void launch_forward(const Params& p, unsigned blocks, size_t smem, cudaStream_t stream) {
  VITOPS_LAUNCH(blocks, kThreads, smem, stream, forward_kernel<scalar_t>)(p);
}

template <typename scalar_t>
void launch_backward(const Params& p, unsigned blocks, size_t smem, cudaStream_t stream) {
  VITOPS_LAUNCH(blocks, kThreads, smem, stream, backward_kernel<scalar_t>)(p);
}

Tensor avg_pool_rms_norm_cuda(const Tensor& x_in, int64_t length, const std::optional<Tensor>& weight, double eps,
                              std::string norm_name) {
  const char* op = "avg_pool_rms_norm";
  const Geometry g = check_inputs(op, x_in, length, weight, eps, norm_name, /*allow_double=*/false);
  check_cuda_limits(op, g);
  CudaDeviceGuard guard(x_in.get_device());
  Tensor out = new_empty(x_in, {g.batch, g.length, g.dim}, x_in.scalar_type());
  if (out.numel() == 0) return out;
  const Tensor x = x_in.stride(2) == 1 ? x_in : torch::stable::contiguous(x_in);
  Params p = make_params(x, g, weight, eps);
  p.out = out.mutable_data_ptr();
  cudaStream_t stream = current_cuda_stream(x.get_device());
  const unsigned blocks = static_cast<unsigned>(g.batch * g.length);
  VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "avg_pool_rms_norm_cuda", [&] {
    launch_forward<scalar_t>(p, blocks, sizeof(float) * g.dim, stream);
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

std::tuple<Tensor, Tensor> avg_pool_rms_norm_backward_cuda(const Tensor& grad_in, const Tensor& x_in, int64_t length,
                                                           const std::optional<Tensor>& weight, double eps,
                                                           std::string norm_name) {
  const char* op = "_avg_pool_rms_norm_backward";
  const Geometry g = check_inputs(op, x_in, length, weight, eps, norm_name, /*allow_double=*/false);
  check_grad_output(op, grad_in, x_in, g);
  check_cuda_limits(op, g);
  CudaDeviceGuard guard(x_in.get_device());
  BackwardOutputs grads = allocate_backward(x_in, g, weight);
  Tensor& grad_x = grads.grad_x;
  Tensor& grad_weight = grads.grad_weight;
  const bool weighted = weight.has_value();
  const int64_t rows = g.batch * g.length;
  Tensor partials = new_empty(x_in, {weighted && grad_x.numel() > 0 ? rows : 0, g.dim}, ScalarType::Float);
  cudaStream_t stream = current_cuda_stream(x_in.get_device());
  if (grad_x.numel() > 0) {
    const Tensor x = x_in.stride(2) == 1 ? x_in : torch::stable::contiguous(x_in);
    const Tensor grad = grad_in.stride(2) == 1 ? grad_in : torch::stable::contiguous(grad_in);
    Params p = make_params(x, g, weight, eps);
    p.grad = grad.const_data_ptr();
    p.gs_b = grad.stride(0);
    p.gs_s = grad.stride(1);
    p.out = grad_x.mutable_data_ptr();
    p.partials = weighted ? partials.mutable_data_ptr<float>() : nullptr;
    VITOPS_DISPATCH_CUDA_FLOATING(x.scalar_type(), "avg_pool_rms_norm_backward_cuda", [&] {
      launch_backward<scalar_t>(p, static_cast<unsigned>(rows), 2 * sizeof(float) * g.dim, stream);
    });
    VITOPS_CUDA_CHECK_LAUNCH();
  }
  if (weighted && g.dim > 0) {
    const unsigned blocks = static_cast<unsigned>((g.dim + kThreads - 1) / kThreads);
    VITOPS_LAUNCH(blocks, kThreads, 0, stream, reduce_weight_kernel)(
        partials.const_data_ptr<float>(), grad_x.numel() > 0 ? rows : 0, g.dim, grad_weight.mutable_data_ptr(),
        g.weight_kind);
    VITOPS_CUDA_CHECK_LAUNCH();
  }
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace vitops::avg_pool_rms_norm

VITOPS_CUDA_KERNELS(m) {
  m.impl("avg_pool_rms_norm", TORCH_BOX(&vitops::avg_pool_rms_norm::avg_pool_rms_norm_cuda));
  m.impl("_avg_pool_rms_norm_backward", TORCH_BOX(&vitops::avg_pool_rms_norm::avg_pool_rms_norm_backward_cuda));
}

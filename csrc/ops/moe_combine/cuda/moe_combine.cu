// moe_combine on CUDA: one block row per output row (a gather, each row written once). An index out
// of [0, N) (a caller's bad token_slot / token_order; checking them on the device would need a host
// synchronisation) gives a NaN row rather than an out-of-bounds read.
#include "../moe_combine.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::moe {
namespace {

constexpr int kRowThreads = 128;

template <typename scalar_t>
__global__ void combine_kernel(const scalar_t* shared, const scalar_t* expert_out, const int64_t* slot, int64_t tokens,
                               int64_t hidden, scalar_t* out) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t j = slot[t];
    const bool valid = j >= 0 && j < tokens;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      const float routed = valid ? static_cast<float>(expert_out[j * hidden + c]) : NAN;
      out[t * hidden + c] = static_cast<scalar_t>(static_cast<float>(shared[t * hidden + c]) + routed);
    }
  }
}

template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* grad, const int64_t* order, int64_t tokens, int64_t hidden,
                                   scalar_t* out) {
  for (int64_t j = blockIdx.x; j < tokens; j += gridDim.x) {
    const int64_t t = order[j];
    const bool valid = t >= 0 && t < tokens;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
      out[j * hidden + c] = valid ? grad[t * hidden + c] : static_cast<scalar_t>(NAN);
  }
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535))); }

// Launch helpers (kept out of the dispatch macros: launch configurations contain commas).
template <typename scalar_t>
void launch_combine(const Tensor& shared, const Tensor& expert, const Tensor& slot, const CombineGeometry& g,
                    Tensor& out, cudaStream_t stream) {
  VITOPS_LAUNCH(row_grid(g.tokens), kRowThreads, 0, stream, combine_kernel<scalar_t>)(
      shared.const_data_ptr<scalar_t>(), expert.const_data_ptr<scalar_t>(), slot.const_data_ptr<int64_t>(), g.tokens,
      g.hidden, out.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void launch_gather(const Tensor& grad, const Tensor& order, const CombineGeometry& g, Tensor& out, cudaStream_t stream) {
  VITOPS_LAUNCH(row_grid(g.tokens), kRowThreads, 0, stream, gather_rows_kernel<scalar_t>)(
      grad.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), g.tokens, g.hidden,
      out.mutable_data_ptr<scalar_t>());
}

Tensor moe_combine_cuda(const Tensor& shared_arg, const Tensor& expert_arg, const Tensor& slot_arg,
                        const Tensor& order_arg) {
  const char* op = "moe_combine";
  const CombineGeometry g = check_combine(op, shared_arg, expert_arg, slot_arg, order_arg, /*allow_double=*/false);
  CudaDeviceGuard guard(shared_arg.get_device());
  const Tensor shared = as_contiguous(shared_arg), expert = as_contiguous(expert_arg), slot = as_contiguous(slot_arg);
  Tensor out = new_empty(shared, {g.tokens, g.hidden}, shared.scalar_type());
  if (g.tokens == 0 || g.hidden == 0) return out;
  cudaStream_t stream = current_cuda_stream(shared.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(shared.scalar_type(), "moe_combine_cuda",
                                [&] { launch_combine<scalar_t>(shared, expert, slot, g, out, stream); });
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

Tensor moe_combine_backward_cuda(const Tensor& grad_arg, const Tensor& order_arg) {
  const char* op = "_moe_combine_backward";
  const CombineGeometry g = check_combine_backward(op, grad_arg, order_arg, /*allow_double=*/false);
  CudaDeviceGuard guard(grad_arg.get_device());
  const Tensor grad = as_contiguous(grad_arg), order = as_contiguous(order_arg);
  Tensor out = new_empty(grad, {g.tokens, g.hidden}, grad.scalar_type());
  if (g.tokens == 0 || g.hidden == 0) return out;
  cudaStream_t stream = current_cuda_stream(grad.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(grad.scalar_type(), "moe_combine_backward_cuda",
                                [&] { launch_gather<scalar_t>(grad, order, g, out, stream); });
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace
}  // namespace vitops::moe

VITOPS_CUDA_KERNELS(m) {
  m.impl("moe_combine", TORCH_BOX(&vitops::moe::moe_combine_cuda));
  m.impl("_moe_combine_backward", TORCH_BOX(&vitops::moe::moe_combine_backward_cuda));
}

// posemb_sincos_2d on CUDA: one thread per output element, each evaluating its own angle (the device
// formula of posemb_sincos_2d.h, IEEE powf/sinf/cosf as torch's CUDA kernels use); grid-stride with
// int64 indices. Write-bound: h * w * width elements, two transcendentals each.
#include <algorithm>

#include "../posemb_sincos_2d.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::posemb_sincos_2d {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void table_kernel(scalar_t* __restrict__ out, int64_t total, int64_t w, int64_t channels, int64_t quarter,
                             float temperature) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / channels, c = i - m * channels;
    const int64_t y = m / w, x = m - y * w;
    out[i] = static_cast<scalar_t>(value(x, y, c, quarter, temperature));
  }
}

template <typename scalar_t>
void launch(scalar_t* out, int64_t total, const Geometry& g, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 65535LL * 8);
  VITOPS_LAUNCH((unsigned)blocks, kThreads, 0, stream, table_kernel<scalar_t>)(out, total, g.width, g.channels,
                                                                              g.quarter(), g.temperature);
}

Tensor posemb_sincos_2d_cuda(const Tensor& like, int64_t h, int64_t w, int64_t width, double temperature,
                             std::optional<ScalarType> dtype) {
  const Geometry g = check_inputs("posemb_sincos_2d", like, h, w, width, temperature, dtype, /*allow_double=*/false);
  CudaDeviceGuard guard(like.get_device());
  Tensor out = new_empty(like, {1, g.rows(), g.channels}, g.dtype);
  const int64_t total = out.numel();
  if (total == 0) return out;
  cudaStream_t stream = current_cuda_stream(like.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(g.dtype, "posemb_sincos_2d_cuda",
                                [&] { launch<scalar_t>(out.mutable_data_ptr<scalar_t>(), total, g, stream); });
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace
}  // namespace vitops::posemb_sincos_2d

VITOPS_CUDA_KERNELS(m) {
  m.impl("posemb_sincos_2d", TORCH_BOX(&vitops::posemb_sincos_2d::posemb_sincos_2d_cuda));
}

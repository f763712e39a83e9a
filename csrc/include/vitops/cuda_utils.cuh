// CUDA-side helpers: current stream from torch, device guard, launch checks, and the macros that
// let the same kernel sources also build for the CPU emulator (-DVITOPS_CUDA_EMULATION, see
// vitops/cuda_emulation.h): kernel launches, dynamic shared memory and kernel registration.
#pragma once

#if defined(VITOPS_CUDA_EMULATION)
#include "vitops/cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#endif

#include "vitops/common.h"
#include "vitops/device_math.h"

#if defined(VITOPS_CUDA_EMULATION)
// kernel<<<grid, block, smem, stream>>>(args): the kernel goes last so template commas need no parentheses.
#define VITOPS_LAUNCH(grid, block, smem, stream, ...) VITOPS_EMU_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
// extern __shared__ type name[];
#define VITOPS_DYNAMIC_SHARED(type, name) VITOPS_EMU_DYNAMIC_SHARED(type, name)
// The emulated kernels take CPU tensors and must not replace the real CUDA kernels, so they are the
// CPU implementations of a second namespace with the same schemas (registration.cpp built again).
#define VITOPS_CUDA_KERNELS(m) STABLE_TORCH_LIBRARY_IMPL(vitops_emu, CPU, m)
#else
#define VITOPS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define VITOPS_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define VITOPS_CUDA_KERNELS(m) STABLE_TORCH_LIBRARY_IMPL(vitops, CUDA, m)
#endif

namespace vitops {

#if defined(VITOPS_CUDA_EMULATION)
inline cudaStream_t current_cuda_stream(int32_t) { return nullptr; }

// Emulated kernels run on CPU tensors (device index -1): nothing to switch.
struct CudaDeviceGuard {
  explicit CudaDeviceGuard(int32_t) {}
};
#else
// The stream torch is currently using on `device_index` (never the legacy default stream).
inline cudaStream_t current_cuda_stream(int32_t device_index) {
  void* stream = nullptr;
  auto err = aoti_torch_get_current_cuda_stream(device_index, &stream);
  VITOPS_CHECK(err == AOTI_TORCH_SUCCESS, "vitops: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

using CudaDeviceGuard = torch::stable::accelerator::DeviceGuard;
#endif

#define VITOPS_CUDA_CHECK_LAUNCH()                                                              \
  do {                                                                                          \
    cudaError_t vitops_err_ = cudaGetLastError();                                               \
    VITOPS_CHECK(vitops_err_ == cudaSuccess, "vitops: CUDA kernel launch failed: ",             \
                 cudaGetErrorString(vitops_err_));                                              \
  } while (0)

// Load/store one element of a storage dtype as float (bf16/fp16 via their device conversions).
template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t v) { return static_cast<float>(v); }

}  // namespace vitops

// CUDA kernels cover float32, bfloat16 and float16 (float64 is CPU only, for gradcheck).
#define VITOPS_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                                            \
  THO_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), torch::headeronly::ScalarType::Float,         \
                  torch::headeronly::ScalarType::BFloat16, torch::headeronly::ScalarType::Half)

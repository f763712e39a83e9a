// Emulator control op and self-test kernels with planted bugs (torch.ops.vitops_emu._*), so the
// tests can check that the emulator really exposes what it is meant to catch. Built only into the
// emulator library.
#include "vitops/common.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::emu_selftest {
namespace {

constexpr int kThreads = 64;

// Each thread stores its value into shared memory and reads its neighbour's, once with the barrier
// between the two and once (planted bug) without: without it the neighbour may not have written yet.
__global__ void neighbour_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n, bool with_barrier) {
  __shared__ float tile[kThreads];
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? in[i] : 0.f;
  if (with_barrier) __syncthreads();
  const int other = (threadIdx.x + 1) % kThreads;
  if (i < n) out[i] = tile[other];
}

// Warp sum; threads past n return early (planted bug) though the shuffles name all 32 lanes.
__global__ void early_exit_shuffle_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = in[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[i] = v;
}

// Half of the block waits at one __syncthreads, the other half at another (planted bug).
__global__ void divergent_barrier_kernel(float* __restrict__ out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
    out[threadIdx.x] = 1.f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.f;
  }
}

// Correct warp reduction (control case): every lane reduces, lanes past n contribute zero.
__global__ void warp_sum_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const unsigned votes = __ballot_sync(0xffffffffu, i < n);
  if (i < n) out[i] = v + static_cast<float>(__popc(votes));
}

Tensor float_input(const Tensor& x, const char* op) {
  VITOPS_CHECK(x.scalar_type() == ScalarType::Float && x.dim() == 1, "vitops_emu.", op, ": expects a 1-D float32 tensor");
  return as_contiguous(x);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(n, kThreads))); }

Tensor selftest_race(const Tensor& x, bool with_barrier) {
  const Tensor in = float_input(x, "_selftest_race");
  Tensor out = new_empty(in, {in.size(0)}, ScalarType::Float);
  VITOPS_LAUNCH(blocks_for(in.size(0)), kThreads, 0, nullptr, neighbour_kernel)(
      in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), in.size(0), with_barrier);
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

Tensor selftest_shuffle(const Tensor& x, bool early_exit) {
  const Tensor in = float_input(x, "_selftest_shuffle");
  Tensor out = new_empty(in, {in.size(0)}, ScalarType::Float);
  if (early_exit) {
    VITOPS_LAUNCH(blocks_for(in.size(0)), kThreads, 0, nullptr, early_exit_shuffle_kernel)(
        in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), in.size(0));
  } else {
    VITOPS_LAUNCH(blocks_for(in.size(0)), kThreads, 0, nullptr, warp_sum_kernel)(
        in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), in.size(0));
  }
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

Tensor selftest_divergent_barrier(const Tensor& x) {
  Tensor out = new_empty(x, {kThreads}, ScalarType::Float);
  VITOPS_LAUNCH(1, kThreads, 0, nullptr, divergent_barrier_kernel)(out.mutable_data_ptr<float>());
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

// A launch the hardware rejects (1025 threads per block) must surface as the launcher's error.
Tensor selftest_bad_launch(const Tensor& x) {
  Tensor out = new_empty(x, {1}, ScalarType::Float);
  VITOPS_LAUNCH(1, 1025, 0, nullptr, divergent_barrier_kernel)(out.mutable_data_ptr<float>());
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

int64_t set_schedule(int64_t schedule) {
  const int64_t previous = emu::schedule();
  emu::set_schedule(static_cast<int>(schedule));
  return previous;
}

int64_t get_schedule() { return emu::schedule(); }

}  // namespace
}  // namespace vitops::emu_selftest

STABLE_TORCH_LIBRARY_FRAGMENT(vitops_emu, m) {
  // 0: threads in ascending order between barriers (blocks ascending), 1: descending. Returns the previous one.
  m.def("_set_schedule(int schedule) -> int");
  m.def("_get_schedule() -> int");
  m.def("_selftest_race(Tensor x, bool with_barrier) -> Tensor");
  m.def("_selftest_shuffle(Tensor x, bool early_exit) -> Tensor");
  m.def("_selftest_divergent_barrier(Tensor x) -> Tensor");
  m.def("_selftest_bad_launch(Tensor x) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(vitops_emu, CompositeExplicitAutograd, m) {
  m.impl("_set_schedule", TORCH_BOX(&vitops::emu_selftest::set_schedule));
  m.impl("_get_schedule", TORCH_BOX(&vitops::emu_selftest::get_schedule));
}

STABLE_TORCH_LIBRARY_IMPL(vitops_emu, CPU, m) {
  m.impl("_selftest_race", TORCH_BOX(&vitops::emu_selftest::selftest_race));
  m.impl("_selftest_shuffle", TORCH_BOX(&vitops::emu_selftest::selftest_shuffle));
  m.impl("_selftest_divergent_barrier", TORCH_BOX(&vitops::emu_selftest::selftest_divergent_barrier));
  m.impl("_selftest_bad_launch", TORCH_BOX(&vitops::emu_selftest::selftest_bad_launch));
}

// CUDA execution emulator: lets the .cu kernels and their launchers run on CPU tensors, so they can
// be tested against the references on machines without a GPU (the emulator library, built with
// -DVITOPS_CUDA_EMULATION, registers them in torch.ops.vitops_emu; it is a test tool only).
//
// Model: the blocks of a launch run one after another; the threads of a block run as cooperative
// fibers on the calling OS thread and switch only at barriers (__syncthreads, warp collectives).
// Because a block's threads never run concurrently, `__shared__` can be plain `static` storage.
// A global schedule (0: threads in ascending order between sync points, 1: descending, blocks
// reversed too) makes missing barriers visible as schedule-dependent results. Barrier misuse
// (deadlocks, collectives naming exited lanes, divergent __syncthreads) raises a C++ error.
//
// Included by cuda_utils.cuh instead of <cuda_runtime.h>; no CUDA header is needed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Qualifiers: all code is host code here.
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __grid_constant__
#define __launch_bounds__(...)
// Blocks never overlap (launches are serialised) and a block's threads share one OS thread, so
// per-kernel statics are exactly "one copy per block". They are collected in one section so the
// runtime can fill them with garbage before every block: on hardware, shared memory starts
// undefined, and a kernel that reads it before writing must not see the previous block's values.
// Limitation: GCC (12) drops section attributes on statics of template instantiations, so the
// statics of template kernels are not refilled and keep the previous block's values.
#define __shared__ static __attribute__((section("vitops_emu_shared")))
#define __constant__ static

// ---------------------------------------------------------------------------------------------
// Vector and index types.
// ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

// ---------------------------------------------------------------------------------------------
// Runtime API subset.
// ---------------------------------------------------------------------------------------------
typedef struct vitops_emu_stream* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace vitops::emu {

// State of the emulated thread that is running (valid inside a kernel only).
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local ThreadState* current;

cudaError_t get_last_error();
void set_last_error(cudaError_t err);
const char* error_string(cudaError_t err);

void* dynamic_shared_memory();

void sync_threads(const char* file, int line);
// Warp collectives exchange 8-byte payloads; op selects how results are formed.
enum class WarpOp : int { Sync, Shfl, ShflXor, ShflDown, ShflUp, Ballot, Any, All };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

// Runs grid x block emulated threads of `body` (which calls the kernel with its arguments).
void run_kernel(dim3 grid, dim3 block, size_t shared_bytes, const char* name, void (*body)(void*), void* ctx);

int schedule();
void set_schedule(int schedule);

template <typename... Params>
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  const char* name;
  void (*kernel)(Params...);

  // Arguments are converted to the parameter types and copied once, as cudaLaunchKernel does;
  // every emulated thread then receives its own by-value copy.
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "wrong number of kernel arguments");
    struct Ctx {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> args;
    } ctx{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_kernel(grid, block, shared_bytes, name,
               [](void* p) {
                 auto* c = static_cast<Ctx*>(p);
                 std::apply(c->kernel, c->args);
               },
               &ctx);
  }
};

template <typename... Params>
Launch<Params...> make_launch(dim3 grid, dim3 block, size_t shared_bytes, const char* name,
                              void (*kernel)(Params...)) {
  return Launch<Params...>{grid, block, shared_bytes, name, kernel};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace vitops::emu

#define threadIdx (::vitops::emu::current->thread_idx)
#define blockIdx (::vitops::emu::current->block_idx)
#define blockDim (::vitops::emu::current->block_dim)
#define gridDim (::vitops::emu::current->grid_dim)
constexpr int warpSize = 32;

inline cudaError_t cudaGetLastError() { return ::vitops::emu::get_last_error(); }
inline cudaError_t cudaPeekAtLastError() {
  const cudaError_t e = ::vitops::emu::get_last_error();
  ::vitops::emu::set_last_error(e);
  return e;
}
inline const char* cudaGetErrorString(cudaError_t err) { return ::vitops::emu::error_string(err); }
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// Device functions.
// ---------------------------------------------------------------------------------------------
#define __syncthreads() ::vitops::emu::sync_threads(__FILE__, __LINE__)

inline void vitops_emu_syncwarp(unsigned mask, const char* file, int line) {
  ::vitops::emu::warp_collective(::vitops::emu::WarpOp::Sync, mask, 0, 0, 32, file, line);
}
#define __syncwarp(...) vitops_emu_syncwarp_dispatch(__FILE__, __LINE__, ##__VA_ARGS__)
inline void vitops_emu_syncwarp_dispatch(const char* file, int line, unsigned mask = 0xffffffffu) {
  vitops_emu_syncwarp(mask, file, line);
}

namespace vitops::emu {
template <typename T>
T shfl(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, file, line));
}
}  // namespace vitops::emu

// Source location is recorded so misuse reports point at the call.
#define __shfl_sync(mask, v, ...) \
  ::vitops::emu::shfl(::vitops::emu::WarpOp::Shfl, mask, v, vitops_emu_arg_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, ...) \
  ::vitops::emu::shfl(::vitops::emu::WarpOp::ShflXor, mask, v, vitops_emu_arg_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, ...) \
  ::vitops::emu::shfl(::vitops::emu::WarpOp::ShflDown, mask, v, vitops_emu_arg_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, ...) \
  ::vitops::emu::shfl(::vitops::emu::WarpOp::ShflUp, mask, v, vitops_emu_arg_width(__VA_ARGS__), __FILE__, __LINE__)
// (arg[, width]) -> "arg, width" with width defaulting to the warp size.
#define vitops_emu_arg_width(...) vitops_emu_arg_width_pick(__VA_ARGS__, 32, 0)
#define vitops_emu_arg_width_pick(a, w, ...) (a), (w)

#define __ballot_sync(mask, pred)                                                                              \
  static_cast<unsigned>(::vitops::emu::warp_collective(::vitops::emu::WarpOp::Ballot, mask, (pred) ? 1 : 0, 0, \
                                                       32, __FILE__, __LINE__))
#define __any_sync(mask, pred)                                                                                 \
  static_cast<int>(::vitops::emu::warp_collective(::vitops::emu::WarpOp::Any, mask, (pred) ? 1 : 0, 0, 32,     \
                                                  __FILE__, __LINE__))
#define __all_sync(mask, pred)                                                                                 \
  static_cast<int>(::vitops::emu::warp_collective(::vitops::emu::WarpOp::All, mask, (pred) ? 1 : 0, 0, 32,     \
                                                  __FILE__, __LINE__))

inline unsigned __activemask() { return 0xffffffffu; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Integer atomics (read-modify-write, returning the old value). Emulated threads switch only at
// barriers and blocks run one after another, so a plain update is atomic here; the two schedules
// still order the updates differently, which exposes kernels whose result depends on that order.
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}

inline float __int_as_float(int v) { return ::vitops::emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(static_cast<uint32_t>(::vitops::emu::to_bits(v))); }
inline unsigned __float_as_uint(float v) { return static_cast<uint32_t>(::vitops::emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return ::vitops::emu::from_bits<float>(v); }
// Built with -ffp-contract=off, so these are single IEEE operations as on the device.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

namespace vitops {
// CUDA's overloaded device min/max (the kernels call them unqualified inside namespace vitops).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
}  // namespace vitops

// ---------------------------------------------------------------------------------------------
// Launch, dynamic shared memory, registration.
// ---------------------------------------------------------------------------------------------
#define VITOPS_EMU_LAUNCH(grid, block, smem, stream, ...) \
  ::vitops::emu::make_launch(dim3(grid), dim3(block), static_cast<size_t>(smem), #__VA_ARGS__, &__VA_ARGS__)
#define VITOPS_EMU_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::vitops::emu::dynamic_shared_memory())

// ---------------------------------------------------------------------------------------------
// cub::DeviceRadixSort::SortPairs (the subset factorized_posemb uses): stable LSD sort of the
// keys' bits [begin_bit, end_bit), values carried along. With d_temp_storage == nullptr only the
// temporary size is reported, as cub does.
// ---------------------------------------------------------------------------------------------
namespace cub {
struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, NumItems num_items, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr, bool = false) {
    static_assert(std::is_unsigned_v<Key>, "the emulated SortPairs handles unsigned keys");
    const size_t n = num_items < 0 ? 0 : static_cast<size_t>(num_items);
    const size_t needed = n * (sizeof(Key) + sizeof(Value)) + 1;
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = needed;
      return cudaSuccess;
    }
    if (temp_storage_bytes < needed || begin_bit < 0 || end_bit > int(sizeof(Key) * 8) || begin_bit > end_bit)
      return cudaErrorInvalidValue;
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    auto digits = [&](Key k) -> Key {
      const int bits = end_bit - begin_bit;
      if (bits == 0) return 0;
      const Key shifted = static_cast<Key>(k >> begin_bit);
      return bits >= int(sizeof(Key) * 8) ? shifted : static_cast<Key>(shifted & ((Key(1) << bits) - 1));
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digits(keys_in[a]) < digits(keys_in[b]); });
    // Through temporaries: cub allows keys_in == keys_out only with DoubleBuffer, but be safe.
    std::vector<Key> k(n);
    std::vector<Value> v(n);
    for (size_t i = 0; i < n; ++i) {
      k[i] = keys_in[order[i]];
      v[i] = values_in[order[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};
}  // namespace cub

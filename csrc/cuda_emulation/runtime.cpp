// Runtime of the CUDA execution emulator (see vitops/cuda_emulation.h for the model).
//
// Each emulated thread is a ucontext fiber with its own mmap'd stack (a PROT_NONE guard page below
// it turns a stack overflow into a crash instead of silent corruption). A scheduler context runs
// the block's runnable fibers in schedule order; a fiber runs until it parks at a barrier or
// returns. Barrier bookkeeping happens at arrival, so the scheduler only has to notice the case
// where nothing is runnable but threads are still alive: a deadlock.
#include "vitops/cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define VITOPS_EMU_ASAN 1
#endif

// Bounds of the section holding every `__shared__` variable of this library (set by the linker;
// weak so that a library without any still links).
extern "C" {
extern unsigned char __start_vitops_emu_shared[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_vitops_emu_shared[] __attribute__((weak, visibility("hidden")));
}

namespace vitops::emu {

thread_local ThreadState* current = nullptr;

namespace {

std::atomic<int> g_schedule{0};
// Static shared memory is process-wide, so emulated launches from different OS threads take turns.
std::mutex g_launch_mutex;
thread_local cudaError_t t_last_error = cudaSuccess;

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kWarp = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // the limit without cudaFuncSetAttribute opt-in

enum class State : uint8_t { Runnable, AtSync, AtWarp, Done, Failed };

struct Fiber {
  ThreadState ts;
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack (above the guard page)
  State state = State::Runnable;
  int lane = 0, warp = 0;
  // Pending warp collective of this lane.
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  const char* file = nullptr;
  int line = 0;
#ifdef VITOPS_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  unsigned exists = 0;   // lanes that are threads of the block
  unsigned arrived = 0;  // lanes parked at a collective
  unsigned done = 0;     // lanes that returned
};

struct Block {
  const char* kernel = "";
  uint3 index{};
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, at_sync = 0;
  const char* sync_file = nullptr;
  int sync_line = 0;
  std::string error;
  Fiber* running = nullptr;
  ucontext_t scheduler;
  unsigned char* shared = nullptr;
#ifdef VITOPS_EMU_ASAN
  void* fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
};

thread_local Block* t_block = nullptr;

// Stacks are kept for the life of the OS thread: a launch needs up to 1024 of them.
struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("vitops CUDA emulator: could not map a fiber stack");
      mprotect(p, kGuardBytes, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + kGuardBytes);
    }
    return stacks[i];
  }
  ~StackPool() {
    for (char* s : stacks) munmap(s - kGuardBytes, kStackBytes + kGuardBytes);
  }
};
thread_local StackPool t_stacks;

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string block_name(const Block& b) {
  std::ostringstream os;
  os << "kernel `" << b.kernel << "`, block (" << b.index.x << ", " << b.index.y << ", " << b.index.z << ")";
  return os.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream os;
  os << "thread (" << f.ts.thread_idx.x << ", " << f.ts.thread_idx.y << ", " << f.ts.thread_idx.z << ") [warp "
     << f.warp << " lane " << f.lane << "]";
  return os.str();
}

void switch_to_scheduler(Block& b, Fiber& f, bool dying) {
#ifdef VITOPS_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, b.scheduler_bottom, b.scheduler_size);
#else
  (void)dying;
#endif
  swapcontext(&f.ctx, &b.scheduler);
#ifdef VITOPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.scheduler_bottom, &b.scheduler_size);
#endif
}

void switch_to_fiber(Block& b, Fiber& f) {
  b.running = &f;
  current = &f.ts;
#ifdef VITOPS_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&b.scheduler, &f.ctx);
#ifdef VITOPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.fake_stack, nullptr, nullptr);
#endif
  current = nullptr;
  b.running = nullptr;
}

// Records the first misuse and parks the fiber for good; the scheduler raises it.
[[noreturn]] void fail(Block& b, Fiber& f, const std::string& what) {
  if (b.error.empty()) b.error = "vitops CUDA emulator: " + block_name(b) + ", " + thread_name(f) + ": " + what;
  f.state = State::Failed;
  switch_to_scheduler(b, f, /*dying=*/true);
  std::abort();  // never resumed
}

void release_sync_if_complete(Block& b) {
  if (b.at_sync == 0 || b.at_sync != b.live) return;
  for (Fiber& f : b.fibers)
    if (f.state == State::AtSync) f.state = State::Runnable;
  b.at_sync = 0;
}

Block& active_block(const char* what) {
  if (t_block == nullptr || t_block->running == nullptr)
    throw std::runtime_error(std::string("vitops CUDA emulator: ") + what + " called outside a kernel");
  return *t_block;
}

void fiber_main() {
  Block& b = *t_block;
  Fiber& f = *b.running;
#ifdef VITOPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_bottom, &b.scheduler_size);
#endif
  b.body(b.ctx);
  f.state = State::Done;
  --b.live;
  Warp& w = b.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  w.done |= bit;
  for (int l = 0; l < kWarp; ++l) {
    if (!(w.arrived >> l & 1u)) continue;
    const Fiber& other = b.fibers[static_cast<size_t>(f.warp) * kWarp + l];
    if (other.mask & bit) {
      std::ostringstream os;
      os << "returned while " << thread_name(other) << " waits at a warp collective (" << where(other.file, other.line)
         << ") whose mask 0x" << std::hex << other.mask << " names it";
      fail(b, f, os.str());
    }
  }
  release_sync_if_complete(b);
  switch_to_scheduler(b, f, /*dying=*/true);
  std::abort();
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    default: return "__all_sync";
  }
}

// All lanes of `mask` have arrived: form every lane's result and wake them.
void complete_collective(Block& b, Fiber& self, Warp& w, unsigned mask) {
  Fiber* lanes = &b.fibers[static_cast<size_t>(self.warp) * kWarp];
  uint64_t votes = 0;
  for (int l = 0; l < kWarp; ++l)
    if ((mask >> l & 1u) && lanes[l].value != 0) votes |= uint64_t(1) << l;
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = lanes[l];
    const int width = f.width;
    if ((f.op == WarpOp::Shfl || f.op == WarpOp::ShflXor || f.op == WarpOp::ShflDown || f.op == WarpOp::ShflUp) &&
        (width <= 0 || width > kWarp || (width & (width - 1)) != 0))
      fail(b, self, std::string(op_name(f.op)) + " with a width that is not a power of two <= 32");
    const int start = l & ~(width - 1);
    int src = l;
    switch (f.op) {
      case WarpOp::Shfl: src = start + (((f.arg % width) + width) % width); break;
      case WarpOp::ShflXor: src = l ^ f.arg; break;
      case WarpOp::ShflDown: src = l + f.arg; break;
      case WarpOp::ShflUp: src = l - f.arg; break;
      default: break;
    }
    if (src < start || src >= start + width) src = l;  // out of the segment: own value, as on hardware
    switch (f.op) {
      case WarpOp::Sync: f.result = 0; break;
      case WarpOp::Ballot: f.result = votes; break;
      case WarpOp::Any: f.result = votes != 0; break;
      case WarpOp::All: f.result = votes == mask; break;
      default:
        if (!(mask >> src & 1u)) {
          std::ostringstream os;
          os << op_name(f.op) << " at " << where(f.file, f.line) << " reads lane " << src
             << ", which is not in its mask 0x" << std::hex << mask << " (undefined on hardware)";
          fail(b, self, os.str());
        }
        f.result = lanes[src].value;
    }
    f.state = State::Runnable;
  }
  w.arrived &= ~mask;
}

}  // namespace

cudaError_t get_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

void set_last_error(cudaError_t err) { t_last_error = err; }

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

int schedule() { return g_schedule.load(); }
void set_schedule(int s) {
  if (s != 0 && s != 1) throw std::runtime_error("vitops CUDA emulator: the schedule must be 0 or 1");
  g_schedule.store(s);
}

void* dynamic_shared_memory() { return active_block("dynamic shared memory").shared; }

void sync_threads(const char* file, int line) {
  Block& b = active_block("__syncthreads");
  Fiber& f = *b.running;
  if (b.at_sync == 0) {
    b.sync_file = file;
    b.sync_line = line;
  } else if (line != b.sync_line || std::strcmp(file, b.sync_file) != 0) {
    fail(b, f, "reached __syncthreads at " + where(file, line) + " while other threads wait at the one at " +
                   where(b.sync_file, b.sync_line) + " (divergent barrier)");
  }
  f.state = State::AtSync;
  ++b.at_sync;
  release_sync_if_complete(b);
  switch_to_scheduler(b, f, false);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  Block& b = active_block(op_name(op));
  Fiber& f = *b.running;
  Warp& w = b.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  auto hex = [](unsigned v) {
    std::ostringstream os;
    os << "0x" << std::hex << v;
    return os.str();
  };
  const std::string site = std::string(op_name(op)) + " at " + where(file, line) + " with mask " + hex(mask);
  if (!(mask & bit)) fail(b, f, site + " does not include the calling lane");
  if (mask & ~w.exists) fail(b, f, site + " names lanes that are not threads of the block (" + hex(mask & ~w.exists) + ")");
  if (mask & w.done) fail(b, f, site + " names lanes that have already returned (" + hex(mask & w.done) + ")");
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
  f.state = State::AtWarp;
  w.arrived |= bit;
  Fiber* lanes = &b.fibers[static_cast<size_t>(f.warp) * kWarp];
  bool complete = true;
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u) || !(w.arrived >> l & 1u)) {
      if (mask >> l & 1u) complete = false;
      continue;
    }
    const Fiber& o = lanes[l];
    if (o.mask != mask)
      fail(b, f, site + " meets lane " + std::to_string(l) + " waiting with mask " + hex(o.mask) + " at " +
                     where(o.file, o.line));
    if (o.op != op)
      fail(b, f, site + " meets lane " + std::to_string(l) + " waiting at a different collective (" +
                     op_name(o.op) + " at " + where(o.file, o.line) + ")");
  }
  if (complete) complete_collective(b, f, w, mask);
  // Even the last lane to arrive yields, so the lanes resume in schedule order.
  switch_to_scheduler(b, f, false);
  return f.result;
}

void run_kernel(dim3 grid, dim3 block, size_t shared_bytes, const char* name, void (*body)(void*), void* ctx) {
  if (t_block != nullptr)
    throw std::runtime_error("vitops CUDA emulator: a kernel launched another kernel (not supported)");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  // Launch configuration limits of the hardware, reported like the runtime does (sticky error).
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    t_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (shared_bytes > kMaxDynamicShared) {
    t_last_error = cudaErrorInvalidValue;
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int sched = g_schedule.load();
  unsigned char* static_shared = __start_vitops_emu_shared;
  const size_t static_shared_bytes =
      static_shared ? static_cast<size_t>(__stop_vitops_emu_shared - __start_vitops_emu_shared) : 0;

  Block b;
  b.kernel = name;
  b.body = body;
  b.ctx = ctx;
  b.fibers.resize(threads);
  b.warps.resize((threads + kWarp - 1) / kWarp);
  for (size_t i = 0; i < threads; ++i) b.fibers[i].stack = t_stacks.get(i);
  // Shared memory is not cleared between blocks on hardware; a schedule-dependent fill makes
  // reads of unwritten dynamic shared memory show up as schedule-dependent results.
  const size_t shared_alloc = (shared_bytes + 255) / 256 * 256 + 256;
  std::unique_ptr<unsigned char, void (*)(void*)> shared(
      static_cast<unsigned char*>(std::aligned_alloc(256, shared_alloc)), &std::free);
  b.shared = shared.get();

  struct Reset {
    ~Reset() {
      t_block = nullptr;
      current = nullptr;
    }
  } reset;
  t_block = &b;

  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t linear = sched == 0 ? k : blocks - 1 - k;
    b.index = uint3{unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y),
                    unsigned(linear / (uint64_t(grid.x) * grid.y))};
    const int garbage = sched == 0 ? 0xFF : 0x7F;  // float: NaN / 3.4e38; integers: -1 / large
    std::memset(b.shared, garbage, shared_alloc);
    if (static_shared_bytes) std::memset(static_shared, garbage, static_shared_bytes);
    for (Warp& w : b.warps) w = Warp{};
    for (size_t i = 0; i < threads; ++i) {
      Fiber& f = b.fibers[i];
      f.ts.thread_idx = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y),
                              unsigned(i / (uint64_t(block.x) * block.y))};
      f.ts.block_idx = b.index;
      f.ts.block_dim = block;
      f.ts.grid_dim = grid;
      f.state = State::Runnable;
      f.lane = int(i % kWarp);
      f.warp = int(i / kWarp);
      f.mask = 0;
      b.warps[f.warp].exists |= 1u << f.lane;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &fiber_main, 0);
    }
    b.live = int(threads);
    b.at_sync = 0;

    while (b.live > 0) {
      bool ran = false;
      for (size_t k2 = 0; k2 < threads; ++k2) {
        Fiber& f = b.fibers[sched == 0 ? k2 : threads - 1 - k2];
        if (f.state != State::Runnable) continue;
        ran = true;
        switch_to_fiber(b, f);
        if (!b.error.empty()) throw std::runtime_error(b.error);
      }
      if (!ran) {
        std::ostringstream os;
        int at_sync = 0, at_warp = 0, done = 0;
        std::string warp_site;
        for (const Fiber& f : b.fibers) {
          if (f.state == State::AtSync) ++at_sync;
          if (f.state == State::Done) ++done;
          if (f.state == State::AtWarp) {
            if (at_warp++ == 0)
              warp_site = std::string(op_name(f.op)) + " at " + where(f.file, f.line) + " (first: " + thread_name(f) + ")";
          }
        }
        os << "vitops CUDA emulator: deadlock in " << block_name(b) << ": " << at_sync << " threads wait at __syncthreads";
        if (at_sync) os << " (" << where(b.sync_file, b.sync_line) << ")";
        os << ", " << at_warp << " at warp collectives";
        if (at_warp) os << " (" << warp_site << ")";
        os << ", " << done << " returned";
        throw std::runtime_error(os.str());
      }
    }
  }
}

}  // namespace vitops::emu

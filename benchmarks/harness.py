"""Measurement machinery shared by every benchmark case: timing, memory, copy baseline, machine info.

Kept separate from the workload registry (workloads.py) so that adding a workload never touches
how things are measured, and so the measurement rules live in one place (see README.md).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch


class NotImplementedCase(Exception):
    """Raised by a contender factory whose implementation does not exist yet (op not built, no
    kernel for this device, module not written). The runner records it as "not implemented"."""


# ------------------------------------------------------------------------------------------------
# Synchronisation and L2 flushing
# ------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class L2Flusher:
    """Evicts the GPU L2 between timed calls by writing a buffer twice the L2 size.

    Every Gemma 4 single-image tensor fits in a 50 MB L2, so without a flush a repeated call reads
    its inputs from cache and reports faster-than-HBM bandwidth (performance.md §1.1).
    """

    def __init__(self, device: str):
        self.buf = None
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
            l2 = l2 or 50 * 2**20  # H100/H200 have 50 MB; used when the property is unavailable
            self.buf = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


# ------------------------------------------------------------------------------------------------
# Allocator
# ------------------------------------------------------------------------------------------------
def keep_freed_memory() -> str:
    """Tells glibc's malloc to serve large blocks from its heap and keep freed memory instead of
    mmap/munmap-ing them per call. By default every tensor over the (adaptive) mmap threshold is a
    fresh mapping, so each call of a tower re-faults its activations: measured on the 2-core CI VM
    (E4B tower, 280 tokens, bf16) as 140k-320k minor page faults and 0.3-1.2 s of system time per
    ~4 s call, varying from call to call, which buried differences of a few percent. With the
    memory kept: ~0 faults and ~0.01 s. Applies to every contender alike (they share the process).
    Returns a description for the results, or "default" where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    return "glibc mmap_threshold=1GiB trim_threshold=2GiB" if ok else "default"


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timed:
    """One contender's callable plus what the runner learned about it during warm-up."""

    name: str
    fn: Callable[[], object]
    inner: int = 1  # calls per CPU sample (calibrated so a sample is long enough for the clock)
    samples: list | None = None  # per-call seconds, one per repetition (cold L2 on CUDA)
    warm_samples: list | None = None  # CUDA only: back-to-back calls, warm L2
    wall_samples: list | None = None  # host wall time per eager call (host + device)


def calibrate_inner(fn: Callable[[], object], device: str, target_s: float, max_inner: int = 10_000) -> int:
    """Number of back-to-back calls whose total is about target_s (at least 1)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return int(max(1, min(max_inner, target_s // one)))


def _cpu_sample(t: Timed) -> float:
    t0 = time.perf_counter()
    for _ in range(t.inner):
        t.fn()
    return (time.perf_counter() - t0) / t.inner


def _cuda_cold_sample(t: Timed, flush: L2Flusher, iters: int) -> float:
    """Median device time of `iters` single calls, each preceded by an L2 flush (outside the
    events), measured with CUDA events so host overhead is excluded."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush()
        s.record()
        t.fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def _cuda_warm_sample(t: Timed, iters: int) -> float:
    """Device time per call of `iters` back-to-back calls between one pair of events (warm L2)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        t.fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / iters


def _cuda_wall_sample(t: Timed, iters: int) -> float:
    """Host wall time per eager call: back-to-back calls then one synchronize, divided by the
    count. At batch 1 this is what a user sees (launch + Python/dispatcher overhead)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        t.fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def measure_interleaved(
    contenders: list[Timed], device: str, reps: int, cuda_iters: int, flush: L2Flusher, want_wall: bool
) -> None:
    """Fills each contender's samples. Contenders alternate within every repetition, and the
    order rotates between repetitions, so slow drifts of a shared machine (other jobs, clock
    changes) hit every contender alike instead of biasing whichever ran last."""
    for c in contenders:
        c.samples, c.warm_samples, c.wall_samples = [], [], []
    n = len(contenders)
    for r in range(reps):
        for j in range(n):
            c = contenders[(r + j) % n]
            if device == "cuda":
                c.samples.append(_cuda_cold_sample(c, flush, cuda_iters))
                c.warm_samples.append(_cuda_warm_sample(c, cuda_iters))
                if want_wall:
                    c.wall_samples.append(_cuda_wall_sample(c, cuda_iters))
            else:
                s = _cpu_sample(c)
                c.samples.append(s)
                if want_wall:
                    c.wall_samples.append(s)  # on CPU device time *is* wall time


def median(xs) -> float | None:
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------------
# Copy baseline
# ------------------------------------------------------------------------------------------------
def copy_fn(total_bytes: int, device: str) -> Callable[[], object]:
    """A torch copy_ that moves `total_bytes` in all (half read, half written), i.e. the same
    traffic as the op's minimum. The op's "% of copy" is copy time / op time: 100 % means the op
    moves its minimum bytes as fast as the device can copy them."""
    n = max(1, total_bytes // 2)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------
def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Extra memory one call allocates at its peak, above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact, caching
    allocator). CPU: torch has no CPU allocator statistics and tracemalloc does not see torch's
    allocations, while getrusage's max RSS is a process-lifetime high-water mark (useless after the
    first big case). We therefore replay one call under torch.profiler with profile_memory=True,
    order every allocation/free event by time and take the peak of the running sum. Allocations are
    placed at the start of the op that made them, so the figure is a slight over-estimate.
    Returns None when the profiler yields no memory events.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    except Exception:  # a profiler failure must not lose the timing results
        return None
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    if not deltas:
        return None
    deltas.sort(key=lambda x: x[0])
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return int(peak)


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except Exception:
        return None


def machine_info(device: str) -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    info = {
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu_name=p.name,
            gpu_memory_bytes=p.total_memory,
            gpu_sm_count=p.multi_processor_count,
            gpu_l2_bytes=getattr(p, "L2_cache_size", None),
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import vitops

        info["vitops"] = vitops.__version__
        info["vitops_build"] = {k: v for k, v in vitops.build_info().items() if isinstance(v, (str, int, bool, dict, type(None)))}
    except Exception as e:  # the suite still reports HF baselines when vitops cannot load
        info["vitops"] = f"unavailable: {e}"
    return info

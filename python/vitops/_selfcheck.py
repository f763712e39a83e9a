"""Self-check: run every op on every built backend against its pure-PyTorch reference."""

from __future__ import annotations

import math
import time

import torch

from . import _loader
from .ops._manifest import MANIFEST


def _max_err(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    err = 0.0
    for u, v in zip(a, b):
        if u.dtype in (torch.bool, torch.int64, torch.int32):
            err = max(err, 0.0 if torch.equal(u, v) else math.inf)
        elif u.numel():
            err = max(err, (u.double() - v.double()).abs().max().item())
    return err


def _within(out, ref, tolerance) -> bool:
    """Every output within the entry's (rtol, atol) of the reference (integer outputs equal)."""
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for u, v in zip(out, ref):
        if not u.is_floating_point():
            if not torch.equal(u, v):
                return False
            continue
        rtol, atol = tolerance[u.dtype]
        if not torch.allclose(u.double(), v.double(), rtol=rtol, atol=atol):
            return False
    return len(out) == len(ref)


def run() -> bool:
    backends = ["cpu"]
    if torch.cuda.is_available() and _loader.HAS_CUDA_KERNELS:
        backends.append("cuda")
    rows = []
    ok_all = True
    for device in backends:
        dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
        if device == "cuda":
            dtypes.remove(torch.float64)
        for dtype in dtypes:
            for e in MANIFEST:  # the op manifest's sample of every op
                name = e.name
                key = "CUDA" if device == "cuda" else "CPU"
                if not _loader.has_kernel(name, key):
                    rows.append((name, device, str(dtype).split(".")[-1], "-", "-", "NO KERNEL"))
                    ok_all = False
                    continue
                try:
                    kw = e.sample(device, dtype, False)
                    t0 = time.perf_counter()
                    out = e.wrapper(**kw)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
                    ref = e.reference(**kw)
                    err = _max_err(out, ref)
                    ok = _within(out, ref, e.tolerances)
                    rows.append((name, device, str(dtype).split(".")[-1], f"{err:.2e}", f"{ms:.2f}", "ok" if ok else "FAIL"))
                except Exception as ex:  # a self-check reports, it does not stop at the first failure
                    ok, rows = False, rows + [(name, device, str(dtype).split(".")[-1], "-", "-", f"ERROR {ex}")]
                ok_all &= ok
    header = ("op", "device", "dtype", "max |err| vs reference", "time ms", "status")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    print("self-check:", "all ops match their references" if ok_all else "FAILURES above")
    return ok_all

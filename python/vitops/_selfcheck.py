"""Self-check: run every op on every built backend against its pure-PyTorch reference."""

from __future__ import annotations

import math
import time

import torch

from . import _loader, ops, reference


def _positions_batch(grids, length_per_image, device):
    """Padded (x, y) positions for a batch of patch grids [(rows, cols), ...]; padding (-1, -1)."""
    pos = torch.full((len(grids), length_per_image, 2), -1, dtype=torch.int64, device=device)
    for b, (rows, cols) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        pos[b, : rows * cols] = torch.stack([xs, ys], -1).reshape(-1, 2)
    return pos


def _cases(device: str, dtype: torch.dtype):
    """(op name, vitops callable, reference callable, args) with small realistic shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    images = rnd(2, 48, 96, 3)
    pos = _positions_batch([(6, 9), (9, 6)], 81, device)
    table = rnd(2, 64, 40)
    q = rnd(2, 81, 4, 72)
    x = rnd(2, 81, 40)
    yield "patchify", lambda: ops.patchify(images, 16), lambda: reference.patchify(images, 16)
    yield (
        "factorized_posemb",
        lambda: ops.factorized_posemb(table, pos, layout="hf"),
        lambda: reference.factorized_posemb(table, pos, 0),
    )
    yield (
        "apply_multidimensional_rope",
        lambda: ops.apply_multidimensional_rope(q, pos, base_frequency=100.0),
        lambda: reference.apply_multidimensional_rope(q, pos, base_frequency=100.0),
    )
    yield (
        "avg_pool_by_positions",
        lambda: ops.avg_pool_by_positions(x, positions_xy=pos, length=9),
        lambda: reference.avg_pool_by_positions(x, pos, 9),
    )


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


_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


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
            for name, fn, ref in _cases(device, dtype):
                key = "CUDA" if device == "cuda" else "CPU"
                if not _loader.has_kernel(name, key):
                    rows.append((name, device, str(dtype).split(".")[-1], "-", "-", "NO KERNEL"))
                    ok_all = False
                    continue
                try:
                    t0 = time.perf_counter()
                    out = fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
                    err = _max_err(out, ref())
                    ok = err <= _TOL[dtype]
                    rows.append((name, device, str(dtype).split(".")[-1], f"{err:.2e}", f"{ms:.2f}", "ok" if ok else "FAIL"))
                except Exception as e:  # a self-check reports, it does not stop at the first failure
                    ok, rows = False, rows + [(name, device, str(dtype).split(".")[-1], "-", "-", f"ERROR {e}")]
                ok_all &= ok
    header = ("op", "device", "dtype", "max |err| vs reference", "time ms", "status")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    print("self-check:", "all ops match their references" if ok_all else "FAILURES above")
    return ok_all

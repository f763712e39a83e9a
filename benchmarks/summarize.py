"""Summarise a results JSON against the CPU targets of performance.md §9 (issue 4).

    python benchmarks/summarize.py benchmarks/results/cpu_2026-11-23.json

Prints, per op, the vitops speedups over HF eager and over torch.compile(HF) at the shapes the
targets name, and a markdown table of every fwd/fwdbwd case at 2 threads. Nothing is asserted.
"""

from __future__ import annotations

import json
import sys


def _cases(doc, **want):
    for c in doc["cases"]:
        if c.get("error") or "speedup" not in c:
            continue
        if all((c["shape"].get(k) if k in ("model", "T", "B") else c.get(k)) == v for k, v in want.items()):
            yield c


def _fmt(x):
    return "-" if x is None else f"{x:.2f}x"


def main(path: str) -> None:
    doc = json.load(open(path))
    m = doc["machine"]
    print(f"# {path}: {m.get('gpu_name') or m.get('cpu_model')} ({m.get('cpu_cores')} cores), torch {m['torch']}, "
          f"transformers {m['transformers']}, {m['date']}\n")
    rows = []
    for op in sorted({c["op"] for c in doc["cases"]}):
        for c in _cases(doc, op=op):
            sp = c["speedup"]
            rows.append((op, c["shape_label"], c["dtype"], c.get("threads"), c["mode"],
                         c["contenders"]["vitops"]["median_s"] * 1e3 if c["contenders"].get("vitops", {}).get("status") == "ok" else None,
                         sp.get("eager"), sp.get("compile")))
    print("| op | shape | dtype | threads | mode | vitops ms | vs HF eager | vs compile(HF) |")
    print("|---|---|---|---|---|---|---|---|")
    for op, shape, dt, thr, mode, ms, e, c in rows:
        print(f"| {op} | {shape} | {dt} | {thr} | {mode} | {'-' if ms is None else f'{ms:.3f}'} | {_fmt(e)} | {_fmt(c)} |")
    print()
    # Minimum over shapes of each op's speedup vs torch.compile (target: >= 1.2x for every op).
    print("| op | dtype | threads | mode | min vs compile | min vs eager |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(r[0], r[2], r[3], r[4]) for r in rows if r[7] is not None})
    for op, dt, thr, mode in keys:
        sel = [r for r in rows if (r[0], r[2], r[3], r[4]) == (op, dt, thr, mode) and r[7] is not None]
        print(f"| {op} | {dt} | {thr} | {mode} | {_fmt(min(r[7] for r in sel))} | {_fmt(min(r[6] for r in sel))} |")


if __name__ == "__main__":
    main(sys.argv[1])

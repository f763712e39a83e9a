#!/usr/bin/env python
"""Runs the vitops benchmark suite: HF eager vs torch.compile(HF) vs vitops on workloads W1-W8.

    PYTHONPATH=python python benchmarks/run.py --smoke                 # seconds; what CI runs
    PYTHONPATH=python python benchmarks/run.py --devices cuda --dtypes bf16
    PYTHONPATH=python python benchmarks/run.py --devices cpu --threads 1,2 --workloads W2,W3

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # harness/workloads are siblings, not a package
    sys.path.insert(0, _HERE)

import torch  # noqa: E402

import harness  # noqa: E402
from harness import NotImplementedCase, Timed  # noqa: E402
from workloads import WORKLOADS, shape_label  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTENDERS = ("eager", "compile", "vitops")


# ------------------------------------------------------------------------------------------------
# progress bar: tqdm when installed, else a one-line fallback on stderr
# ------------------------------------------------------------------------------------------------
def _progress(items, desc, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        def gen():
            n = len(items)
            for i, it in enumerate(items):
                sys.stderr.write(f"\r{desc}: {i + 1}/{n}")
                sys.stderr.flush()
                yield it
            sys.stderr.write("\n")

        return gen()


# ------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------
def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _make_call(fn, args, mode, leaves, grads_cache):
    """A zero-argument callable running one forward (no_grad) or one forward+backward."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*args)

        return call

    def call():
        for leaf in leaves:
            leaf.grad = None
        outs = [t for t in _tensors(fn(*args)) if t.requires_grad]
        if "grads" not in grads_cache:  # same upstream gradients for every contender and call
            grads_cache["grads"] = [torch.randn_like(t) for t in outs]
        torch.autograd.backward(outs, grads_cache["grads"])
        return outs

    return call


def run_case(wl, shape, device, dtype_name, threads, mode, opts) -> dict:
    dtype = DTYPES[dtype_name]
    rec = dict(workload=wl.id, op=wl.op, shape=shape, shape_label=shape_label(shape), device=device,
               dtype=dtype_name, threads=threads, mode=mode, contenders={})
    torch.manual_seed(0)
    # a fresh dynamo cache per case: otherwise many shapes of one HF function exceed dynamo's
    # recompile limit and silently fall back to eager, and CPU inductor code would keep the
    # thread count it was compiled with
    torch._dynamo.reset()
    setup = wl.build(shape, device, dtype)
    leaves = setup.grad_leaves
    for leaf in leaves:
        leaf.requires_grad_(mode == "fwdbwd")
    nbytes = setup.bytes_fwd if mode == "fwd" else setup.bytes_bwd
    rec["min_bytes"] = nbytes

    fns = {"eager": setup.hf}
    if "compile" in opts.contenders:
        fns["compile"] = torch.compile(setup.hf, backend=opts.compile_backend, dynamic=False)
    if "vitops" in opts.contenders:
        try:
            fns["vitops"] = setup.vitops()
        except NotImplementedCase as e:
            rec["contenders"]["vitops"] = dict(status="not implemented", reason=str(e))
    fns = {k: v for k, v in fns.items() if k in opts.contenders}

    grads_cache: dict = {}
    timed = []
    for name, fn in fns.items():
        call = _make_call(fn, setup.args, mode, leaves, grads_cache)
        try:
            for _ in range(opts.warmup):  # includes compilation for the compile contender
                call()
            harness.sync(device)
            inner = harness.calibrate_inner(call, device, opts.target_s) if device == "cpu" else 1
            timed.append(Timed(name, call, inner=inner))
        except Exception as e:  # noqa: BLE001 - one failing contender must not end the run
            rec["contenders"][name] = dict(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            if opts.verbose:
                traceback.print_exc()
    if nbytes and timed:
        copy = harness.copy_fn(nbytes, device)
        copy()
        timed.append(Timed("copy", copy, inner=harness.calibrate_inner(copy, device, opts.target_s)
                           if device == "cpu" else 1))

    want_wall = shape.get("B", shape.get("tiles", 1)) == 1
    harness.measure_interleaved(timed, device, opts.reps, opts.cuda_iters, opts.flush, want_wall)

    copy_t = next((harness.median(t.samples) for t in timed if t.name == "copy"), None)
    rec["copy_s"] = copy_t
    for t in timed:
        if t.name == "copy":
            continue
        med = harness.median(t.samples)
        c = dict(status="ok", median_s=med, samples_s=t.samples, inner=t.inner,
                 wall_per_call_s=harness.median(t.wall_samples) if want_wall else None,
                 warm_median_s=harness.median(t.warm_samples) if device == "cuda" else None)
        if nbytes and med:
            c["gbps"] = nbytes / med / 1e9
            c["pct_of_copy"] = 100.0 * copy_t / med if copy_t else None
        c["peak_mem_bytes"] = harness.peak_memory_bytes(t.fn, device) if opts.memory else None
        rec["contenders"][t.name] = c
    v = rec["contenders"].get("vitops", {})
    rec["speedup"], rec["speedup_paired"] = {}, {}
    for other in ("eager", "compile"):
        o = rec["contenders"].get(other, {})
        if v.get("status") == "ok" and o.get("status") == "ok":
            rec["speedup"][other] = o["median_s"] / v["median_s"]
            # Median of the per-repetition ratios: the two run back to back within a repetition, so a
            # slow phase of a shared machine cancels out of each ratio (the medians of the two
            # sample lists do not pair them).
            rec["speedup_paired"][other] = harness.median(
                [a / b for a, b in zip(o["samples_s"], v["samples_s"])])
    return rec


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt_t(c):
    if not c:
        return "-"
    if c.get("status") != "ok":
        return "n/i" if c.get("status") == "not implemented" else "err"
    s = c["median_s"]
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _fmt_mem(c):
    if not c or c.get("status") != "ok" or c.get("peak_mem_bytes") is None:
        return "n/a"
    return f"{c['peak_mem_bytes'] / 2**20:.1f}"


def _fmt_pct(c):
    if not c or c.get("status") != "ok" or c.get("pct_of_copy") is None:
        return "-"
    return f"{c['pct_of_copy']:.0f}%"


def markdown_table(cases) -> str:
    head = ("| W | op | shape | dtype | dev/thr | mode | eager | compile | vitops | vitops vs eager | "
            "vitops vs compile | % copy e/c/v | wall/call e/c/v (B=1) | peak MiB e/c/v |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in cases:
        cs = r["contenders"]
        sp = r.get("speedup", {})
        dev = r["device"] + (f"/{r['threads']}t" if r["device"] == "cpu" else "")

        def wall(name):
            c = cs.get(name) or {}
            w = c.get("wall_per_call_s")
            return f"{w * 1e6:.0f}" if w else "-"

        lines.append(
            f"| {r['workload']} | {r['op']} | {r['shape_label']} | {r['dtype']} | {dev} | {r['mode']} | "
            f"{_fmt_t(cs.get('eager'))} | {_fmt_t(cs.get('compile'))} | {_fmt_t(cs.get('vitops'))} | "
            + (f"{sp['eager']:.2f}x" if "eager" in sp else "-") + " | "
            + (f"{sp['compile']:.2f}x" if "compile" in sp else "-") + " | "
            + "/".join(_fmt_pct(cs.get(n)) for n in CONTENDERS) + " | "
            + "/".join(wall(n) for n in CONTENDERS) + " µs | "
            + "/".join(_fmt_mem(cs.get(n)) for n in CONTENDERS) + " |"
        )
    return "\n".join(lines)


def write_plot(cases, path) -> str | None:
    """Speedups of vitops (vs HF eager, vs torch.compile of HF): one panel per (op, mode), one bar
    pair per shape/dtype/threads. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless CI / servers
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in cases if r.get("speedup")]
    panels = sorted({(r["op"], r["mode"]) for r in rows})
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.text(0.5, 0.5, "no case with a vitops implementation", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    per_panel = [[r for r in rows if (r["op"], r["mode"]) == key] for key in panels]
    width = max(6, 0.32 * max(len(p) for p in per_panel) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
    for ax, (op, mode), sel in zip(axes[:, 0], panels, per_panel):
        xs = range(len(sel))
        for i, (other, color) in enumerate((("eager", "tab:blue"), ("compile", "tab:orange"))):
            ax.bar([x + 0.4 * i for x in xs], [r["speedup"].get(other, float("nan")) for r in sel], 0.4,
                   label=f"vs HF {other}", color=color)
        labels = [r["shape_label"].replace("model=", "") + f" {r['dtype']}"
                  + (f" {r['threads']}t" if r["device"] == "cpu" else "") for r in sel]
        ax.set_xticks([x + 0.2 for x in xs])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{op} ({mode}, {sel[0]['device']})", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", help="comma-separated op names (default: all); e.g. g4_rope,g4_pool")
    p.add_argument("--workloads", default="", help="comma-separated workload ids, e.g. W1,W3 (default: all)")
    p.add_argument("--devices", default="", help="cpu,cuda (default: cuda when available, else cpu)")
    p.add_argument("--dtypes", default="", help="fp32,bf16,fp16 (default: bf16,fp32 on CUDA; fp32,bf16 on CPU)")
    p.add_argument("--threads", default="1,2", help="CPU thread counts (torch.set_num_threads), e.g. 1,2")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd (forward+backward)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="subset of eager,compile,vitops")
    p.add_argument("--max-batch", type=int, default=None, help="skip shapes with a larger batch/tile count")
    p.add_argument("--max-tokens", type=int, default=None, help="skip Gemma 4 shapes with more soft tokens")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing JSON of the same device and day instead of replacing it")
    p.add_argument("--where", default="", help="keep shapes whose fields equal these, e.g. model=g4-e4b,T=280")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (median taken); default 15")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per contender (default 3)")
    p.add_argument("--target-ms", type=float, default=None, help="CPU: length of one timed sample (default 50)")
    p.add_argument("--cuda-iters", type=int, default=None, help="CUDA: calls per repetition (default 10)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                   "'eager' under --smoke so CI exercises dynamo without minutes of codegen)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory replay")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions: every code path in seconds")
    p.add_argument("--out", default=os.path.join(_HERE, "results"), help="directory for JSON and PNG")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory (no first-touch page faults in the timings; "
                        "see README 'Method'); default: the allocator as configured")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even when cases or contenders failed (they are still reported)")
    return p.parse_args(argv)


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


class BenchmarkError(SystemExit):
    """The benchmark could not measure what it was asked to (exit status 1, after writing results)."""


def _require_vitops() -> None:
    """A vitops that cannot be imported is an error of the run, not a row of "n/i"."""
    import workloads

    if workloads.vitops is not None:
        return
    raise BenchmarkError(
        "benchmarks/run.py: vitops cannot be imported: " + str(workloads._VITOPS_ERROR).splitlines()[0] + "\n"
        "  Set up with `bash tools/setup.sh` and run `.venv/bin/python benchmarks/run.py ...` (the installed build);\n"
        "  PYTHONPATH=python only works after a developer build (tools/dev_build.sh) put the compiled\n"
        "  libraries next to the sources. Use --contenders eager,compile to measure HF alone."
    )


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if "vitops" in _csv(opts.contenders):
        _require_vitops()
    malloc = harness.keep_freed_memory() if opts.malloc == "keep" else "default"
    smoke = opts.smoke
    opts.reps = opts.reps or (3 if smoke else 15)
    opts.warmup = opts.warmup or (1 if smoke else 3)
    opts.target_s = (opts.target_ms or (1.0 if smoke else 50.0)) / 1e3
    opts.cuda_iters = opts.cuda_iters or (2 if smoke else 10)
    opts.compile_backend = opts.compile_backend or ("eager" if smoke else "inductor")
    opts.memory = not opts.no_memory
    opts.contenders = _csv(opts.contenders)
    devices = _csv(opts.devices) or (["cuda"] if torch.cuda.is_available() else ["cpu"])
    modes = _csv(opts.modes)
    threads = [int(t) for t in _csv(opts.threads)] or [1]
    if smoke:
        threads = threads[:1]  # thread scaling is not a code path worth CI seconds
    ops, wids = set(_csv(opts.ops)), set(_csv(opts.workloads))
    selected = [w for w in WORKLOADS if (not ops or w.op in ops) and (not wids or w.id in wids)]
    if not selected:
        sys.exit(f"no workload matches --ops {opts.ops!r} --workloads {opts.workloads!r}; "
                 f"known: {sorted({w.op for w in WORKLOADS})}")

    os.makedirs(opts.out, exist_ok=True)
    results = {}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("skipping cuda: no CUDA device", file=sys.stderr)
            continue
        dtypes = _csv(opts.dtypes) or (["bf16", "fp32"] if device == "cuda" else ["fp32", "bf16"])
        opts.flush = harness.L2Flusher(device)
        wheres = [tuple(kv.split("=", 1)) for kv in _csv(opts.where)]
        jobs = []
        for thr in threads if device == "cpu" else [None]:
            for wl in selected:
                for shape in wl.smoke_shapes if smoke else wl.shapes:
                    b = shape.get("B", shape.get("tiles", 1))
                    if opts.max_batch and b > opts.max_batch:
                        continue
                    if opts.max_tokens and shape.get("T", 0) > opts.max_tokens:
                        continue
                    if any(str(shape.get(k)) != v for k, v in wheres):
                        continue
                    for dt in dtypes:
                        for mode in modes:
                            if mode == "fwdbwd" and not wl.backward:
                                continue
                            jobs.append((thr, wl, shape, dt, mode))
        cases = []
        prev_threads = torch.get_num_threads()
        for thr, wl, shape, dt, mode in _progress(jobs, f"bench {device}", not opts.no_progress):
            if thr is not None:
                torch.set_num_threads(thr)
            try:
                cases.append(run_case(wl, shape, device, dt, thr, mode, opts))
            except Exception as e:  # noqa: BLE001 - a broken builder is reported, not fatal
                cases.append(dict(workload=wl.id, op=wl.op, shape=shape, shape_label=shape_label(shape),
                                  device=device, dtype=dt, threads=thr, mode=mode, contenders={},
                                  error=f"{type(e).__name__}: {e}".splitlines()[0][:300]))
                if opts.verbose:
                    traceback.print_exc()
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        torch.set_num_threads(prev_threads)

        doc = dict(machine=harness.machine_info(device),
                   settings=dict(smoke=smoke, malloc=malloc, reps=opts.reps, warmup=opts.warmup, target_s=opts.target_s,
                                 cuda_iters=opts.cuda_iters, compile_backend=opts.compile_backend,
                                 threads=threads if device == "cpu" else None, dtypes=dtypes, modes=modes,
                                 l2_flush=device == "cuda"),
                   cases=cases)
        stem = f"{device}_{_dt.date.today().isoformat()}" + ("_smoke" if smoke else "")
        json_path = os.path.join(opts.out, stem + ".json")
        if opts.merge and os.path.exists(json_path):
            # Keep earlier cases of the same day that this run did not re-measure.
            with open(json_path) as f:
                old = json.load(f)

            def key(c):
                return (c["workload"], c["op"], c["shape_label"], c["dtype"], c["threads"], c["mode"])

            fresh = {key(c) for c in cases}
            cases = [c for c in old["cases"] if key(c) not in fresh] + cases
            doc["cases"] = cases
            doc["runs"] = old.get("runs", [old["settings"]]) + [doc["settings"]]
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        png = write_plot(cases, os.path.join(opts.out, stem + ".png"))
        print(f"\n## {device}: {doc['machine'].get('gpu_name') or doc['machine']['cpu_model']}\n")
        print(markdown_table(cases))
        broken = [c for c in cases if c.get("error")]
        for c in broken:
            print(f"ERROR {c['op']} {c['shape_label']} {c['dtype']} {c['mode']}: {c['error']}")
        failed = [(c, name) for c in cases for name, v in c.get("contenders", {}).items()
                  if v.get("status") == "error"]
        for c, name in failed:
            print(f"ERROR {name} on {c['op']} {c['shape_label']} {c['dtype']} {c['mode']}: "
                  f"{c['contenders'][name].get('reason')}")
        print(f"\nwrote {json_path}" + (f" and {png}" if png else " (no PNG: matplotlib not installed)"))
        results[device] = dict(json=json_path, png=png, doc=doc, errors=len(broken) + len(failed))
    errors = sum(r["errors"] for r in results.values())
    if errors and not opts.keep_going:
        raise BenchmarkError(f"benchmarks/run.py: {errors} case(s) or contender(s) failed (see ERROR lines above "
                             "and the JSON); results were written")
    return results


if __name__ == "__main__":
    main()

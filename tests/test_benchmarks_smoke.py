"""Keeps the benchmark suite runnable: a tiny smoke run on CPU must produce a well-formed JSON.

Timings are never asserted (shared CI machines are noisy); only structure is.
"""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_run():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("vitops_bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_json(tmp_path):
    run = _load_run()
    threads = torch.get_num_threads()
    # two op workloads (one with a tuple output) cover fwd, fwd+bwd, eager, compile (dynamo with the
    # eager backend under --smoke), vitops or "not implemented", the copy baseline and peak memory
    results = run.main(["--smoke", "--devices", "cpu", "--dtypes", "fp32", "--ops", "g4_posemb,g4_pool",
                        "--reps", "2", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the runner restores the thread count
    path = results["cpu"]["json"]
    assert os.path.basename(path).startswith("cpu_") and path.endswith("_smoke.json")
    with open(path) as f:
        doc = json.load(f)
    assert set(doc) >= {"machine", "settings", "cases"}
    for key in ("date", "cpu_model", "cpu_cores", "torch", "transformers", "cuda"):
        assert key in doc["machine"]
    assert doc["cases"], "no case ran"
    modes = set()
    for case in doc["cases"]:
        assert "error" not in case, case.get("error")
        assert {"workload", "op", "shape", "dtype", "device", "threads", "mode", "contenders", "speedup",
                "min_bytes", "copy_s"} <= set(case)
        modes.add(case["mode"])
        for name in ("eager", "compile"):
            c = case["contenders"][name]
            assert c["status"] == "ok", c
            assert c["median_s"] > 0 and len(c["samples_s"]) == 2
            assert "pct_of_copy" in c and "peak_mem_bytes" in c
        # both ops exist and have CPU kernels: vitops must have been measured
        v = case["contenders"]["vitops"]
        assert v["status"] == "ok", v
        assert set(case["speedup"]) == {"eager", "compile"}
    assert modes == {"fwd", "fwdbwd"}


def test_unimportable_vitops_is_an_error(tmp_path):
    """`PYTHONPATH=python` over a source tree without compiled libraries: the run fails, it does not
    report every vitops row as "not implemented"."""
    import subprocess
    import sys

    src = tmp_path / "src"
    (src / "vitops").mkdir(parents=True)
    (src / "vitops" / "__init__.py").write_text("raise ImportError('the compiled library is missing')\n")
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke", "--devices", "cpu",
                           "--ops", "g4_posemb", "--no-progress", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "vitops cannot be imported" in proc.stderr and "tools/setup.sh" in proc.stderr


def test_a_failing_vitops_contender_fails_the_run(tmp_path, monkeypatch):
    run = _load_run()
    import workloads

    wl = next(w for w in workloads.WORKLOADS if w.op == "g4_posemb")
    real_build = wl.build

    def broken(shape, device, dtype):
        setup = real_build(shape, device, dtype)
        import dataclasses

        def boom(*args):
            raise RuntimeError("planted failure")

        return dataclasses.replace(setup, vitops=lambda: boom)

    monkeypatch.setattr(wl, "build", broken)
    with pytest.raises(SystemExit, match="failed"):
        run.main(["--smoke", "--devices", "cpu", "--dtypes", "fp32", "--ops", "g4_posemb", "--modes", "fwd",
                  "--reps", "2", "--no-progress", "--out", str(tmp_path)])


def test_registry_covers_w1_to_w10():
    run = _load_run()
    from workloads import WORKLOADS  # importable once run.py put benchmarks/ on sys.path

    assert {w.id for w in WORKLOADS} == {f"W{i}" for i in range(1, 11)}
    assert all(w.shapes and w.smoke_shapes for w in WORKLOADS)
    assert run.markdown_table([]).startswith("| W |")


def test_case_with_a_vitops_contender():
    """Exercises the "vitops ok" path (speedups, % copy for all three) with the pure-PyTorch
    reference standing in for the kernel, so it works before any kernel is built."""
    run = _load_run()
    import dataclasses

    import vitops.reference as ref
    from workloads import WORKLOADS, Workload

    wl = next(w for w in WORKLOADS if w.op == "g4_posemb")

    def build(shape, device, dtype):
        setup = wl.build(shape, device, dtype)
        table = setup.grad_leaves[0]
        return dataclasses.replace(setup, vitops=lambda: (lambda pos, pad: ref.factorized_posemb(table, pos)))

    fake = Workload(wl.id, wl.op, wl.description, wl.shapes, wl.smoke_shapes, build)
    opts = run.parse_args(["--smoke"])
    opts.reps, opts.warmup, opts.target_s, opts.cuda_iters = 2, 1, 1e-3, 2
    opts.compile_backend, opts.memory, opts.contenders = "eager", True, list(run.CONTENDERS)
    opts.flush = run.harness.L2Flusher("cpu")
    for mode in ("fwd", "fwdbwd"):
        rec = run.run_case(fake, wl.smoke_shapes[0], "cpu", "fp32", 1, mode, opts)
        assert rec["contenders"]["vitops"]["status"] == "ok", rec["contenders"]["vitops"]
        assert set(rec["speedup"]) == {"eager", "compile"}
        assert rec["contenders"]["vitops"]["pct_of_copy"] > 0
    assert "n/i" not in run.markdown_table([rec])

"""Seeded fuzz of every op: valid cases against vitops.reference (forward, backward, fake-kernel
metadata), invalid cases (one mutation each: rank, dtype, device, scalars, int64-limit sizes, bad
positions) that must raise a clear error from the real and the fake kernel alike.

The cases (tests/fuzz_cases.py) run in subprocesses (tests/fuzz_worker.py): a crash (SIGSEGV,
SIGFPE, an abort under AddressSanitizer) or a hang fails the test and names the case. Sizes:
``VITOPS_FUZZ_SCALE`` multiplies the case counts (CI's AddressSanitizer pass uses a larger run);
``VITOPS_FUZZ_SEED`` shifts the seeds, so a nightly run can explore new cases while every run of
one seed is reproducible: ``python tests/fuzz_worker.py vitops invalid qkv_norm_rope 17 18``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fuzz_cases

HERE = os.path.dirname(os.path.abspath(__file__))
SCALE = float(os.environ.get("VITOPS_FUZZ_SCALE", "1"))
SEED0 = int(os.environ.get("VITOPS_FUZZ_SEED", "0"))
COUNTS = {  # (valid, invalid) cases per op and namespace at scale 1
    "vitops": (150, 250),
    "vitops_emu": (25, 40),
}
TIMEOUT_PER_CASE_S = 2.0  # generous: a case takes ~30 ms (emulated CUDA: ~100 ms)


def _run_worker(namespace: str, kind: str, op: str, count: int):
    start, end = SEED0, SEED0 + count
    cmd = [sys.executable, os.path.join(HERE, "fuzz_worker.py"), namespace, kind, op, str(start), str(end)]
    timeout = 60 + TIMEOUT_PER_CASE_S * count * (3 if namespace == "vitops_emu" else 1)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"}), timeout, cmd


def _collect(proc, timeout, cmd):
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    started, results = None, []
    for line in out.splitlines():
        if line.startswith("START "):
            started = int(line.split()[1])
        elif line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
            started = None
        elif line == "NO_EMULATOR":
            return None
    where = " ".join(cmd[2:5]) + (f" seed {started} (rerun: {' '.join(cmd[:5])} {started} {started + 1})"
                                  if started is not None else "")
    if timed_out:
        pytest.fail(f"fuzz worker hung (> {timeout:.0f} s) in {where}")
    if proc.returncode != 0:
        pytest.fail(f"fuzz worker died (exit {proc.returncode}) in {where}\n{err[-3000:]}")
    return results


@pytest.mark.parametrize("namespace", ["vitops", "vitops_emu"])
@pytest.mark.parametrize("op", fuzz_cases.OPS)
def test_fuzz(op, namespace):
    n_valid, n_invalid = (max(1, int(c * SCALE)) for c in COUNTS[namespace])
    # valid and invalid cases in two workers at once (CI machines have 2+ cores)
    jobs = [_run_worker(namespace, "valid", op, n_valid), _run_worker(namespace, "invalid", op, n_invalid)]
    results = [_collect(*job) for job in jobs]
    if any(r is None for r in results):
        from vitops import testing

        if os.environ.get("CI") == "true" or testing.cuda_emulator_built():
            pytest.fail("the CUDA emulator library is missing (tools/setup.sh builds it)")
        pytest.skip("the CUDA emulator library was not built")
    results = [case for r in results for case in r]
    assert len(results) == n_valid + n_invalid
    problems = [f"{r['case']}: {r['problem']}" for r in results if r["problem"] is not None]
    assert not problems, f"{len(problems)} of {len(results)} cases failed:\n" + "\n".join(problems[:20])


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer the planted SIGSEGV is itself reported as an ASan error")
def test_fuzz_catches_a_crash(tmp_path):
    """The harness itself: a worker that dies on a case is reported with that case, not a pytest abort."""
    script = tmp_path / "crash.py"
    script.write_text("import os, signal\nprint('START 7', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    proc = subprocess.Popen([sys.executable, str(script), "vitops", "invalid", "patchify"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match=r"died \(exit -11\) in .*seed 7"):
        _collect(proc, 30, [sys.executable, str(script), "vitops", "invalid", "patchify"])

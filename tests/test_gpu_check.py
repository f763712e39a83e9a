"""tools/gpu_check.sh without a GPU: the no-device path, and its control flow through the test hooks.

GPU_CHECK_FAKE_GPU=1 skips the device probe, GPU_CHECK_DRY_RUN=1 replaces every step by a stub and
GPU_CHECK_STEP_CMD_<step> by a shell command, so timeouts, failures, skips and exit codes are
exercised in seconds. Nothing here builds or needs CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _steps() -> list[tuple[str, bool, str]]:
    """(name, needs a GPU, dependencies) from `gpu_check.sh --list`."""
    out = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 4) for line in out.splitlines()[1:] if line.strip()]
    return [(r[0], r[2] == "yes", r[3]) for r in rows]


STEPS = _steps()
NAMES = [s[0] for s in STEPS]


def run(tmp_path: Path, *args: str, timeout: float = 120, **env: str):
    """Run the script with OUT and the build directory under tmp_path; returns (process, results)."""
    out = tmp_path / "out"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full_env.update(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_BUILD_DIR=str(tmp_path / "build"))
    full_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=tmp_path)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    return proc, results


def fake(**env: str) -> dict:
    """A fake GPU, every step a stub unless overridden."""
    return dict(GPU_CHECK_FAKE_GPU="1", GPU_CHECK_DRY_RUN="1", **env)


def statuses(results) -> dict[str, str]:
    return {s["name"]: s["status"] for s in results["steps"]}


def test_registry_is_well_formed():
    assert NAMES[0] == "env" and "build" in NAMES and len(set(NAMES)) == len(NAMES)
    for i, (name, _, deps) in enumerate(STEPS):
        assert name.isidentifier() and name == name.lower()
        for dep in deps.split(",") if deps != "-" else []:
            assert dep in NAMES[:i], f"{name} depends on {dep}, which does not run before it"
    assert [n for n, gpu, _ in STEPS if not gpu] == ["env"]


def test_no_gpu_skips_cleanly_and_builds_nothing(tmp_path):
    so_before = sorted((ROOT / "python" / "vitops").glob("*.so"))
    mtimes = [p.stat().st_mtime for p in so_before]
    # On a machine that has a GPU, pretend it has none (the real probe is exercised elsewhere).
    env = {"GPU_CHECK_FAKE_GPU": "0"} if torch.cuda.is_available() else {}
    t0 = time.monotonic()
    proc, res = run(tmp_path, **env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60
    assert res["complete"] and res["exit_code"] == 3 and res["gpu"] is None and res["no_gpu_reason"]
    assert [s["name"] for s in res["steps"]] == NAMES
    for step, (name, gpu, _) in zip(res["steps"], STEPS):
        if gpu:
            assert step["status"] == "SKIP" and step["detail"].startswith("no CUDA device"), step
            assert step["seconds"] == 0.0 and step["log"] is None
    out = tmp_path / "out"
    assert (out / "summary.txt").exists() and (out / "env.txt").exists() and (out / "env.json").exists()
    assert not (tmp_path / "build").exists() and not (out / "logs" / "build.log").exists()
    assert sorted((ROOT / "python" / "vitops").glob("*.so")) == so_before
    assert [p.stat().st_mtime for p in so_before] == mtimes
    # the summary table comes last on stdout, one line per step
    tail = proc.stdout.splitlines()
    assert tail[-1].startswith("gpu_check: exit 3 (no usable CUDA device")
    for name in NAMES:
        assert any(line.split()[:1] == [name] for line in tail[-len(NAMES) - 2:]), name


def test_all_steps_pass_exit_0(tmp_path):
    proc, res = run(tmp_path, **fake())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(res) == {n: "PASS" for n in NAMES}
    assert res["exit_code"] == 0 and res["fake_gpu"] and res["dry_run"] and res["complete"]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "gpu_check: exit 0 (every step passed)"
    table = lines[-len(NAMES) - 1:-1]
    assert [line.split()[:2] for line in table] == [[n, "PASS"] for n in NAMES]
    assert (tmp_path / "out" / "summary.txt").read_text().splitlines()[-1] == lines[-1]
    for name in NAMES:
        assert (tmp_path / "out" / "logs" / f"{name}.log").exists()


def test_dry_run_flag(tmp_path):
    proc, res = run(tmp_path, "--dry-run", GPU_CHECK_FAKE_GPU="1", GPU_CHECK_STEPS="env")
    assert proc.returncode == 0 and statuses(res) == {"env": "PASS"} and res["dry_run"]


def test_timeout_is_recorded_and_the_next_step_runs(tmp_path):
    t0 = time.monotonic()
    proc, res = run(tmp_path, **fake(
        GPU_CHECK_GRACE="1", GPU_CHECK_MIN_STEP="1",
        GPU_CHECK_BUDGET_pytest_cuda="1", GPU_CHECK_STEP_CMD_pytest_cuda="echo started; sleep 30",
        # a step that catches SIGINT still reports what it has (as pytest writes its junit XML)
        GPU_CHECK_BUDGET_sync="1",
        GPU_CHECK_STEP_CMD_sync='trap \'echo "3 passed before the interrupt" > "$GPU_CHECK_DETAIL"; exit 2\' INT; sleep 30',
        # a step that ignores SIGINT is killed after the grace period
        GPU_CHECK_BUDGET_bench="1", GPU_CHECK_STEP_CMD_bench="trap '' INT; sleep 30",
    ))
    assert time.monotonic() - t0 < 25
    assert proc.returncode == 1, proc.stdout + proc.stderr
    st = statuses(res)
    assert st["pytest_cuda"] == st["sync"] == st["bench"] == "TIMEOUT"
    assert st["parity"] == st["memcheck"] == st["pytest_compile"] == "PASS"
    steps = {s["name"]: s for s in res["steps"]}
    assert steps["sync"]["detail"] == "ran out of its 1 s; 3 passed before the interrupt"
    assert steps["pytest_cuda"]["seconds"] < 5 and steps["bench"]["seconds"] < 5
    # the end of a timed-out step's log is printed before the summary
    assert "--- pytest_cuda (TIMEOUT)" in proc.stdout and "started" in proc.stdout
    assert "not passed: pytest_cuda=TIMEOUT sync=TIMEOUT bench=TIMEOUT" in proc.stdout.splitlines()[-1]


def test_failed_build_skips_its_dependents(tmp_path):
    proc, res = run(tmp_path, **fake(GPU_CHECK_STEP_CMD_build='echo "ninja: build stopped: error"; exit 1'))
    assert proc.returncode == 1
    steps = {s["name"]: s for s in res["steps"]}
    assert steps["env"]["status"] == "PASS"
    assert steps["build"]["status"] == "FAIL" and steps["build"]["detail"] == "exit code 1"
    dependents = [n for n, _, deps in STEPS if deps != "-"]
    assert dependents
    for name in dependents:
        assert steps[name]["status"] == "SKIP" and steps[name]["detail"] == "build FAIL", steps[name]
        assert not (tmp_path / "out" / "logs" / f"{name}.log").exists()
    assert "ninja: build stopped: error" in proc.stdout  # the build's error lines are shown


def test_failed_step_detail_and_exit_1(tmp_path):
    proc, res = run(tmp_path, **fake(
        GPU_CHECK_STEP_CMD_memcheck='echo "2 memcheck errors in 11 tests" > "$GPU_CHECK_DETAIL"; exit 1',
        # details are free text: quotes, backslashes, tabs and several lines stay valid JSON
        GPU_CHECK_STEP_CMD_racecheck='printf \'a "quoted" \\\\path\\tand\\nmore\\n\' > "$GPU_CHECK_DETAIL"'))
    assert proc.returncode == 1
    steps = {s["name"]: s for s in res["steps"]}
    assert steps["memcheck"]["status"] == "FAIL" and steps["memcheck"]["detail"] == "2 memcheck errors in 11 tests"
    assert steps["racecheck"]["status"] == "PASS"  # not a dependency: still runs
    assert steps["racecheck"]["detail"] == 'a "quoted" \\path and more'
    last = proc.stdout.splitlines()
    assert last[-1] == "gpu_check: exit 1 (not passed: memcheck=FAIL)"
    assert any(line.split()[:2] == ["memcheck", "FAIL"] and "2 memcheck errors" in line for line in last)


def test_no_tests_collected_is_its_own_status_and_not_a_failure(tmp_path):
    proc, res = run(tmp_path, **fake(GPU_CHECK_STEP_CMD_parity="exit 78", GPU_CHECK_STEP_CMD_racecheck="exit 77"))
    st = statuses(res)
    assert st["parity"] == "NOTESTS" and st["racecheck"] == "SKIP"
    assert proc.returncode == 1  # a step that skipped itself (e.g. no compute-sanitizer) is not a pass
    proc, res = run(tmp_path, **fake(GPU_CHECK_STEP_CMD_parity="exit 78"))
    assert proc.returncode == 0 and statuses(res)["parity"] == "NOTESTS"


def test_total_deadline_skips_the_rest(tmp_path):
    proc, res = run(tmp_path, **fake(GPU_CHECK_DEADLINE="12", GPU_CHECK_GRACE="0", GPU_CHECK_MIN_STEP="10",
                                     GPU_CHECK_STEP_CMD_env="sleep 2.5"))
    assert proc.returncode == 1
    steps = res["steps"]
    assert steps[0]["name"] == "env" and steps[0]["status"] == "PASS"
    for s in steps[1:]:
        assert s["status"] == "SKIP" and "GPU_CHECK_DEADLINE=12" in s["detail"], s


def test_step_selection_and_usage_errors(tmp_path):
    proc, res = run(tmp_path, **fake(GPU_CHECK_STEPS="build,sync"))
    assert proc.returncode == 0 and [s["name"] for s in res["steps"]] == ["build", "sync"]
    proc, res = run(tmp_path, **fake(GPU_CHECK_SKIP="bench,pytest_compile"))
    assert proc.returncode == 0 and "bench" not in statuses(res) and "pytest_compile" not in statuses(res)
    # a dependency that is not selected counts as met (a build from an earlier run)
    proc, res = run(tmp_path, **fake(GPU_CHECK_STEPS="sync", GPU_CHECK_STEP_CMD_build="exit 1"))
    assert proc.returncode == 0 and statuses(res) == {"sync": "PASS"}
    for env in (dict(GPU_CHECK_STEPS="nope"), dict(GPU_CHECK_BUDGET_build="3m")):
        proc, _ = run(tmp_path, **fake(**env))
        assert proc.returncode == 2 and "gpu_check:" in proc.stderr
    proc, _ = run(tmp_path, "--bogus")
    assert proc.returncode == 2


def test_results_json_is_written_while_running(tmp_path):
    """A run killed from outside (the 10-minute limit) still leaves the finished steps' results."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(out), PYTHON=sys.executable, **fake(GPU_CHECK_STEP_CMD_selfcheck="sleep 30"))
    p = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (out / "logs" / "selfcheck.log").exists():
                break
            time.sleep(0.1)
        time.sleep(0.3)
        res = json.loads((out / "results.json").read_text())
        assert not res["complete"] and res["exit_code"] is None
        assert statuses(res) == {"env": "PASS", "build": "PASS", "build_info": "PASS"}
    finally:
        os.killpg(p.pid, 9)
        p.wait()


@pytest.mark.skipif(not os.access("/bin/bash", os.X_OK), reason="no bash")
def test_shell_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)

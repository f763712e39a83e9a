#!/usr/bin/env bash
# One command for a short GPU window: build vitops with CUDA and run every GPU check, each step
# time-boxed, every result written under $OUT, a one-line summary per step printed last.
#
#   OUT=/path/to/results bash tools/gpu_check.sh      # default OUT: build/gpu_check_out
#   bash tools/gpu_check.sh --list                    # the steps, their budgets and dependencies
#   bash tools/gpu_check.sh --dry-run                 # every step body replaced by a stub
#   bash tools/gpu_check.sh --digest                  # source digest (to match a run with a commit)
#
# Exit code: 0 every step PASS (or NOTESTS: a selection that is allowed to be empty), 1 a step
# FAILed, TIMEd OUT or was SKIPped, 2 usage error, 3 no usable CUDA device (every GPU step SKIP,
# nothing built).
#
# Environment (all optional):
#   PYTHON=python3                  interpreter (torch, pytest, cmake, ninja, pybind11)
#   OUT=build/gpu_check_out         results directory
#   GPU_CHECK_STEPS=a,b             run only these steps (dependencies not listed count as met)
#   GPU_CHECK_SKIP=a,b              leave these steps out
#   GPU_CHECK_BUDGET_<step>=S       time box of a step in seconds (defaults in STEPS below)
#   GPU_CHECK_DEADLINE=480          total seconds; a step gets min(budget, time left); a step that
#                                   would get under GPU_CHECK_MIN_STEP (10) s is SKIP
#   GPU_CHECK_GRACE=10              seconds between SIGINT (pytest still writes its junit XML)
#                                   and SIGKILL when a step runs out of time
#   GPU_CHECK_TEST_TIMEOUT=60       per-test timeout (pytest-timeout, when installed)
#   GPU_CHECK_BUILD_DIR=build/gpu   CMake build directory
#   GPU_CHECK_CUDA_ARCHS=90         CMAKE_CUDA_ARCHITECTURES
#   GPU_CHECK_JOBS=$(nproc)         build parallelism
#   GPU_CHECK_SANITIZER_TESTS="..." pytest node ids for memcheck/racecheck (space-separated)
#   GPU_CHECK_BENCH_ARGS="..."      benchmarks/run.py arguments of the op benchmark
#   GPU_CHECK_BENCH_L4_ARGS="..."   the same for Llama 4's ops ("" skips them)
#   GPU_CHECK_BENCH_TOWER_ARGS=".." benchmarks/run.py arguments of the tower benchmark ("" = none)
#   GPU_CHECK_BENCH_PACKED_ARGS=".." benchmarks/run.py arguments of the packed-encoding benchmark (W10; "" = none)
#   GPU_CHECK_COMMIT=<sha>          recorded in env.json (the GPU machine's copy may have no .git)
# Test hooks (tests/test_gpu_check.py):
#   GPU_CHECK_FAKE_GPU=1|0          pretend a CUDA device is present / absent (skip the probe)
#   GPU_CHECK_DRY_RUN=1             same as --dry-run
#   GPU_CHECK_STEP_CMD_<step>="..." run this shell command instead of the step (same exit-code
#                                   contract; it may write a detail line to "$GPU_CHECK_DETAIL")
#
# Adding a step: write a function step_<name> (runs in the repository root, stdout/stderr go to
# $OUT/logs/<name>.log; return 0 PASS, 77 SKIP, 78 NOTESTS, anything else FAIL; `detail "text"`
# sets the summary text) and add one line to STEPS.
set -uo pipefail

# ---------------------------------------------------------------------------------------------
# The steps, in order: name, budget (s), needs a GPU, dependencies (comma-separated or -), what.
# ---------------------------------------------------------------------------------------------
STEPS=(
  "env             15  no   -           environment: GPU, driver, toolkit, Python packages, source digest"
  "build          180  yes  -           cmake + ninja, CUDA ON for sm_90 only, ptxas -v resource report"
  "build_info      20  yes  build       import vitops from python/: every op has a CUDA kernel"
  "selfcheck       30  yes  build_info  python -m vitops selfcheck: every op on CPU and CUDA vs its reference"
  "pytest_cuda    100  yes  build_info  pytest -m cuda over tests/ (without compile tests and parity file)"
  "parity          90  yes  build_info  tests/test_gemma4_parity.py -m cuda: CUDA tower parity (small configs, E2B and 26B-A4B in bf16)"
  "sync            40  yes  build_info  no host sync in the padded tower forward (sync debug mode error)"
  "memcheck        60  yes  build_info  compute-sanitizer memcheck over a subset of the CUDA op tests"
  "racecheck       45  yes  build_info  compute-sanitizer racecheck over the same subset"
  "bench           75  yes  build_info  benchmarks/run.py --devices cuda (HF eager vs vitops)"
  "pytest_compile  60  yes  build_info  pytest -m cuda -k compile (torch.compile/inductor on CUDA)"
)

RC_SKIP=77
RC_NOTESTS=78

# Sanitizer subset: one or two small CUDA tests per op, forward and backward, strided and
# out-of-range inputs; no torch.compile (inductor under a sanitizer is minutes), no opcheck.
SANITIZER_TESTS_DEFAULT="
tests/test_patchify.py::test_noncontiguous_and_backward[cuda-bfloat16]
tests/test_factorized_posemb.py::test_noncontiguous_inputs[hf-cuda-bfloat16]
tests/test_factorized_posemb.py::test_cuda_out_of_range_is_nan_and_skipped_in_backward
tests/test_apply_multidimensional_rope.py::test_strided_qkv_views[72-cuda-bfloat16]
tests/test_apply_multidimensional_rope.py::test_cuda_wide_rotation_computes_frequencies_on_device
tests/test_avg_pool_by_positions.py::test_noncontiguous_and_backward[cuda-float32]
tests/test_avg_pool_by_positions.py::test_cuda_skips_out_of_range_patches[index_dtype0]
tests/test_avg_pool_scale_standardize.py::test_backward_matches_reference_autograd[True-cuda-bfloat16]
tests/test_avg_pool_scale_standardize.py::test_cuda_skips_huge_coordinates[wide_image]
tests/test_qkv_norm_rope.py::test_backward_matches_reference_autograd[shape0-cuda-bfloat16]
tests/test_qkv_norm_rope.py::test_contiguous_inputs_and_three_axes[cuda]
tests/test_patchify.py::test_channels_first_equals_hf_llama4_unfold_and_backward[cuda]
tests/test_pixel_shuffle.py::test_leading_dims_strided_and_backward[cuda]
tests/test_pixel_shuffle.py::test_views_read_in_place_or_copied[cuda]
tests/test_avg_pool_rms_norm.py::test_device_forward_backward[cuda]
tests/test_posemb_sincos_2d.py::test_device_table[cuda]
tests/test_qkv_norm_rope.py::test_llama4_orders_match_reference_forward_and_backward[0-cuda-bfloat16]
tests/test_moe_route.py::test_forward_and_backward_match_reference[True-cuda-bfloat16]
tests/test_moe_route.py::test_combine_is_the_inverse_scatter[cuda-float32]
tests/test_moe_route.py::test_cuda_out_of_range_indices_give_nan_rows[cuda]
tests/test_merge_soft_tokens.py::test_forward_and_backward_match_reference[0-cuda-bfloat16]
tests/test_merge_soft_tokens.py::test_noncontiguous_inputs[index_dtype0-cuda]
tests/test_merge_soft_tokens.py::test_cuda_resolves_bad_index_values
"
# memcheck only (racecheck would also report on cuBLAS / SDPA kernels that are not ours)
MEMCHECK_EXTRA_TESTS="tests/test_gemma4_modules.py::test_cuda_padded_forward_does_not_sync"

BENCH_ARGS_DEFAULT="--dtypes bf16 --ops g4_posemb,g4_rope,g4_qkv_norm_rope,g4_pool,g4_pool_by_positions,g4_patchify \
--where T=280 --max-batch 8 --contenders eager,vitops --reps 7 --warmup 2"
# Llama 4's ops (their shapes count tiles, not tokens: a run of their own)
BENCH_L4_ARGS_DEFAULT="--dtypes bf16 --ops l4_pixel_shuffle,l4_rope --max-batch 17 --contenders eager,vitops \
--reps 7 --warmup 2"
BENCH_TOWER_ARGS_DEFAULT="--dtypes bf16 --ops g4_tower --where model=g4-e4b,B=1 --modes fwd \
--contenders eager,vitops --reps 5 --warmup 2 --merge"
# W10: packed mixed-resolution encoding against HF's padded batch (issue 14)
BENCH_PACKED_ARGS_DEFAULT="--dtypes bf16 --ops g4_packed --modes fwd --contenders eager,vitops --reps 5 --warmup 2 \
--merge"

# ---------------------------------------------------------------------------------------------
# Configuration shared by the driver and the step processes
# ---------------------------------------------------------------------------------------------
SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$SELF_DIR/$(basename "${BASH_SOURCE[0]}")"
ROOT=$(cd "$SELF_DIR/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUILD_DIR=${GPU_CHECK_BUILD_DIR:-build/gpu}
case $BUILD_DIR in /*) ;; *) BUILD_DIR="$ROOT/$BUILD_DIR" ;; esac
DEADLINE=${GPU_CHECK_DEADLINE:-480}
GRACE=${GPU_CHECK_GRACE:-10}
MIN_STEP=${GPU_CHECK_MIN_STEP:-10}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-60}
CUDA_ARCHS=${GPU_CHECK_CUDA_ARCHS:-90}
JOBS=${GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}

# Tools: the interpreter's bin directory (pip's cmake/ninja), then the CUDA toolkit, which is
# often installed without being on PATH.
if _py_path=$(command -v "$PY" 2>/dev/null); then
  PATH="$(dirname "$_py_path"):$PATH"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  PATH="$PATH:/usr/local/cuda/bin"
fi
if ! command -v compute-sanitizer >/dev/null 2>&1; then
  for _d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    if [ -x "$_d/compute-sanitizer" ]; then PATH="$PATH:$_d"; break; fi
  done
fi
export PATH
# Steps import vitops from the sources (compiled modules are copied next to them by `build`).
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export TORCHINDUCTOR_CACHE_DIR="$BUILD_DIR/cache/inductor" TRITON_CACHE_DIR="$BUILD_DIR/cache/triton"

now_ms() { date +%s%3N; }
fmt_s() { printf '%d.%d' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); }
detail() { printf '%s\n' "$*" > "${GPU_CHECK_DETAIL:-/dev/null}"; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# ---------------------------------------------------------------------------------------------
# Python helpers (run by "$PY" -c; only the standard library unless noted)
# ---------------------------------------------------------------------------------------------
py_probe() {
  cat <<'EOF'
import sys
try:
    import torch
except Exception as e:
    print(f"torch is not importable by {sys.executable}: {type(e).__name__}: {e}")
    sys.exit(1)
if torch.version.cuda is None:
    print(f"torch {torch.__version__} is a CPU-only build")
    sys.exit(1)
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print(f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})")
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))")
EOF
}

py_env() {
  cat <<'EOF'
import importlib.metadata as md, json, os, platform, sys
out = sys.argv[1]
info = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
            cpu_count=os.cpu_count(), packages={}, devices=[])
info["source"] = {k: os.environ.get("GC_" + k.upper(), "") for k in ("commit", "commit_env", "source_digest")}
info["tools"] = {k: os.environ.get("GC_" + k.upper(), "") for k in (
    "nvidia_smi", "driver", "nvcc", "compute_sanitizer", "cmake", "ninja", "gcc", "cuobjdump")}
for p in ("torch", "transformers", "triton", "numpy", "pytest", "pytest-timeout", "hypothesis", "safetensors",
          "pillow", "scikit-build-core", "pybind11", "ninja", "cmake", "matplotlib"):
    try:
        info["packages"][p] = md.version(p)
    except md.PackageNotFoundError:
        info["packages"][p] = None
rc = 0
try:
    import torch
    info["torch"] = dict(version=torch.__version__, cuda=torch.version.cuda,
                         cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                         cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count(),
                         arch_list=torch.cuda.get_arch_list() if torch.version.cuda else [])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append(dict(name=p.name, capability=f"{p.major}.{p.minor}", total_memory_gib=round(
            p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
            l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1)))
except Exception as e:
    info["torch"] = dict(error=f"{type(e).__name__}: {e}")
    rc = 1
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info, indent=1))
t = info["torch"]
dev = info["devices"][0] if info["devices"] else None
line = (f"{dev['name']} (sm_{dev['capability'].replace('.', '')})" if dev else "no CUDA device") + \
       (f", driver {info['tools']['driver']}" if info["tools"]["driver"] else "") + \
       (f"; torch {t['version']} (CUDA {t['cuda']})" if "version" in t else f"; torch: {t.get('error')}") + \
       f"; transformers {info['packages']['transformers']}" + \
       (f"; nvcc {info['tools']['nvcc']}" if info["tools"]["nvcc"] else "; no nvcc") + \
       f"; commit {(info['source']['commit_env'] or info['source']['commit'] or 'unknown')[:12]}"
with open(os.environ["GPU_CHECK_DETAIL"], "w") as f:
    f.write(line + "\n")
sys.exit(rc)
EOF
}

py_build_info() {
  cat <<'EOF'
import json, os, sys
import torch
import vitops
from vitops import _loader
out = sys.argv[1]
info = vitops.build_info()
info["vitops_file"] = vitops.__file__
json.dump(info, open(out, "w"), indent=1, default=str)
print(json.dumps(info, indent=1, default=str))
problems = []
src = os.path.realpath(os.path.join(os.getcwd(), "python", "vitops"))
if os.path.dirname(os.path.realpath(vitops.__file__)) != src:
    problems.append(f"imported {vitops.__file__}, not the sources in {src}")
if not _loader.HAS_CUDA_KERNELS:
    problems.append("the CUDA kernel library was not loaded")
missing = [op for op, keys in info["backends"].items() if "CUDA" not in keys]
if missing:
    problems.append("no CUDA kernel: " + ", ".join(missing))
if not torch.cuda.is_available():
    problems.append("torch.cuda.is_available() is False")
else:  # one launch, so a missing kernel image for this GPU shows up here and not in every test
    patches, _ = vitops.patchify(torch.rand(1, 8, 8, 3, device="cuda"), 4)
    torch.cuda.synchronize()
msg = "; ".join(problems) if problems else (
    f"{len(info['backends'])} ops with CUDA kernels (archs {info.get('cuda_archs', '?')}, nvcc "
    f"{info.get('cuda_compiler', '?')}), first launch ok")
with open(os.environ["GPU_CHECK_DETAIL"], "w") as f:
    f.write(msg + "\n")
sys.exit(1 if problems else 0)
EOF
}

# ptxas -v output in the build log -> one row per kernel (registers, stack, spills, shared memory).
py_ptxas() {
  cat <<'EOF'
import re, shutil, subprocess, sys
log, out, cache = sys.argv[1], sys.argv[2], sys.argv[3]
rows, cur, obj = [], None, ""
for line in open(log, errors="replace"):
    m = re.search(r"Building CUDA object \S*?([^/\s]+\.cu)\.o", line)
    if m:
        obj = m.group(1)
    m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
    if m:
        cur = dict(kernel=m.group(1), arch=m.group(2), file=obj, registers=None, stack=0, spill_stores=0,
                   spill_loads=0, smem=0, barriers=0)
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["registers"] = int(m.group(1))
        for key, pat in (("smem", r"(\d+) bytes smem"), ("barriers", r"used (\d+) barriers")):
            mm = re.search(pat, line)
            if mm:
                cur[key] = int(mm.group(1))
names = [r["kernel"] for r in rows]
if names and shutil.which("c++filt"):
    try:
        dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             timeout=30).stdout.splitlines()
        if len(dem) == len(names):
            for r, d in zip(rows, dem):
                r["demangled"] = d
    except Exception:
        pass
cols = ("registers", "stack", "spill_stores", "spill_loads", "smem", "barriers", "arch", "file")
lines = ["\t".join(str(r[c]) for c in cols) + "\t" + r.get("demangled", r["kernel"]) + "\n" for r in rows]
# ninja recompiles only what changed: keep the previous rows of the files not compiled this time
fresh = {r["file"] for r in rows}
kept = 0
try:
    for line in open(cache).readlines()[1:]:
        if line.split("\t")[7] not in fresh:
            lines.append(line)
            kept += 1
except (OSError, IndexError):
    pass
for path in (out, cache):
    with open(path, "w") as f:
        f.write("\t".join(cols + ("kernel",)) + "\n")
        f.writelines(lines)
table = [l.rstrip("\n").split("\t") for l in lines]
if not table:
    print("no ptxas -v output found in the build log")
else:
    regs = max(int(t[0]) if t[0].isdigit() else 0 for t in table)
    spills = sum(1 for t in table if t[2] != "0" or t[3] != "0")
    stack = sum(1 for t in table if t[1] != "0")
    print(f"{len(table)} kernels, max {regs} registers, {spills} with spills, {stack} with a stack frame"
          + (f" ({kept} from an earlier build)" if kept else ""))
EOF
}

# junit XML -> "COUNTS tests failures errors skipped" then a one-line summary
py_junit() {
  cat <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as e:
    print("COUNTS 0 0 0 0")
    print(f"no junit report ({type(e).__name__})")
    sys.exit(0)
tests = failures = errors = skipped = 0
bad, reasons = [], []
for tc in root.iter("testcase"):
    tests += 1
    name = tc.get("name", "?")
    if tc.find("failure") is not None:
        failures += 1
        bad.append(name)
    elif tc.find("error") is not None:
        errors += 1
        bad.append(name)
    elif tc.find("skipped") is not None:
        skipped += 1
        reasons.append((tc.find("skipped").get("message") or "").strip())
passed = tests - failures - errors - skipped
parts = [f"{passed} passed"]
if failures:
    parts.append(f"{failures} failed")
if errors:
    parts.append(f"{errors} errors")
if skipped:
    parts.append(f"{skipped} skipped")
text = ", ".join(parts)
if bad:
    text += " (" + ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") + ")"
if skipped and skipped == tests:
    text += f"; skip reason: {reasons[0][:120]}"
print(f"COUNTS {tests} {failures} {errors} {skipped}")
print(text)
EOF
}

# Keep the wanted node ids that exist (collected list on stdin); report the missing ones.
py_select() {
  cat <<'EOF'
import sys
collected = [l.strip() for l in open(sys.argv[1]) if "::" in l]
wanted = sys.argv[2].split()
have = set(collected)
keep = [w for w in wanted if w in have]
missing = [w for w in wanted if w not in have]
for m in missing:
    print(f"not collected (renamed?): {m}", file=sys.stderr)
if not keep:  # fall back: the first plain CUDA test of each op file
    seen = set()
    for c in collected:
        f = c.split("::")[0]
        if f not in seen and "compile" not in c and "opcheck" not in c:
            seen.add(f)
            keep.append(c)
    print(f"none of the wanted tests exist; using {len(keep)} fallback tests", file=sys.stderr)
print("\n".join(keep))
EOF
}

py_bench() {
  cat <<'EOF'
import glob, json, math, sys
files = sorted(glob.glob(sys.argv[1] + "/cuda_*.json"))
if not files:
    print("no benchmark JSON written")
    sys.exit(1)
doc = json.load(open(files[-1]))
cases = doc.get("cases", [])
errors = [c for c in cases if c.get("error") or any(v.get("status") == "error" for v in c.get("contenders", {}).values())]
sp = [c["speedup"]["eager"] for c in cases if isinstance(c.get("speedup"), dict) and c["speedup"].get("eager")]
geo = math.exp(sum(math.log(s) for s in sp) / len(sp)) if sp else None
print(f"{len(cases)} cases, {len(errors)} with errors" + (
    f", vitops vs HF eager: geomean {geo:.2f}x (min {min(sp):.2f}x, max {max(sp):.2f}x)" if sp else ""))
for c in errors[:10]:
    print("ERROR", c["op"], c.get("shape_label"), c.get("dtype"), c.get("mode"), c.get("error") or {
        k: v.get("reason") for k, v in c["contenders"].items() if v.get("status") == "error"}, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
}

py_sync() {
  cat <<'EOF'
import sys, torch
from vitops.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer

def batch(cfg, grids, length, device, dtype):
    """HF-style padded patches [B, L, 3p^2] and positions [B, L, 2], padding (-1, -1)."""
    pv = torch.zeros(len(grids), length, cfg.patch_dim)
    pp = torch.full((len(grids), length, 2), -1, dtype=torch.long)
    for b, (rows, cols) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pp[b, : rows * cols] = torch.stack([xs, ys], -1).reshape(-1, 2)
        pv[b, : rows * cols] = torch.rand(rows * cols, cfg.patch_dim)
    return pv.to(device, dtype), pp.to(device)

torch.manual_seed(0)
failures, notes = [], []
for preset in ("e2b", "26b-a4b"):
    cfg = Gemma4VisionConfig.preset(preset, num_layers=2)
    tower = Gemma4VisionEncoderLayer(cfg, device="cuda", dtype=torch.bfloat16).eval()
    pv, pp = batch(cfg, [(45, 54), (36, 63)], 2520, "cuda", torch.bfloat16)  # 280 soft tokens
    for mode in ("fwd", "fwdbwd"):
        def call():
            if mode == "fwd":
                with torch.no_grad():
                    return tower(pv, image_position_ids=pp)
            out, _ = tower(pv.requires_grad_(), image_position_ids=pp)
            out.float().square().sum().backward()
        call(); call()  # warm-up: lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            print(f"{preset} {mode}: no host sync")
        except RuntimeError as e:
            msg = f"{preset} {mode}: synchronises: {str(e).splitlines()[0][:200]}"
            print(msg)
            import traceback; traceback.print_exc()
            (failures if mode == "fwd" else notes).append(msg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            pv.requires_grad_(False)
        torch.cuda.synchronize()
print("FAILURES:", failures)
print("NOTES (backward, not a failure):", notes)
sys.exit(1 if failures else 0)
EOF
}

# ---------------------------------------------------------------------------------------------
# Step helpers
# ---------------------------------------------------------------------------------------------
# run_pytest NAME [--allow-empty] PYTEST_ARGS...   junit XML in $OUT/junit/NAME.xml
run_pytest() {
  local name=$1
  shift
  local allow_empty=0
  if [ "${1:-}" = --allow-empty ]; then allow_empty=1; shift; fi
  local junit="$OUT/junit/$name.xml"
  mkdir -p "$OUT/junit"
  rm -f "$junit"
  local extra=()
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then extra+=(--timeout="$TEST_TIMEOUT"); fi
  echo "+ $PY -m pytest ${extra[*]} $*"
  "$PY" -m pytest -p no:cacheprovider -q -rfE --durations=15 --junitxml="$junit" "${extra[@]}" "$@"
  local rc=$?
  local summary counts text last
  last=$(tail -n 1 "${STEP_LOG:-/dev/null}" 2>/dev/null | sed 's/^=* *//; s/ *=*$//')
  summary=$("$PY" -c "$(py_junit)" "$junit" 2>&1)
  counts=$(printf '%s\n' "$summary" | sed -n 1p)
  text=$(printf '%s\n' "$summary" | sed -n 2p)
  echo "junit: $text"
  # shellcheck disable=SC2086
  set -- $counts
  local tests=${2:-0} skipped=${5:-0}
  case $rc in
    0)
      if [ "$tests" -gt 0 ] && [ "$skipped" -eq "$tests" ]; then
        detail "all $tests tests skipped: ${text#*; skip reason: }"
        return 1
      fi
      detail "$text"
      return 0
      ;;
    5)
      detail "no tests collected${last:+ ($last)}"
      if [ $allow_empty = 1 ]; then return $RC_NOTESTS; fi
      return 1
      ;;
    2) detail "interrupted: $text" ;;
    *) detail "pytest exit $rc: $text" ;;
  esac
  return $rc
}

# sanitizer_selection TOOL NODE_IDS: the node ids that are collected today (one per line). The
# collection (-m cuda over their files) runs once and is shared by the sanitizer steps.
sanitizer_selection() {
  local tool=$1 wanted=$2 f files=()
  local collected="$OUT/sanitizer/collected.txt"
  mkdir -p "$OUT/sanitizer"
  if [ ! -s "$collected" ]; then
    # every file any sanitizer step may want, so the cached collection serves all of them
    while read -r f; do
      if [ -f "$f" ]; then files+=("$f"); else echo "test file missing: $f" >&2; fi
    done < <(printf '%s\n' "$SANITIZER_TESTS_DEFAULT $MEMCHECK_EXTRA_TESTS ${GPU_CHECK_SANITIZER_TESTS:-}" |
      tr ' ' '\n' | sed '/^$/d; s/::.*//' | sort -u)
    [ ${#files[@]} -gt 0 ] || return 0
    "$PY" -m pytest -p no:cacheprovider --collect-only -q -m cuda "${files[@]}" > "$collected" 2>&1
  fi
  "$PY" -c "$(py_select)" "$collected" "$wanted" 2>&1 > "$OUT/sanitizer/selection_$tool.txt" |
    sed 's/^/selection: /' >&2
  cat "$OUT/sanitizer/selection_$tool.txt"
}

# run_sanitizer TOOL EXTRA_TESTS [compute-sanitizer options...]
run_sanitizer() {
  local tool=$1 more=$2
  shift 2
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    detail "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    return $RC_SKIP
  fi
  compute-sanitizer --version | tail -n 1
  local tests=()
  mapfile -t tests < <(sanitizer_selection "$tool" "${GPU_CHECK_SANITIZER_TESTS:-$SANITIZER_TESTS_DEFAULT} $more")
  if [ ${#tests[@]} -eq 0 ]; then
    detail "no sanitizer tests selected"
    return 1
  fi
  printf 'selected: %s\n' "${tests[@]}"
  local logs="$OUT/sanitizer"
  mkdir -p "$OUT/junit"
  rm -f "$logs/$tool".*.log "$OUT/junit/$tool.xml"
  compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 86 \
    --log-file "$logs/$tool.%p.log" "$@" \
    "$PY" -m pytest -p no:cacheprovider -q -rfE --junitxml="$OUT/junit/$tool.xml" "${tests[@]}"
  local rc=$?
  local summaries errors=0 n
  summaries=$(grep -h "ERROR SUMMARY" "$logs/$tool".*.log 2>/dev/null)
  echo "sanitizer summaries: ${summaries:-none}"
  while read -r n; do errors=$(( errors + n )); done < <(printf '%s\n' "$summaries" | sed -n 's/.*ERROR SUMMARY: \([0-9][0-9]*\).*/\1/p')
  local summary text counts
  summary=$("$PY" -c "$(py_junit)" "$OUT/junit/$tool.xml" 2>&1)
  counts=$(printf '%s\n' "$summary" | sed -n 1p)
  text=$(printf '%s\n' "$summary" | sed -n 2p)
  if [ "$errors" -gt 0 ] || [ $rc -eq 86 ]; then
    echo "== first $tool findings"
    grep -h -m 40 -A 12 -E "^========= (Invalid|Race|Error|Program hit|Uninitialized|Barrier|Malloc|Cuda API|Leaked)" \
      "$logs/$tool".*.log | head -n 60
    detail "$errors $tool errors in ${#tests[@]} tests ($text); logs sanitizer/$tool.*.log"
    return 1
  fi
  if [ $rc -ne 0 ]; then
    detail "pytest exit $rc under $tool, no sanitizer errors ($text)"
    return 1
  fi
  if [ -z "$summaries" ]; then
    detail "no ERROR SUMMARY in the $tool logs ($text)"
    return 1
  fi
  # shellcheck disable=SC2086
  set -- $counts
  if [ "${2:-0}" -eq 0 ] || [ "${5:-0}" -eq "${2:-0}" ]; then
    detail "nothing ran under $tool: $text"
    return 1
  fi
  detail "0 errors in ${#tests[@]} tests ($text)"
  return 0
}

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
section() { printf '\n== %s\n' "$1"; }
first_line() { "$@" 2>/dev/null | sed -n 1p; }

source_digest() {
  # Sorted content hash of the sources (no compiled files): compare with `gpu_check.sh --digest`
  # run on a checkout of the commit in question.
  find csrc python tests tools benchmarks cmake CMakeLists.txt pyproject.toml -type f \
    \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.sh' \
    -o -name '*.cmake' -o -name '*.txt' -o -name '*.toml' -o -name '*.in' \) \
    -not -path '*/__pycache__/*' -not -name '_build_info.py' -not -path 'benchmarks/results/*' 2>/dev/null |
    LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -c1-16
}

step_env() {
  local env_txt="$OUT/env.txt"
  export GC_COMMIT GC_COMMIT_ENV GC_SOURCE_DIGEST GC_NVIDIA_SMI GC_DRIVER GC_NVCC GC_COMPUTE_SANITIZER \
    GC_CMAKE GC_NINJA GC_GCC GC_CUOBJDUMP
  GC_COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
  GC_COMMIT_ENV=${GPU_CHECK_COMMIT:-}
  GC_SOURCE_DIGEST=$(source_digest)
  GC_NVIDIA_SMI=$(command -v nvidia-smi || true)
  GC_DRIVER=$(first_line nvidia-smi --query-gpu=driver_version --format=csv,noheader)
  GC_NVCC=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  GC_COMPUTE_SANITIZER=$(compute-sanitizer --version 2>/dev/null | tail -n 1)
  GC_CMAKE=$(first_line cmake --version)
  GC_NINJA=$(first_line ninja --version)
  GC_GCC=$(first_line "${CXX:-g++}" --version)
  GC_CUOBJDUMP=$(command -v cuobjdump || true)
  {
    echo "# tools/gpu_check.sh environment, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    section "host"
    uname -a
    echo "nproc: $(nproc)"
    free -g 2>&1 | head -n 2
    df -h . 2>&1 | tail -n 1
    section "source"
    echo "commit (git): ${GC_COMMIT:-unknown (no .git)}"
    echo "commit (GPU_CHECK_COMMIT): ${GC_COMMIT_ENV:-unset}"
    git log -1 --format='%h %ci %s' 2>/dev/null || true
    git status --short 2>/dev/null | head -n 30
    echo "source digest: $GC_SOURCE_DIGEST"
    section "nvidia-smi"
    if [ -n "$GC_NVIDIA_SMI" ]; then
      nvidia-smi 2>&1
      nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem,power.limit,persistence_mode,mig.mode.current \
        --format=csv 2>&1
      nvidia-smi topo -m 2>&1 | head -n 20
    else
      echo "nvidia-smi: not found"
    fi
    section "nvcc ($(command -v nvcc || echo 'not found'))"
    if command -v nvcc >/dev/null; then nvcc --version 2>&1; fi
    section "compute-sanitizer ($(command -v compute-sanitizer || echo 'not found'))"
    if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version 2>&1; fi
    section "build tools"
    echo "cmake: $GC_CMAKE ($(command -v cmake || echo 'not found'))"
    echo "ninja: $GC_NINJA ($(command -v ninja || echo 'not found'))"
    echo "c++: $GC_GCC"
    echo "cuobjdump: ${GC_CUOBJDUMP:-not found}"
    section "python ($(command -v "$PY" || echo "$PY: not found"))"
  } > "$env_txt" 2>&1
  "$PY" -c "$(py_env)" "$OUT/env.json" >> "$env_txt" 2>&1
  local rc=$?
  cat "$env_txt"
  return $rc
}

step_build() {
  local nvcc_bin tool
  if ! nvcc_bin=$(command -v nvcc); then
    detail "nvcc not found (PATH, /usr/local/cuda/bin)"
    return 1
  fi
  for tool in cmake ninja; do
    if ! command -v "$tool" >/dev/null; then detail "$tool not found"; return 1; fi
  done
  local flags="-lineinfo -Xptxas=-v ${GPU_CHECK_CUDA_FLAGS:-}"
  section "configure ($BUILD_DIR, CUDA archs $CUDA_ARCHS, flags $flags)"
  if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$(command -v "$PY")" -DVITOPS_CUDA=ON -DVITOPS_CUDA_EMULATION=OFF \
      -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" -DCMAKE_CUDA_FLAGS="$flags"; then
    detail "cmake configure failed: $(grep -m 1 -E 'CMake Error|FATAL|error' "$STEP_LOG" | cut -c1-200)"
    return 1
  fi
  section "build (-j $JOBS)"
  local t0
  t0=$(now_ms)
  if ! cmake --build "$BUILD_DIR" -j "$JOBS"; then
    detail "compile failed: $(grep -m 1 -E 'error|FAILED' "$STEP_LOG" | cut -c1-200)"
    return 1
  fi
  local build_s
  build_s=$(fmt_s $(( $(now_ms) - t0 )))
  section "copy compiled modules to python/vitops"
  cp -f "$BUILD_DIR"/_C*.so "$BUILD_DIR"/_build_info.py python/vitops/ || { detail "copy failed"; return 1; }
  rm -f python/vitops/_vitops_cuda.so python/vitops/_vitops_cuda_emu.so
  if [ ! -f "$BUILD_DIR"/_vitops_cuda.so ]; then
    detail "built, but no _vitops_cuda.so (CUDA kernels not built)"
    return 1
  fi
  cp -f "$BUILD_DIR"/_vitops_cuda.so python/vitops/
  ls -l python/vitops/*.so
  section "ptxas resource usage -> ptxas_resources.tsv"
  local ptxas
  ptxas=$("$PY" -c "$(py_ptxas)" "$STEP_LOG" "$OUT/ptxas_resources.tsv" "$BUILD_DIR/ptxas_resources.tsv" 2>&1)
  echo "$ptxas"
  if command -v cuobjdump >/dev/null 2>&1; then
    cuobjdump --dump-resource-usage "$BUILD_DIR"/_vitops_cuda.so > "$OUT/cuobjdump_resource_usage.txt" 2>&1 || true
  fi
  detail "built in $build_s s (sm_$CUDA_ARCHS); ptxas: $ptxas"
  return 0
}

step_build_info() {
  "$PY" -c "$(py_build_info)" "$OUT/build_info.json"
}

step_selfcheck() {
  local rc
  "$PY" -m vitops selfcheck
  rc=$?
  if [ $rc -eq 0 ]; then detail "every op matches its reference on CPU and CUDA"; else
    detail "selfcheck failed (see table in logs/selfcheck.log)"; fi
  return $rc
}

step_pytest_cuda() {
  run_pytest pytest_cuda -m cuda -k "not compile" --ignore=tests/test_gemma4_parity.py tests
}

step_parity() {
  if [ ! -f tests/test_gemma4_parity.py ]; then
    detail "tests/test_gemma4_parity.py does not exist"
    return $RC_NOTESTS
  fi
  run_pytest parity --allow-empty -m cuda tests/test_gemma4_parity.py
}

step_sync() {
  local rc1 rc2
  section "pytest tests/test_gemma4_modules.py::test_cuda_padded_forward_does_not_sync"
  run_pytest sync tests/test_gemma4_modules.py::test_cuda_padded_forward_does_not_sync
  rc1=$?
  section "released presets (2 layers), bfloat16, padded batch of 2 at 280 soft tokens"
  "$PY" -c "$(py_sync)"
  rc2=$?
  local fwd_bwd
  fwd_bwd=$(grep -c 'fwdbwd: synchronises' "$STEP_LOG" 2>/dev/null)
  if [ $rc1 -ne 0 ] || [ $rc2 -ne 0 ]; then
    detail "host sync in the padded forward (test rc $rc1, presets rc $rc2)"
    return 1
  fi
  detail "no host sync in the padded forward (small config, e2b, 26b-a4b); forward+backward syncs in ${fwd_bwd:-0} of 2 presets"
  return 0
}

step_memcheck() {
  # No caching allocator: every tensor is its own allocation, so overruns are not hidden in a pool.
  local pad=() help
  help=$(compute-sanitizer --help 2>/dev/null)
  case $help in *--padding*) pad=(--padding 256) ;; esac
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_sanitizer memcheck "$MEMCHECK_EXTRA_TESTS" "${pad[@]}"
}

step_racecheck() {
  run_sanitizer racecheck ""
}

step_bench() {
  local args=${GPU_CHECK_BENCH_ARGS:-$BENCH_ARGS_DEFAULT}
  local l4_args=${GPU_CHECK_BENCH_L4_ARGS-$BENCH_L4_ARGS_DEFAULT}
  local tower_args=${GPU_CHECK_BENCH_TOWER_ARGS-$BENCH_TOWER_ARGS_DEFAULT}
  local packed_args=${GPU_CHECK_BENCH_PACKED_ARGS-$BENCH_PACKED_ARGS_DEFAULT}
  local rc=0 rc2=0
  mkdir -p "$OUT/bench"
  section "ops: benchmarks/run.py --devices cuda $args"
  # shellcheck disable=SC2086
  "$PY" benchmarks/run.py --devices cuda --no-progress --out "$OUT/bench" $args || rc=$?
  if [ -n "$l4_args" ]; then
    section "Llama 4 ops: benchmarks/run.py --devices cuda $l4_args"
    # shellcheck disable=SC2086
    "$PY" benchmarks/run.py --devices cuda --no-progress --out "$OUT/bench" --merge $l4_args || rc=$?
  fi
  if [ -n "$tower_args" ]; then
    section "tower: benchmarks/run.py --devices cuda $tower_args"
    # shellcheck disable=SC2086
    "$PY" benchmarks/run.py --devices cuda --no-progress --out "$OUT/bench" $tower_args || rc2=$?
  fi
  if [ -n "$packed_args" ]; then
    section "packed: benchmarks/run.py --devices cuda $packed_args"
    # shellcheck disable=SC2086
    "$PY" benchmarks/run.py --devices cuda --no-progress --out "$OUT/bench" $packed_args || rc2=$?
  fi
  local f
  for f in "$OUT"/bench/cuda_*.json; do
    [ -f "$f" ] && "$PY" benchmarks/summarize.py "$f" > "$OUT/bench/summary.md" 2>&1
  done
  local text
  text=$("$PY" -c "$(py_bench)" "$OUT/bench")
  local rc3=$?
  if [ $rc -ne 0 ] || [ $rc2 -ne 0 ]; then
    detail "benchmarks/run.py exit $rc/$rc2; $text"
    return 1
  fi
  detail "$text"
  return $rc3
}

step_pytest_compile() {
  run_pytest pytest_compile -m cuda -k compile --ignore=tests/test_gemma4_parity.py tests
}

# What to print for a failing step: the tail of its log (the build: its error lines).
tail_build() { grep -n -m 25 -E 'error|FAILED|CMake Error' "$1" || tail -n 15 "$1"; }

# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
declare -a NAMES=() BUDGETS=() NEEDS=() DEPS=() WHATS=()
parse_steps() {
  local line name budget needs deps what
  for line in "${STEPS[@]}"; do
    read -r name budget needs deps what <<<"$line"
    NAMES+=("$name")
    BUDGETS+=("$budget")
    NEEDS+=("$needs")
    DEPS+=("$deps")
    WHATS+=("$what")
  done
}

declare -A STATUS_OF=() DETAIL_OF=()
declare -a R_NAME=() R_STATUS=() R_SECS=() R_DETAIL=() R_JSON=()
STARTED_UTC=""
GPU_NAME=""
NO_GPU_REASON=""
FINAL_RC=""

json_str() {  # a JSON string literal (no subprocess unless the text has control characters)
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  case $s in *[[:cntrl:]]*) s=$(printf '%s' "$s" | tr '\n\t\r' '   ' | tr -d '\000-\037') ;; esac
  printf '"%s"' "$s"
}

write_results() {
  local complete=$1 i tmp="$OUT/results.json.tmp" finished=null gpu=null reason=null fake=false dry=false
  if [ "$complete" = true ]; then finished=$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)"); fi
  if [ -n "$GPU_NAME" ]; then gpu=$(json_str "$GPU_NAME"); fi
  if [ -n "$NO_GPU_REASON" ]; then reason=$(json_str "$NO_GPU_REASON"); fi
  if [ "${GPU_CHECK_FAKE_GPU:-}" = 1 ]; then fake=true; fi
  if [ "$DRY_RUN" = 1 ]; then dry=true; fi
  {
    printf '{\n  "tool": "tools/gpu_check.sh",\n  "schema_version": 1,\n'
    printf '  "started_utc": "%s",\n  "finished_utc": %s,\n  "complete": %s,\n  "exit_code": %s,\n' \
      "$STARTED_UTC" "$finished" "$complete" "${FINAL_RC:-null}"
    printf '  "out": %s,\n  "gpu": %s,\n  "no_gpu_reason": %s,\n  "fake_gpu": %s,\n  "dry_run": %s,\n' \
      "$(json_str "$OUT")" "$gpu" "$reason" "$fake" "$dry"
    printf '  "deadline_s": %s,\n  "total_seconds": %s,\n  "steps": [' "$DEADLINE" "$(fmt_s $(( $(now_ms) - START_MS )))"
    for i in "${!R_JSON[@]}"; do
      [ "$i" -gt 0 ] && printf ','
      printf '\n    %s' "${R_JSON[$i]}"
    done
    printf '\n  ]\n}\n'
  } > "$tmp" && mv -f "$tmp" "$OUT/results.json"
}

record() {  # record NAME STATUS SECONDS BUDGET DETAIL
  local log=null
  [ -f "$OUT/logs/$1.log" ] && log="\"logs/$1.log\""
  R_NAME+=("$1")
  R_STATUS+=("$2")
  R_SECS+=("$3")
  R_DETAIL+=("$5")
  R_JSON+=("{\"name\": \"$1\", \"status\": \"$2\", \"seconds\": $3, \"budget_s\": $4, \"detail\": $(json_str "$5"), \"log\": $log}")
  STATUS_OF[$1]=$2
  DETAIL_OF[$1]=$5
  printf '[gpu_check] %-15s %-8s %6s s  %s\n' "$1" "$2" "$3" "${5:0:160}"
  write_results false
}

run_step() {  # run_step NAME TIMEOUT_S BUDGET_S
  local name=$1 limit=$2 budget=$3
  local log="$OUT/logs/$name.log" detail_file="$OUT/logs/.$name.detail"
  : > "$detail_file"
  local t0 rc ms
  t0=$(now_ms)
  GPU_CHECK_DETAIL="$detail_file" STEP_LOG="$log" STEP_NAME="$name" \
    timeout -s INT -k "$GRACE" "$limit" bash "$SELF" __step "$name" > "$log" 2>&1 < /dev/null
  rc=$?
  ms=$(( $(now_ms) - t0 ))
  local d status
  d=$(tr '\n' ' ' < "$detail_file" | sed 's/ *$//')
  rm -f "$detail_file"
  if [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $ms -ge $(( limit * 1000 )) ]; }; then
    status=TIMEOUT
    d="ran out of its ${limit} s${d:+; $d}"
  elif [ $rc -eq 0 ]; then
    status=PASS
  elif [ $rc -eq $RC_SKIP ]; then
    status=SKIP
  elif [ $rc -eq $RC_NOTESTS ]; then
    status=NOTESTS
  else
    status=FAIL
    d=${d:-exit code $rc}
  fi
  record "$name" "$status" "$(fmt_s $ms)" "$budget" "$d"
}

probe_gpu() {
  local out rc
  case "${GPU_CHECK_FAKE_GPU:-}" in
    1) GPU_NAME="fake GPU (GPU_CHECK_FAKE_GPU=1)"; return 0 ;;
    0) NO_GPU_REASON="GPU_CHECK_FAKE_GPU=0"; return 1 ;;
  esac
  out=$(timeout 120 "$PY" -c "$(py_probe)" 2>&1 < /dev/null)
  rc=$?
  printf '%s\n' "$out" > "$OUT/logs/gpu_probe.log"
  if [ $rc -eq 0 ]; then
    GPU_NAME=$(printf '%s\n' "$out" | tail -n 1)
    return 0
  fi
  NO_GPU_REASON=$(printf '%s\n' "$out" | tail -n 1 | cut -c1-200)
  [ -n "$NO_GPU_REASON" ] || NO_GPU_REASON="probe exit $rc"
  if command -v nvidia-smi >/dev/null 2>&1; then
    NO_GPU_REASON="$NO_GPU_REASON; nvidia-smi -L: $(nvidia-smi -L 2>&1 | head -n 1 | cut -c1-120)"
  else
    NO_GPU_REASON="$NO_GPU_REASON; nvidia-smi not found"
  fi
  return 1
}

in_list() {  # in_list WORD "a,b,c"
  case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; }

list_steps() {
  local i
  printf '%-15s %6s  %-4s %-12s %s\n' step budget gpu depends what
  for i in "${!NAMES[@]}"; do
    printf '%-15s %6s  %-4s %-12s %s\n' "${NAMES[$i]}" "$(effective_budget "$i")" "${NEEDS[$i]}" "${DEPS[$i]}" "${WHATS[$i]}"
  done
}

effective_budget() {
  local i=$1 var
  var="GPU_CHECK_BUDGET_${NAMES[$i]}"
  printf '%s' "${!var:-${BUDGETS[$i]}}"
}

print_summary() {
  local i n=0
  {
    printf '\n== gpu_check summary: %s, %s s total (deadline %s s), results in %s\n' \
      "${GPU_NAME:-no GPU}" "$(fmt_s $(( $(now_ms) - START_MS )))" "$DEADLINE" "$OUT"
    printf '%-15s %-8s %7s  %s\n' step status seconds detail
    for i in "${!R_NAME[@]}"; do
      printf '%-15s %-8s %7s  %s\n' "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_SECS[$i]}" "${R_DETAIL[$i]:0:200}"
    done
    case $FINAL_RC in
      0) echo "gpu_check: exit 0 (every step passed)" ;;
      3) echo "gpu_check: exit 3 (no usable CUDA device: $NO_GPU_REASON)" ;;
      *)
        local bad=""
        for i in "${!R_NAME[@]}"; do
          case ${R_STATUS[$i]} in PASS | NOTESTS) ;; *) bad="$bad ${R_NAME[$i]}=${R_STATUS[$i]}" ;; esac
        done
        echo "gpu_check: exit $FINAL_RC (not passed:$bad)"
        ;;
    esac
  } > "$OUT/summary.txt"
  # Tails of the logs of failed / timed-out steps first, the summary table last.
  for i in "${!R_NAME[@]}"; do
    case ${R_STATUS[$i]} in FAIL | TIMEOUT) ;; *) continue ;; esac
    n=$(( n + 1 ))
    local log="$OUT/logs/${R_NAME[$i]}.log"
    [ -f "$log" ] || continue
    if [ $n -gt 6 ]; then echo "(more logs: $log)"; continue; fi
    printf '\n--- %s (%s): end of %s\n' "${R_NAME[$i]}" "${R_STATUS[$i]}" "logs/${R_NAME[$i]}.log"
    if declare -F "tail_${R_NAME[$i]}" >/dev/null; then
      "tail_${R_NAME[$i]}" "$log"
    else
      tail -n 20 "$log"
    fi | cut -c1-220 | tail -c 1100
  done
  cat "$OUT/summary.txt"
}

clean_out() {
  # Only what this script writes, never the whole directory.
  rm -rf "$OUT/logs" "$OUT/junit" "$OUT/sanitizer" "$OUT/bench"
  rm -f "$OUT/results.json" "$OUT/summary.txt" "$OUT/env.txt" "$OUT/env.json" "$OUT/build_info.json" \
    "$OUT/ptxas_resources.tsv" "$OUT/cuobjdump_resource_usage.txt"
}

main() {
  parse_steps
  case "${1:-}" in
    -h | --help) usage; return 0 ;;
    --list) list_steps; return 0 ;;
    --digest) source_digest; return 0 ;;
    --dry-run) DRY_RUN=1; export GPU_CHECK_DRY_RUN=1; shift ;;
    "") ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; return 2 ;;
  esac
  [ $# -eq 0 ] || { echo "gpu_check: unexpected arguments: $*" >&2; return 2; }

  local selected=${GPU_CHECK_STEPS:-} skipped=${GPU_CHECK_SKIP:-} w i
  for w in ${selected//,/ } ${skipped//,/ }; do
    in_list "$w" "$(IFS=,; echo "${NAMES[*]}")" || { echo "gpu_check: unknown step '$w' (--list)" >&2; return 2; }
  done
  for i in "${!NAMES[@]}"; do
    is_uint "$(effective_budget "$i")" || { echo "gpu_check: GPU_CHECK_BUDGET_${NAMES[$i]} must be whole seconds" >&2; return 2; }
  done
  for w in "$DEADLINE" "$GRACE" "$MIN_STEP"; do
    is_uint "$w" || { echo "gpu_check: GPU_CHECK_DEADLINE/GRACE/MIN_STEP must be whole seconds" >&2; return 2; }
  done

  if [ -z "${OUT:-}" ]; then
    OUT="$ROOT/build/gpu_check_out"
    echo "[gpu_check] OUT is not set: results go to $OUT"
  fi
  mkdir -p "$OUT" || return 2
  OUT=$(cd "$OUT" && pwd)
  export OUT
  clean_out
  mkdir -p "$OUT/logs"
  START_MS=$(now_ms)
  STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  echo "[gpu_check] $STARTED_UTC  root $ROOT  python $PY  out $OUT  deadline $DEADLINE s$(
    [ "$DRY_RUN" = 1 ] && echo '  (dry run)')"

  local have_gpu=1
  probe_gpu || have_gpu=0
  if [ $have_gpu = 1 ]; then echo "[gpu_check] GPU: $GPU_NAME"; else echo "[gpu_check] no usable CUDA device: $NO_GPU_REASON"; fi
  # Build for the GPU that is there (sm_90 on the H200) unless told otherwise.
  local arch
  arch=$(printf '%s\n' "$GPU_NAME" | sed -n 's/.*(sm_\([0-9][0-9]*\),.*/\1/p')
  if [ -z "${GPU_CHECK_CUDA_ARCHS:-}" ] && [ -n "$arch" ] && [ "$arch" != "$CUDA_ARCHS" ]; then
    echo "[gpu_check] building for sm_$arch (the device's), not sm_$CUDA_ARCHS"
    export GPU_CHECK_CUDA_ARCHS=$arch
  fi

  local name budget needs deps dep limit left reason
  for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    if [ -n "$selected" ] && ! in_list "$name" "$selected"; then continue; fi
    if [ -n "$skipped" ] && in_list "$name" "$skipped"; then continue; fi
    budget=$(effective_budget "$i")
    needs=${NEEDS[$i]}
    deps=${DEPS[$i]}
    reason=""
    if [ "$needs" = yes ] && [ $have_gpu = 0 ]; then
      reason="no CUDA device: $NO_GPU_REASON"
    fi
    if [ -z "$reason" ] && [ "$deps" != - ]; then
      for dep in ${deps//,/ }; do
        [ -n "${STATUS_OF[$dep]+x}" ] || continue  # not run in this invocation: assumed met
        if [ "${STATUS_OF[$dep]}" != PASS ]; then
          if [ "${STATUS_OF[$dep]}" = SKIP ]; then reason=${DETAIL_OF[$dep]}; else reason="$dep ${STATUS_OF[$dep]}"; fi
          break
        fi
      done
    fi
    if [ -z "$reason" ]; then
      left=$(( (START_MS + DEADLINE * 1000 - $(now_ms)) / 1000 - GRACE ))
      limit=$budget
      [ "$left" -lt "$limit" ] && limit=$left
      if [ "$limit" -lt "$MIN_STEP" ]; then
        reason="total time (GPU_CHECK_DEADLINE=$DEADLINE s) used up"
      fi
    fi
    if [ -n "$reason" ]; then
      record "$name" SKIP 0.0 "$budget" "$reason"
      continue
    fi
    run_step "$name" "$limit" "$budget"
  done

  if [ $have_gpu = 0 ]; then
    FINAL_RC=3
  else
    FINAL_RC=0
    for i in "${!R_STATUS[@]}"; do
      case ${R_STATUS[$i]} in PASS | NOTESTS) ;; *) FINAL_RC=1 ;; esac
    done
  fi
  write_results true
  print_summary
  return "$FINAL_RC"
}

if [ "${1:-}" = __step ]; then
  # A step process (started by run_step under `timeout`): its output is the step's log.
  _name=${2:?step name}
  _cmd_var="GPU_CHECK_STEP_CMD_$_name"
  if [ -n "${!_cmd_var:-}" ]; then
    exec bash -c "${!_cmd_var}"
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: step $_name not run"
    detail "dry run"
    exit 0
  fi
  if ! declare -F "step_$_name" >/dev/null; then
    echo "gpu_check: no function step_$_name" >&2
    exit 1
  fi
  "step_$_name"
  exit $?
fi

main "$@"
exit $?

#!/usr/bin/env bash
# AddressSanitizer pass without a GPU (the stand-in for compute-sanitizer memcheck, and the memory
# check of the CPU kernels): builds the CPU kernels (_C) and the CUDA emulator library with
# AddressSanitizer into build/asan, assembles a vitops package from them in build/asan/pkg, and runs
#   * tests/test_cuda_emulated.py: every CUDA kernel under the emulator (an out-of-bounds access by a
#     kernel thread is reported with its stack),
#   * tests/test_fuzz.py with VITOPS_FUZZ_SCALE (default 4) times the cases of a normal run: valid
#     and invalid calls of every op on the CPU kernels and the emulated CUDA kernels,
#   * the per-op test files (tests/test_<op>.py) and the shared op tests of the manifest (test_ops_common.py).
#   PYTHON=/path/to/python tools/asan.sh [extra pytest arguments]
# PYTHON's environment needs torch, pytest and the test dependencies (tools/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# An absolute path: CMake resolves Python_EXECUTABLE from the build directory (a relative venv path
# would miss, and FindPython would pick another interpreter without torch).
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; *) PY=$(command -v "$PY") ;; esac
BUILD=build/asan
SANITIZE="-fsanitize=address -fno-omit-frame-pointer"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" \
  -DVITOPS_CUDA=OFF -DVITOPS_CUDA_EMULATION=ON -DVITOPS_SANITIZE_FLAGS="$SANITIZE" >/dev/null
cmake --build "$BUILD" -j "${BUILD_JOBS:-2}"

# A package made of the sources and the sanitized libraries (the installed vitops stays untouched).
PKG="$PWD/$BUILD/pkg"
rm -rf "$PKG"
mkdir -p "$PKG"
cp -r python/vitops "$PKG/vitops"
find "$PKG/vitops" -name '*.so' -delete
find "$PKG/vitops" -name '__pycache__' -prune -exec rm -rf {} +
cp "$BUILD"/_C*.so "$BUILD"/_build_info.py "$BUILD"/_vitops_cuda_emu.so "$PKG/vitops/"

LIBASAN=$(${CXX:-g++} -print-file-name=libasan.so)
# libstdc++ preloaded too: ASan must resolve the real __cxa_throw at start-up (python is C).
LIBSTDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so)
# Python and torch are not instrumented: leak checking would only report their allocations.
# Reports go to files: pytest captures stderr at the descriptor level and an abort loses it.
REPORTS="$PWD/$BUILD/asan-report"
rm -f "$REPORTS".*
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0:log_path="$REPORTS"
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export PYTHONPATH="$PKG:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export VITOPS_FUZZ_SCALE=${VITOPS_FUZZ_SCALE:-4}
where=$("$PY" -c "import vitops, os; print(os.path.dirname(vitops.__file__))")
if [ "$where" != "$PKG/vitops" ]; then
  echo "asan.sh: 'import vitops' resolves to $where, not the sanitized build in $PKG/vitops" >&2
  echo "  (an editable install of vitops takes precedence over PYTHONPATH: use a regular install)" >&2
  exit 2
fi
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py tests/test_fuzz.py tests/test_patchify.py \
  tests/test_factorized_posemb.py tests/test_apply_multidimensional_rope.py tests/test_avg_pool_by_positions.py \
  tests/test_avg_pool_scale_standardize.py tests/test_qkv_norm_rope.py tests/test_pixel_shuffle.py \
  tests/test_avg_pool_rms_norm.py tests/test_posemb_sincos_2d.py tests/test_merge_soft_tokens.py \
  tests/test_ops_common.py "$@"
rc=$?
set -e
# ASan warns once that it does not fully support swapcontext (the emulator's fibers); only an
# ERROR report is a finding.
if grep -l "ERROR: AddressSanitizer" "$REPORTS".* >/dev/null 2>&1; then
  cat "$REPORTS".*
  exit 1
fi
exit $rc

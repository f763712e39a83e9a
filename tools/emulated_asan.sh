#!/usr/bin/env bash
# Stand-in for compute-sanitizer memcheck without a GPU: builds the CUDA emulator library with
# AddressSanitizer (build/emu-asan) and runs tests/test_cuda_emulated.py against it, so an
# out-of-bounds global-memory access by a kernel thread is reported with its stack.
#   PYTHON=/path/to/python tools/emulated_asan.sh [extra pytest arguments]
# Needs vitops itself built: a developer build in python/vitops (tools/dev_build.sh), else the
# package installed in PYTHON's environment (tools/setup.sh), as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=build/emu-asan
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DVITOPS_CUDA=OFF -DVITOPS_CUDA_EMULATION=ON \
  -DVITOPS_EMU_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" >/dev/null
cmake --build "$BUILD" -j "${BUILD_JOBS:-2}" --target vitops_cuda_emu
LIBASAN=$(${CXX:-g++} -print-file-name=libasan.so)
# libstdc++ preloaded too: ASan must resolve the real __cxa_throw at start-up (python is C).
LIBSTDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so)
# Python and torch are not instrumented: leak checking would only report their allocations.
# Reports go to files: pytest captures stderr at the descriptor level and an abort loses it.
REPORTS="$PWD/$BUILD/asan-report"
SOURCES=""
if compgen -G "python/vitops/_C*.so" >/dev/null; then SOURCES="python:"; fi
rm -f "$REPORTS".*
set +e
VITOPS_CUDA_EMULATOR_LIB="$PWD/$BUILD/_vitops_cuda_emu.so" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0:log_path="$REPORTS" \
  LD_PRELOAD="$LIBASAN $LIBSTDCXX" PYTHONPATH="$SOURCES"tests \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py "$@"
rc=$?
set -e
# ASan warns once that it does not fully support swapcontext (the emulator's fibers); only an
# ERROR report is a finding.
if grep -l "ERROR: AddressSanitizer" "$REPORTS".* >/dev/null 2>&1; then
  cat "$REPORTS".*
  exit 1
fi
exit $rc

#!/usr/bin/env bash
# Developer build without pip: configure + build with CMake into build/dev-<name>, then copy the
# compiled modules next to the sources so `PYTHONPATH=python` imports them.
#   PYTHON=/path/to/python VITOPS_CUDA=OFF tools/dev_build.sh [name]
# VITOPS_CUDA_EMULATION=ON (default here) also builds _vitops_cuda_emu.so, the CUDA kernels for the
# CPU emulator that tests/test_cuda_emulated.py runs; OFF skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# An absolute path: CMake resolves Python_EXECUTABLE from the build directory.
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; *) PY=$(command -v "$PY") ;; esac
NAME=${1:-default}
BUILD=build/dev-$NAME
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" \
  -DVITOPS_CUDA="${VITOPS_CUDA:-AUTO}" -DVITOPS_CUDA_EMULATION="${VITOPS_CUDA_EMULATION:-ON}" >/dev/null
cmake --build "$BUILD" -j "${BUILD_JOBS:-2}"
cp -f "$BUILD"/_C*.so "$BUILD"/_build_info.py python/vitops/
rm -f python/vitops/_vitops_cuda.so
if [ -f "$BUILD"/_vitops_cuda.so ]; then cp -f "$BUILD"/_vitops_cuda.so python/vitops/; fi
rm -f python/vitops/_vitops_cuda_emu.so
if [ -f "$BUILD"/_vitops_cuda_emu.so ]; then cp -f "$BUILD"/_vitops_cuda_emu.so python/vitops/; fi
echo "built $BUILD -> python/vitops"

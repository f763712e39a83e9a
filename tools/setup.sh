#!/usr/bin/env bash
# Set up from scratch: a virtual environment with torch, the build tools and the test/demo
# dependencies, then build and install vitops into it (no build isolation: vitops compiles
# against the torch in this environment).
#   VITOPS_TORCH=2.14.1 (default) | 2.13.0 ...   which torch to install
#   VITOPS_VENV=.venv (default)                     where
#   VITOPS_BENCH_DEPS=1                              also install matplotlib + tqdm (benchmarks)
#   VITOPS_CUDA=AUTO|ON|OFF                          build the CUDA kernels (AUTO: when torch is a
#                                                    CUDA build and nvcc is found)
#   VITOPS_CUDA_EMULATION=ON (default) | OFF         also build _vitops_cuda_emu.so: the CUDA kernels
#                                                    for the CPU emulator (tests/test_cuda_emulated.py)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${VITOPS_TORCH:-2.14.1}
VENV=${VITOPS_VENV:-.venv}
PY=${PYTHON:-python3}
TRANSFORMERS_VERSION=${VITOPS_TRANSFORMERS:-5.18.0}

# nvcc is often installed but not on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
have_torch=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have_torch" != "${TORCH_VERSION%%+*}" ]; then
  echo "== installing torch==$TORCH_VERSION"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi
# torchvision is what HF's fast (torch-backend) image processors import; its release must match
# torch's, so it is installed where the pair is known (the tests that need it skip elsewhere, and
# fail under CI=true).
case "${TORCH_VERSION%%+*}" in
  2.14.1) TORCHVISION="torchvision==0.29.1" ;;
  *) TORCHVISION="" ;;
esac
echo "== installing build tools and test dependencies"
"$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.25" numpy pytest \
  "transformers==$TRANSFORMERS_VERSION" safetensors pillow tqdm $TORCHVISION
# The other supported transformers release (vitops.hf.patch checks its code), unpacked beside the
# venv for tests/test_hf_patch.py, which runs it in a subprocess with PYTHONPATH (the venv keeps
# $TRANSFORMERS_VERSION). VITOPS_SECOND_TRANSFORMERS="" skips it.
SECOND_TRANSFORMERS=${VITOPS_SECOND_TRANSFORMERS-5.17.0}
if [ -n "$SECOND_TRANSFORMERS" ] && [ ! -d "$VENV/transformers-$SECOND_TRANSFORMERS/transformers" ]; then
  echo "== unpacking transformers==$SECOND_TRANSFORMERS into $VENV/transformers-$SECOND_TRANSFORMERS"
  "$VPY" -m pip install -q --target "$VENV/transformers-$SECOND_TRANSFORMERS" \
    "transformers==$SECOND_TRANSFORMERS" "huggingface-hub>=1.5,<2"
fi
if [ "${VITOPS_BENCH_DEPS:-0}" = 1 ]; then
  # optional extras of benchmarks/run.py: the PNG plot and the progress bar (it runs without them)
  echo "== installing benchmark extras"
  "$VPY" -m pip install -q matplotlib tqdm
fi
echo "== building vitops (VITOPS_CUDA=${VITOPS_CUDA:-AUTO}, VITOPS_CUDA_EMULATION=${VITOPS_CUDA_EMULATION:-ON})"
start=$(date +%s)
"$VPY" -m pip install -q --no-build-isolation --no-deps \
  -Cbuild-dir="build/{wheel_tag}-torch$TORCH_VERSION" \
  -Ccmake.define.VITOPS_CUDA="${VITOPS_CUDA:-AUTO}" \
  -Ccmake.define.VITOPS_CUDA_EMULATION="${VITOPS_CUDA_EMULATION:-ON}" .
echo "== built and installed vitops in $(( $(date +%s) - start )) s"
"$VPY" -c "import json, vitops; print(json.dumps(vitops.build_info()))"

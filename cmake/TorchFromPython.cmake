# Locate the torch that the building Python imports, without find_package(Torch).
#
# Why not find_package(Torch): on a CUDA build of torch it runs torch's own CUDA discovery
# (which errors without a toolkit and injects its own arch flags), and it links the full C++
# API. vitops kernels use only the LibTorch stable ABI (headers + the C shim in libtorch_cpu /
# libtorch_cuda), so the include directory and two libraries are all we need.
#
# Sets: VITOPS_TORCH_VERSION, VITOPS_TORCH_CUDA (version string or "None"),
#       VITOPS_TORCH_INCLUDE_DIR, VITOPS_TORCH_LIB_DIR, VITOPS_TORCH_CXX11_ABI

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(torch.__version__); print(torch.version.cuda); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _vitops_torch_out
  ERROR_VARIABLE _vitops_torch_err
  RESULT_VARIABLE _vitops_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _vitops_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "vitops: torch is not importable by ${Python_EXECUTABLE}.\n"
    "Install torch first, then build without build isolation, e.g.\n"
    "    pip install torch scikit-build-core pybind11 ninja cmake\n"
    "    pip install --no-build-isolation .\n"
    "(An isolated build cannot see your torch and would compile against a different one.)\n"
    "Python said: ${_vitops_torch_err}")
endif()
string(REPLACE "\n" ";" _vitops_torch_lines "${_vitops_torch_out}")
list(GET _vitops_torch_lines 0 VITOPS_TORCH_VERSION)
list(GET _vitops_torch_lines 1 VITOPS_TORCH_CUDA)
list(GET _vitops_torch_lines 2 _vitops_torch_dir)
list(GET _vitops_torch_lines 3 VITOPS_TORCH_CXX11_ABI)
set(VITOPS_TORCH_INCLUDE_DIR "${_vitops_torch_dir}/include")
set(VITOPS_TORCH_LIB_DIR "${_vitops_torch_dir}/lib")
if(VITOPS_TORCH_VERSION VERSION_LESS 2.10)
  message(FATAL_ERROR "vitops needs torch >= 2.10 (LibTorch stable ABI); found ${VITOPS_TORCH_VERSION}")
endif()
message(STATUS "vitops: torch ${VITOPS_TORCH_VERSION} (CUDA ${VITOPS_TORCH_CUDA}) at ${_vitops_torch_dir}")

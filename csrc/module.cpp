// The Python extension module vitops._C. Importing it runs the static registrations of every
// schema and CPU kernel (operators are reached through torch.ops.vitops, never through pybind11,
// so torch.compile can trace them). pybind11 only exposes facts about the build.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitops compiled library: operator schemas, CPU kernels, build information";
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["version"] = VITOPS_VERSION;
        d["built_with_torch"] = VITOPS_BUILT_TORCH_VERSION;
        d["stable_abi_target"] = VITOPS_TORCH_TARGET_VERSION_STR;
        d["cuda_compiler"] = VITOPS_BUILT_CUDA_VERSION;
        d["cuda_archs"] = VITOPS_CUDA_ARCHS;
        d["cpu_arch"] = VITOPS_CPU_ARCH_STR;
#if defined(__clang__)
        d["cxx_compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
        d["cxx_compiler"] = "gcc " __VERSION__;
#else
        d["cxx_compiler"] = "unknown";
#endif
        return d;
      },
      "Facts recorded in the compiled library when it was built.");
}

"""Loads the compiled vitops libraries and explains what to do when that fails."""

from __future__ import annotations

import importlib
import os
import sys

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

HAS_C_OPS = False
HAS_CUDA_KERNELS = False


def library_path(filename: str) -> str:
    """Where the compiled file ``filename`` (e.g. ``_vitops_cuda.so``) of this vitops lives: next to
    the sources for a regular or a developer build, or wherever the import system maps
    ``vitops.<stem>`` for an editable install (scikit-build-core keeps those files out of the
    source tree)."""
    import importlib.util

    stem = filename.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(f"vitops.{stem}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    return os.path.join(_PKG_DIR, filename)


def _built_info():
    try:
        from . import _build_info

        return _build_info
    except ImportError:
        return None


def _rebuild_hint() -> str:
    return (
        "Rebuild vitops against the torch you run:\n"
        "    pip install --no-build-isolation --force-reinstall --no-deps <path to vitops>\n"
        "(install torch first; see README.md 'Install')."
    )


def load() -> None:
    """Import vitops._C (schemas + CPU kernels) and, when present, the CUDA kernel library."""
    global HAS_C_OPS, HAS_CUDA_KERNELS
    info = _built_info()
    built_for = getattr(info, "torch_version", "an unknown torch")
    if info is None:
        raise ImportError(
            "vitops: the compiled library is missing (no vitops/_build_info.py next to the sources). "
            "vitops must be built before it is imported.\n" + _rebuild_hint()
        )
    runtime = torch.__version__.split("+")[0]
    target = tuple(int(x) for x in info.torch_target_version.split("."))
    if tuple(int(x) for x in runtime.split(".")[:2]) < target:
        raise ImportError(
            f"vitops was built for torch {built_for} (stable ABI, needs torch >= {info.torch_target_version}) "
            f"but torch {torch.__version__} is running.\n" + _rebuild_hint()
        )
    try:
        importlib.import_module("vitops._C")
    except ImportError as e:
        raise ImportError(
            f"vitops: could not load its compiled library vitops._C (built for torch {built_for}, "
            f"Python {sys.version_info.major}.{sys.version_info.minor} is running with torch {torch.__version__}): {e}\n"
            + _rebuild_hint()
        ) from e
    HAS_C_OPS = True
    cuda_lib = library_path("_vitops_cuda.so")
    if info.with_cuda and os.path.exists(cuda_lib):
        if torch.version.cuda is None:
            # A CUDA build of vitops under a CPU-only torch: the CPU kernels still work.
            return
        try:
            torch.ops.load_library(cuda_lib)
        except OSError as e:
            raise ImportError(
                f"vitops: could not load its CUDA kernels ({cuda_lib}), built with nvcc {info.nvcc_version} "
                f"for torch {built_for} (CUDA {info.torch_cuda_version}); running torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}): {e}\n" + _rebuild_hint()
            ) from e
        HAS_CUDA_KERNELS = True


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.vitops.<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{op}", dispatch_key)

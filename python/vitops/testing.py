"""Test helpers that are not part of the vitops API.

``load_cuda_emulator()`` loads ``_vitops_cuda_emu.so`` (built with ``VITOPS_CUDA_EMULATION=ON``):
the CUDA kernels and their launchers compiled for a CPU execution emulator and registered as the
CPU kernels of ``torch.ops.vitops_emu`` (same schemas as ``torch.ops.vitops``), so they can be
checked against the references without a GPU. ``import vitops`` never loads it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _loader

# VITOPS_CUDA_EMULATOR_LIB picks another build (tools/asan.sh: an AddressSanitizer one).
_EMULATOR = os.environ.get("VITOPS_CUDA_EMULATOR_LIB") or _loader.library_path("_vitops_cuda_emu.so")
_loaded = False


def cuda_emulator_path() -> str:
    return _EMULATOR


def cuda_emulator_built() -> bool:
    """Whether this vitops was configured with VITOPS_CUDA_EMULATION=ON (so the library must exist)."""
    info = _loader._built_info()
    return bool(getattr(info, "with_cuda_emulation", False))


def load_cuda_emulator() -> bool:
    """Load the CUDA emulator library once; False when it was not built."""
    global _loaded
    if _loaded:
        return True
    if not os.path.exists(_EMULATOR):
        return False
    torch.ops.load_library(_EMULATOR)
    _loaded = True
    return True


@contextlib.contextmanager
def emulator_schedule(schedule: int):
    """Run the emulated kernels with threads in ascending (0) or descending (1) order between barriers."""
    previous = torch.ops.vitops_emu._set_schedule(schedule)
    try:
        yield
    finally:
        torch.ops.vitops_emu._set_schedule(previous)

"""vitops: exact and fast vision towers (Gemma 4, Gemma 3, Llama 4) for PyTorch.

Operators live in ``torch.ops.vitops`` (C++/CUDA kernels with fake kernels and autograd);
``vitops.ops`` holds their functional wrappers, ``vitops.reference`` the pure-PyTorch references.
Both load with ``import vitops`` (the fake kernels must be registered before torch.compile traces
an op). The model families load on first use: ``vitops.layers`` (shared layers),
``vitops.models.<maxtext module>``, ``vitops.hf``, ``vitops.keras_hub`` and ``vitops.preprocess``
(one module per family in each).
"""

from __future__ import annotations

import torch

from . import _loader

_loader.load()

from . import reference  # noqa: E402
from . import ops  # noqa: E402  (registers fake kernels and autograd)
from .ops import (  # noqa: E402
    apply_multidimensional_rope,
    avg_pool_by_positions,
    avg_pool_rms_norm,
    avg_pool_scale_standardize,
    factorized_posemb,
    merge_soft_tokens,
    moe_combine,
    moe_route,
    patchify,
    pixel_shuffle,
    posemb_sincos_2d,
    qkv_norm_rope,
)

__version__ = "0.1.0"

from .ops._manifest import MANIFEST as _MANIFEST  # noqa: E402

OPS = tuple(e.name for e in _MANIFEST)  # every operator (the op manifest, vitops/ops/_manifest.py)


def build_info() -> dict:
    """Versions vitops was built with and runs with, and which backends have kernels for each op."""
    from . import _C, _build_info

    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["torch_cuda_runtime"] = torch.version.cuda
    info["built_torch_cuda"] = _build_info.torch_cuda_version
    info["cuda_available"] = torch.cuda.is_available()
    info["backends"] = {
        op: [key for key in ("CPU", "CUDA") if _loader.has_kernel(op, key)] for op in OPS
    }
    return info


__all__ = [
    "apply_multidimensional_rope",
    "avg_pool_by_positions",
    "avg_pool_rms_norm",
    "avg_pool_scale_standardize",
    "build_info",
    "factorized_posemb",
    "merge_soft_tokens",
    "moe_combine",
    "moe_route",
    "ops",
    "patchify",
    "pixel_shuffle",
    "posemb_sincos_2d",
    "qkv_norm_rope",
    "reference",
]

from ._lazy import lazy_getattr  # noqa: E402

_FAMILY_PACKAGES = ("layers", "models", "hf", "keras_hub", "preprocess", "serving", "testing")
__getattr__ = lazy_getattr(__name__, _FAMILY_PACKAGES, {})


def __dir__():
    return sorted(set(globals()) | set(_FAMILY_PACKAGES))

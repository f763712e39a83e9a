"""Functional wrappers of the vitops operators (one module per op).

Importing this package registers every op's fake kernel (for torch.compile / FakeTensor) and its
autograd formula; the kernels themselves come from the compiled library.
"""

from .apply_multidimensional_rope import apply_multidimensional_rope
from .avg_pool_by_positions import avg_pool_by_positions
from .avg_pool_rms_norm import avg_pool_rms_norm
from .avg_pool_scale_standardize import avg_pool_scale_standardize
from .factorized_posemb import factorized_posemb
from .merge_soft_tokens import merge_soft_tokens
from .moe_combine import moe_combine
from .moe_route import moe_route
from .patchify import patchify
from .pixel_shuffle import pixel_shuffle
from .posemb_sincos_2d import posemb_sincos_2d
from .qkv_norm_rope import qkv_norm_rope

__all__ = [
    "apply_multidimensional_rope",
    "avg_pool_by_positions",
    "avg_pool_rms_norm",
    "avg_pool_scale_standardize",
    "factorized_posemb",
    "merge_soft_tokens",
    "moe_combine",
    "moe_route",
    "patchify",
    "pixel_shuffle",
    "posemb_sincos_2d",
    "qkv_norm_rope",
]

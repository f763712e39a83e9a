"""KerasHub-style Gemma 3 entry point: ``vitops.keras_hub.Gemma3VisionEncoder``.

Same constructor arguments and call convention as ``keras_hub.models.Gemma3VisionEncoder``
(keras-hub 0.32, ``keras_hub/src/models/gemma3/gemma3_vision_encoder.py``), as a thin ``nn.Module``
over the shared tower (:mod:`vitops.models.gemma3`): NHWC images ``[B, N, image_size, image_size, 3]``
in, ``[B * N, (image_size // patch_size // pool_size) ** 2, output_dim]`` out (KerasHub flattens the
batch and image axes), with KerasHub's pooling (``pool_size x pool_size`` windows, a remainder of
the grid dropped) and its output block (Gemma RMSNorm ``x * (1 + scale)`` in float32, then a
bias-free projection).

Where this differs from KerasHub, deliberately: ``pool_size`` defaults to 14 as KerasHub's does, but
Gemma 3 uses 4 (KerasHub's converter passes 4; the default is kept only for argument compatibility);
``dtype="bfloat16"`` runs the tower in bfloat16 (KerasHub silently replaces it by float32); the
tower follows HF's numerics (the reference of this project), which KerasHub matches for these
layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.gemma3 import Gemma3VisionConfig, Gemma3VisionEncoderLayer, VisionEmbedder, VisionExit, encode_images
from ._common import check_epsilon, check_positive_int, resolve_dtype

__all__ = ["Gemma3VisionEncoder"]

_CONFIG_KEYS = ("image_size", "patch_size", "num_heads", "hidden_dim", "num_layers", "intermediate_dim", "output_dim",
                "pool_size", "layer_norm_epsilon")


class Gemma3VisionEncoder(nn.Module):
    """Gemma 3 vision encoder + projection into the text model (KerasHub API).

    Called with images ``[B, N, image_size, image_size, 3]`` (KerasHub feeds [-1, 1] pixels, HF's
    normalization); returns ``[B * N, num_vision_tokens_per_image, output_dim]``.
    """

    def __init__(self, image_size, patch_size, num_heads, hidden_dim, num_layers, intermediate_dim, output_dim,
                 pool_size=14, layer_norm_epsilon=1e-6, dtype=None, **kwargs):
        super().__init__()
        kwargs.pop("name", None)  # Keras layer kwargs that have no meaning here
        kwargs.pop("trainable", None)
        if kwargs:
            raise TypeError(f"Gemma3VisionEncoder: unexpected arguments {sorted(kwargs)}")
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_heads", num_heads),
                            ("hidden_dim", hidden_dim), ("num_layers", num_layers),
                            ("intermediate_dim", intermediate_dim), ("output_dim", output_dim),
                            ("pool_size", pool_size)):
            check_positive_int("Gemma3VisionEncoder", name, value)
        if hidden_dim % num_heads:
            raise ValueError(f"Gemma3VisionEncoder: hidden_dim ({hidden_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if image_size % patch_size:
            raise ValueError(f"Gemma3VisionEncoder: image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        side = image_size // patch_size
        if pool_size > side:
            raise ValueError(f"Gemma3VisionEncoder: pool_size ({pool_size}) is larger than the {side}x{side} patch grid")
        check_epsilon("Gemma3VisionEncoder", layer_norm_epsilon)
        torch_dtype = resolve_dtype("Gemma3VisionEncoder", dtype)

        # KerasHub stores every constructor argument under its own name (get_config reads them back).
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.intermediate_dim = intermediate_dim
        self.output_dim = output_dim
        self.pool_size = pool_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_vision_tokens_per_image = side**2 // pool_size**2
        tokens = (side // pool_size) ** 2
        # the config's exit needs the pool to divide the grid; KerasHub's floor pooling (the VisionExit
        # set below) does not, so a non-dividing pool_size gets a placeholder token count here
        self.config = Gemma3VisionConfig(
            hidden_size=hidden_dim, intermediate_size=intermediate_dim, num_layers=num_layers, num_heads=num_heads,
            image_size=image_size, patch_size=patch_size, layer_norm_eps=float(layer_norm_epsilon),
            mm_tokens_per_image=tokens if side % pool_size == 0 else side * side, text_hidden_size=output_dim)
        self.encoder = Gemma3VisionEncoderLayer(self.config, dtype=torch_dtype)
        self.encoder.VisionExit = VisionExit(tokens, pool_size=pool_size)
        self.projector = VisionEmbedder(self.config, dtype=torch_dtype)

    def get_config(self) -> dict:
        """KerasHub's ``get_config()`` entries (``dtype`` is not part of it, as in KerasHub)."""
        return {name: getattr(self, name) for name in _CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict) -> "Gemma3VisionEncoder":
        return cls(**config)

    def forward(self, images: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        """``training``: Keras's flag (True applies dropout; the released config has none); None
        follows ``self.training``."""
        s = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or tuple(images.shape[2:]) != (s, s, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Gemma3VisionEncoder: images must be [batch, images, {s}, {s}, 3], got {shape}")
        deterministic = None if training is None else not training
        # [B, N, tokens, output_dim]; the pooling and the norm are one op where the pool tiles the grid
        return encode_images(self.encoder, self.projector, images, deterministic).flatten(0, 1)

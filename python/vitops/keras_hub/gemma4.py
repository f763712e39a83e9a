"""KerasHub-style Gemma 4 entry point: ``vitops.keras_hub.Gemma4VisionEncoder``.

Same constructor arguments and call convention as ``keras_hub.models.Gemma4VisionEncoder``, as a
thin ``nn.Module`` over the shared tower (:mod:`vitops.models.gemma4_vision`): it only checks the
arguments, reshapes ``[B, I, N, ...]`` to ``[B*I, N, ...]`` and projects to ``output_dim``.

Numerics follow HF, not KerasHub, where they differ: the pooled grid width is per image (KerasHub
takes the maximum x over the whole batch), bounds of clipped linears start at +-inf (KerasHub:
+-65504) and the tower runs in the module dtype (KerasHub forces float32 inside the tower when a
dtype is given).

Like KerasHub's, the constructor accepts every configuration KerasHub accepts: ``image_size`` is
nominal (the tower takes any image the processor produces; KerasHub's HF converter builds every
released checkpoint with ``image_size=896``, which 16 * 3 does not divide) and only sets
``num_vision_tokens_per_image``. Only the invariants the computation needs are checked.
"""

from __future__ import annotations

from torch import nn

from ..models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector
from ._common import check_epsilon, check_positive_int, resolve_dtype

__all__ = ["Gemma4VisionEncoder"]

_CONFIG_KEYS = ("image_size", "patch_size", "num_heads", "hidden_dim", "num_layers", "intermediate_dim", "head_dim",
                "output_dim", "num_key_value_heads", "pool_size", "position_embedding_size", "rope_max_wavelength",
                "layer_norm_epsilon", "dropout", "use_clipped_linears", "standardize")

class Gemma4VisionEncoder(nn.Module):
    """Gemma 4 vision encoder + projection into the text model (KerasHub API).

    Called with ``{"pixel_values": [B, I, N, p*p*3], "pixel_position_ids": [B, I, N, 2]}`` (pixels
    in [0, 1]; padding patches at position (-1, -1)); returns ``[B, I, N // pool_size**2,
    output_dim]``. Slots that received no patch (padding) hold values computed from zeros; pass
    ``return_mask=True`` to also get the ``[B, I, pooled]`` validity mask.
    """

    def __init__(self, image_size, patch_size, num_heads, hidden_dim, num_layers, intermediate_dim, head_dim,
                 output_dim, num_key_value_heads=None, pool_size=3, position_embedding_size=1024,
                 rope_max_wavelength=100.0, layer_norm_epsilon=1e-6, dropout=0, use_clipped_linears=True,
                 standardize=False, dtype=None, **kwargs):
        super().__init__()
        kwargs.pop("name", None)  # Keras layer kwargs that have no meaning here
        kwargs.pop("trainable", None)
        if kwargs:
            raise TypeError(f"Gemma4VisionEncoder: unexpected arguments {sorted(kwargs)}")
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_heads", num_heads),
                            ("hidden_dim", hidden_dim), ("num_layers", num_layers),
                            ("intermediate_dim", intermediate_dim), ("head_dim", head_dim),
                            ("output_dim", output_dim), ("pool_size", pool_size),
                            ("position_embedding_size", position_embedding_size)):
            check_positive_int("Gemma4VisionEncoder", name, value)
        if num_key_value_heads is None:
            num_key_value_heads = num_heads
        check_positive_int("Gemma4VisionEncoder", "num_key_value_heads", num_key_value_heads)
        if num_heads % num_key_value_heads:
            raise ValueError(f"Gemma4VisionEncoder: num_heads ({num_heads}) must be divisible by "
                             f"num_key_value_heads ({num_key_value_heads})")
        if head_dim % 4:
            # Gemma 4 does not need hidden_dim == num_heads * head_dim, but its 2-D RoPE rotates
            # head_dim/2 channels per axis with a half split.
            raise ValueError(f"Gemma4VisionEncoder: head_dim must be divisible by 4 (2-D RoPE), got {head_dim}")
        if not isinstance(rope_max_wavelength, (int, float)) or rope_max_wavelength <= 0:
            raise ValueError(f"Gemma4VisionEncoder: rope_max_wavelength must be positive, got {rope_max_wavelength!r}")
        check_epsilon("Gemma4VisionEncoder", layer_norm_epsilon)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"Gemma4VisionEncoder: dropout must be in [0, 1), got {dropout!r}")
        torch_dtype = resolve_dtype("Gemma4VisionEncoder", dtype)

        # KerasHub stores every constructor argument under its own name (get_config reads them back).
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.output_dim = output_dim
        self.num_key_value_heads = num_key_value_heads
        self.pool_size = pool_size
        self.position_embedding_size = position_embedding_size
        self.rope_max_wavelength = rope_max_wavelength
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.use_clipped_linears = use_clipped_linears
        self.standardize = standardize
        self.num_vision_tokens_per_image = (image_size // patch_size // pool_size) ** 2
        self.config = Gemma4VisionConfig(
            hidden_size=hidden_dim, intermediate_size=intermediate_dim, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_key_value_heads, head_dim=head_dim, patch_size=patch_size, pooling_kernel_size=pool_size,
            position_embedding_size=position_embedding_size, rope_theta=float(rope_max_wavelength),
            rms_norm_eps=float(layer_norm_epsilon), use_clipped_linears=bool(use_clipped_linears),
            standardize=bool(standardize), text_hidden_size=output_dim,
            # KerasHub's `dropout`: the attention probabilities and both residual branches
            attention_dropout=float(dropout), residual_dropout=float(dropout),
        )
        self.encoder = Gemma4VisionEncoderLayer(self.config, dtype=torch_dtype)
        self.projector = Gemma4VisionProjector(self.config, dtype=torch_dtype)

    def get_config(self) -> dict:
        """KerasHub's ``get_config()``: the 16 constructor arguments (``num_key_value_heads``
        resolved; ``dtype`` is not part of it, as in KerasHub)."""
        return {name: getattr(self, name) for name in _CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict) -> "Gemma4VisionEncoder":
        return cls(**config)

    def forward(self, inputs: dict, training: bool | None = None, return_mask: bool = False):
        """``training``: Keras's flag (True applies dropout); None follows ``self.training``."""
        try:
            pixel_values, positions = inputs["pixel_values"], inputs["pixel_position_ids"]
        except (TypeError, KeyError) as e:
            raise ValueError("Gemma4VisionEncoder expects a dict with 'pixel_values' and 'pixel_position_ids'") from e
        if pixel_values.dim() != 4 or positions.dim() != 4 or positions.shape[-1] != 2:
            raise ValueError(
                "Gemma4VisionEncoder: pixel_values must be [batch, images, patches, patch_dim] and pixel_position_ids "
                f"[batch, images, patches, 2], got {tuple(pixel_values.shape)} and {tuple(positions.shape)}"
            )
        if pixel_values.shape[-1] != self.config.patch_dim:
            raise ValueError(f"Gemma4VisionEncoder: patch_dim must be 3 * patch_size**2 = {self.config.patch_dim}, "
                             f"got {pixel_values.shape[-1]}")
        deterministic = None if training is None else not training
        embeddings, mask = self.encoder(pixel_values, deterministic, image_position_ids=positions)
        out = self.projector(embeddings)
        return (out, mask) if return_mask else out

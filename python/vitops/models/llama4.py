"""Llama 4, mirroring ``maxtext.models.llama4`` (PyTorch form: a config object instead of config + mesh).

The layer-pattern helpers of the decoder are here; the vision tower and the decoder layers build
on ``vitops.layers`` and the ``vitops.ops`` kernels (``qkv_norm_rope`` with ``pairing="interleaved"``
computes the vision RoPE).
"""

from __future__ import annotations

__all__ = ["determine_is_moe_layer", "determine_is_nope_layer"]


def determine_is_nope_layer(layer_id: int, nope_layer_interval: int | None) -> bool:
    """True if the 0-based layer ``layer_id`` uses no RoPE (NoPE): every ``nope_layer_interval``-th
    layer, i.e. ``(layer_id + 1) % interval == 0`` (interval 4: layers 3, 7, 11, ...). None or an
    interval <= 0 means no NoPE layer (MaxText's ``base.yml`` default is -1). The polarity is the
    inverse of HF's ``no_rope_layers[i]`` (1 = RoPE)."""
    return nope_layer_interval is not None and nope_layer_interval > 0 and (layer_id + 1) % nope_layer_interval == 0


def determine_is_moe_layer(layer_id: int, interleave_moe_layer_step: int | None) -> bool:
    """True if the 0-based layer ``layer_id`` is an MoE layer: step 1 makes every layer MoE, step 2
    layers 1, 3, 5, ... (``(layer_id + 1) % step == 0``, HF's ``range(step - 1, L, step)``). None or a
    step <= 0 means no MoE layer (HF raises instead)."""
    return (interleave_moe_layer_step is not None and interleave_moe_layer_step > 0
            and (layer_id + 1) % interleave_moe_layer_step == 0)

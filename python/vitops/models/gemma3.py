"""Gemma 3, mirroring ``maxtext.models.gemma3`` (PyTorch form: a config object instead of config + mesh).

The decoder's layer-pattern helpers are here; the SigLIP vision tower and the decoder layers build
on ``vitops.layers`` and the ``vitops.ops`` kernels (``qkv_norm_rope`` with
``norm="scale_plus_one"`` computes the text attention's q/k norms and RoPE).
"""

from __future__ import annotations

from typing import Any

from ..layers import AttentionType

__all__ = ["GEMMA3_ATTENTION_PATTERN", "get_attention_type", "get_query_pre_attn_scalar"]

# Five sliding-window layers, then one global layer (HF: "sliding_attention" if (i + 1) % 6 else
# "full_attention").
GEMMA3_ATTENTION_PATTERN = (AttentionType.LOCAL_SLIDING,) * 5 + (AttentionType.GLOBAL,)


def get_attention_type(layer_id: int) -> AttentionType:
    """The attention kind of the 0-based layer ``layer_id``: ``GEMMA3_ATTENTION_PATTERN[layer_id % 6]``."""
    return GEMMA3_ATTENTION_PATTERN[layer_id % len(GEMMA3_ATTENTION_PATTERN)]


def _field(config: Any, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def get_query_pre_attn_scalar(config: Any) -> float:
    """The multiplier applied to q before attention (MaxText's; HF's ``query_pre_attn_scalar ** -0.5``
    for the released models): ``head_dim ** -0.5`` for gemma3-4b and gemma3-12b,
    ``(base_emb_dim // base_num_query_heads) ** -0.5`` (168 ** -0.5) for gemma3-27b; any other
    ``config.model_name`` raises ``ValueError`` as MaxText does. ``config``: an object or a dict."""
    model_name = _field(config, "model_name")
    if model_name in ("gemma3-4b", "gemma3-12b"):
        return _field(config, "head_dim") ** -0.5
    if model_name == "gemma3-27b":
        return (_field(config, "base_emb_dim") // _field(config, "base_num_query_heads")) ** -0.5
    raise ValueError(f"Unsupported model name: {model_name}")

"""HF ``transformers`` interop for the Llama 4 vision model: configs and checkpoints (``vitops.hf.llama4``).

* :func:`config_from_hf` / :func:`to_hf_vision_config`: HF ``Llama4Config`` / ``Llama4VisionConfig``
  (objects, dicts, or a ``config.json`` / checkpoint directory) <-> :class:`Llama4VisionConfig`.
* :func:`load_hf_state_dict`: ``vision_model.*`` and ``multi_modal_projector.*`` (HF's hub names equal
  its in-memory names in 5.18; other prefixes, e.g. a standalone ``Llama4VisionModel``'s bare names,
  are detected) from a state dict, a ``.safetensors`` file or a sharded directory into
  :class:`Llama4VisionModel` / :class:`Llama4MultiModalProjector` (or a tuple). A mismatch raises
  :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.
* :func:`to_hf_state_dict` / :func:`save_hf_safetensors`: the inverse.
* :func:`from_hf`: build (and optionally load) the model + projector from an HF config.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..models.llama4 import Llama4MultiModalProjector, Llama4VisionConfig, Llama4VisionModel
from ._checkpoint import (
    CheckpointMismatchError,
    KeyMap,
    LoadReport,
    Part,
    detect_prefix,
    export_parts,
    load_parts,
    parts_message,
    read_checkpoint,
    read_config,
    save_safetensors,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "config_from_hf",
    "load_hf_config",
    "from_hf",
    "load_hf_state_dict",
    "save_hf_safetensors",
    "to_hf_state_dict",
    "to_hf_vision_config",
]

DEFAULT_VISION_PREFIX = "vision_model."
DEFAULT_PROJECTOR_PREFIX = "multi_modal_projector."
_TOWER_ANCHOR = "patch_embedding.linear.weight"
_PROJECTOR_ANCHOR = "linear_1.weight"
# Non-persistent HF buffers that some exports still carry: harmless, skipped.
_IGNORED_TOWER = re.compile(r"^rotary_embedding\.freqs_ci$")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def load_hf_config(hf_config: Any):
    """An HF ``Llama4Config`` from a dict, a ``config.json`` path or a checkpoint directory. Older saved
    configs give ``text_config.attn_temperature_tuning`` as an int (4), which transformers 5.18's strict
    config rejects: it is coerced to bool (any non-zero value enables the tuning, as it did)."""
    from transformers import Llama4Config

    data = read_config(hf_config)
    if not isinstance(data, dict):
        return data
    data = dict(data)
    text = dict(data.get("text_config") or {})
    if isinstance(text.get("attn_temperature_tuning"), int) and not isinstance(text["attn_temperature_tuning"], bool):
        text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
        data["text_config"] = text
    return Llama4Config(**{k: v for k, v in data.items() if k not in ("architectures", "model_type",
                                                                          "transformers_version")})


def config_from_hf(hf_config: Any, **overrides) -> Llama4VisionConfig:
    """vitops config from an HF ``Llama4Config`` (or its ``vision_config``; objects, dicts, a
    ``config.json`` path or a checkpoint directory)."""
    return Llama4VisionConfig.from_hf(read_config(hf_config), **overrides)


def to_hf_config(config: Llama4VisionConfig, attn_implementation: str | None = "sdpa"):
    """The HF ``Llama4Config`` with the same vision math (text model minimal), for parity tests and exports."""
    from transformers import Llama4Config

    hf = Llama4Config(vision_config=to_hf_vision_config(config, attn_implementation).to_dict(),
                      text_config={"hidden_size": config.text_hidden_size or 5120, "num_hidden_layers": 1,
                                   "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 64,
                                   "intermediate_size_mlp": 64, "vocab_size": 128, "attn_temperature_tuning": True})
    if attn_implementation is not None:
        hf.vision_config._attn_implementation = attn_implementation
    return hf


def to_hf_vision_config(config: Llama4VisionConfig, attn_implementation: str | None = "sdpa"):
    """The HF ``Llama4VisionConfig`` with the same math."""
    from transformers import Llama4VisionConfig as HFVisionConfig

    hf = HFVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, num_channels=config.num_channels,
        image_size=config.image_size, patch_size=config.patch_size, norm_eps=config.norm_eps,
        pixel_shuffle_ratio=config.pixel_shuffle_ratio, projector_input_dim=config.projector_input_dim,
        projector_output_dim=config.projector_output_dim, vision_output_dim=config.vision_output_dim,
        projector_dropout=config.projector_dropout, attention_dropout=config.attention_dropout,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    if attn_implementation is not None:
        hf._attn_implementation = attn_implementation
    return hf


# ---------------------------------------------------------------------------------------------
# Key maps (HF relative name <-> vitops MaxText-style name)
# ---------------------------------------------------------------------------------------------
def _tower_rows() -> list[tuple[str, str, bool]]:
    rows = [
        ("patch_embedding.linear.weight", "unfold_convolution.vit_unfold_linear.weight", True),
        ("class_embedding", "class_embedding", True),
        ("positional_embedding_vlm", "positional_embedding_vlm", True),
        ("vision_adapter.mlp.fc1.weight", "pixel_shuffle_mlp.pixel_shuffle_mlp.vit_pixel_shuffle_mlp_fc1.weight", True),
        ("vision_adapter.mlp.fc2.weight", "pixel_shuffle_mlp.pixel_shuffle_mlp.vit_pixel_shuffle_mlp_fc2.weight", True),
    ]
    for norm in ("layernorm_pre", "layernorm_post"):
        rows += [(f"{norm}.{p}", f"{norm}.{p}", True) for p in ("weight", "bias")]
    layer, ours = "model.layers.{i}.", "encoder.layers_{i}."
    pairs = [("input_layernorm", "input_layer_norm"), ("post_attention_layernorm", "post_attention_layer_norm"),
             ("self_attn.q_proj", "self_attention_vision.query"), ("self_attn.k_proj", "self_attention_vision.key"),
             ("self_attn.v_proj", "self_attention_vision.value"), ("self_attn.o_proj", "self_attention_vision.out"),
             ("mlp.fc1", "mlp.vit_encoder_layer_mlp_fc1"), ("mlp.fc2", "mlp.vit_encoder_layer_mlp_fc2")]
    for hf, mine in pairs:
        rows += [(f"{layer}{hf}.{p}", f"{ours}{mine}.{p}", True) for p in ("weight", "bias")]
    return rows


_TOWER_KEYS = KeyMap(_tower_rows())
_PROJECTOR_KEYS = KeyMap([(_PROJECTOR_ANCHOR, "vit_multi_modal_projector.weight", True)])


def _parts(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, (tuple, list)):
        return [p for t in target if t is not None for p in _parts(t)]
    if isinstance(target, Llama4VisionModel):
        return [("tower", target)]
    if isinstance(target, Llama4MultiModalProjector):
        return [("projector", target)]
    raise TypeError(f"cannot load a Llama 4 vision checkpoint into {type(target).__name__}")


def _specs(target, keys, vision_prefix, projector_prefix) -> list[Part]:
    specs = []
    for kind, module in _parts(target):
        if kind == "tower":
            prefix = vision_prefix
            if prefix is None:
                prefix = detect_prefix(keys, _TOWER_ANCHOR, "vision model")
                prefix = prefix if prefix is not None else _TOWER_KEYS.most_common_prefix(keys)
            specs.append(Part("tower", module, _TOWER_KEYS, prefix, DEFAULT_VISION_PREFIX, ignored=_IGNORED_TOWER))
        else:
            prefix = projector_prefix
            if prefix is None:
                prefix = detect_prefix(keys, _PROJECTOR_ANCHOR, "projector", prefer="multi_modal_projector")
            specs.append(Part("projector", module, _PROJECTOR_KEYS, prefix, DEFAULT_PROJECTOR_PREFIX))
    return specs


def load_hf_state_dict(target, checkpoint, *, strict: bool = True, vision_prefix: str | None = None,
                       projector_prefix: str | None = None) -> LoadReport:
    """Load HF Llama 4 vision (+ projector) weights into ``target`` (a :class:`Llama4VisionModel`, a
    :class:`Llama4MultiModalProjector`, or a tuple). Prefixes are detected from the keys (the text
    before ``patch_embedding.linear.weight`` / ``linear_1.weight``) unless given. With ``strict`` any
    missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` before anything is
    copied. Values are cast to the module's dtypes; a module on the meta device gets the tensors."""
    sd = read_checkpoint(checkpoint)
    specs = _specs(target, list(sd.keys()), vision_prefix, projector_prefix)

    def message(report):
        return parts_message("Llama 4 vision", specs, report,
                             "check num_layers / sizes of the config, or pass vision_prefix= / projector_prefix=")

    return load_parts(specs, sd, strict, message)


def to_hf_state_dict(target, *, vision_prefix: str = DEFAULT_VISION_PREFIX,
                     projector_prefix: str = DEFAULT_PROJECTOR_PREFIX) -> dict[str, torch.Tensor]:
    """HF-named state dict of ``target`` (the inverse of :func:`load_hf_state_dict`)."""
    return export_parts(_specs(target, [], vision_prefix, projector_prefix))


def save_hf_safetensors(target, path, **prefixes) -> None:
    """Write :func:`to_hf_state_dict` to a ``.safetensors`` file."""
    save_safetensors(to_hf_state_dict(target, **prefixes), path)


def from_hf(hf_config: Any, checkpoint=None, *, projector: bool = True, dtype: torch.dtype | None = None,
            device=None, strict: bool = True, **overrides):
    """``(model, projector_or_None)`` built from an HF config (object, dict, ``config.json`` path or
    checkpoint directory), loaded from ``checkpoint`` if given, in eval mode."""
    config = config_from_hf(hf_config, **overrides)
    model = Llama4VisionModel(config, device=device, dtype=dtype).eval()
    proj = None
    if projector and config.text_hidden_size is not None:
        proj = Llama4MultiModalProjector(config, device=device, dtype=dtype).eval()
    if checkpoint is not None:
        load_hf_state_dict((model, proj), checkpoint, strict=strict)
    return model, proj

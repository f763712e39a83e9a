"""HF ``transformers`` interop for the Gemma 4 vision tower: configs and checkpoints (``vitops.hf.gemma4``).

* :func:`config_from_hf` / :func:`to_hf_vision_config`: HF ``Gemma4Config`` /
  ``Gemma4VisionConfig`` <-> :class:`vitops.models.gemma4_vision.Gemma4VisionConfig`.
* :func:`load_hf_state_dict`: an HF state dict, a ``.safetensors`` file or a directory of shards
  (``Gemma4ForConditionalGeneration`` keys ``model.vision_tower.*`` / ``model.embed_vision.*``,
  a standalone ``Gemma4VisionModel`` / ``Gemma4MultimodalEmbedder``, or other prefixes such as
  ``vision_tower.*`` and ``model.vision_model.*``) into the MaxText-style modules, the
  KerasHub-style :class:`vitops.keras_hub.Gemma4VisionEncoder`, or a tuple of them. A mismatch
  raises :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys.
* :func:`to_hf_state_dict` / :func:`save_hf_safetensors`: the inverse (HF key names and layouts).
* :func:`from_hf`: build (and optionally load) tower + projector from an HF config.

Key names: spec ``shared/specs/gemma4_vision.md`` §8.3. Only the vision tower and the vision
embedder are read; other keys of a full checkpoint (text model, audio) are ignored.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector
from ._checkpoint import (
    CheckpointMismatchError,
    KeyMap,
    Layout,
    LoadReport,
    check_part,
    detect_prefix,
    finish_load,
    mismatch_message,
    read_checkpoint,
    save_safetensors,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "config_from_hf",
    "to_hf_vision_config",
    "from_hf",
    "load_hf_state_dict",
    "to_hf_state_dict",
    "save_hf_safetensors",
    "read_checkpoint",
]

DEFAULT_VISION_PREFIX = "model.vision_tower."
DEFAULT_EMBEDDER_PREFIX = "model.embed_vision."
_TOWER_ANCHOR = "patch_embedder.input_proj.weight"
_EMBED_ANCHOR = "embedding_projection.weight"
_CLIP = ("input_min", "input_max", "output_min", "output_max")
# Non-persistent / parameter-free HF names that some exports still carry: harmless, skipped.
_IGNORED_TOWER = re.compile(r"^(encoder\.rotary_emb\.(inv_freq|original_inv_freq)|pooler\.scale)$")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf_config: Any, **overrides) -> Gemma4VisionConfig:
    """vitops config from an HF ``Gemma4Config`` (or its ``vision_config``, or a dict of either)."""
    return Gemma4VisionConfig.from_hf(hf_config, **overrides)


def to_hf_vision_config(config: Gemma4VisionConfig, attn_implementation: str | None = None):
    """The HF ``Gemma4VisionConfig`` with the same math (for parity tests and exports)."""
    from transformers import Gemma4VisionConfig as HFVisionConfig

    hf = HFVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_activation=config.hidden_activation,
        rms_norm_eps=config.rms_norm_eps,
        attention_dropout=config.attention_dropout,
        rope_parameters={"rope_type": "axial", "rope_theta": config.rope_theta},
        pooling_kernel_size=config.pooling_kernel_size,
        patch_size=config.patch_size,
        position_embedding_size=config.position_embedding_size,
        use_clipped_linears=config.use_clipped_linears,
        standardize=config.standardize,
    )
    if attn_implementation is not None:
        hf._attn_implementation = attn_implementation
    return hf


# ---------------------------------------------------------------------------------------------
# Name maps (HF relative name <-> vitops MaxText-style name)
# ---------------------------------------------------------------------------------------------
def _rules() -> list[tuple[str, str, bool]]:
    """(HF pattern, vitops pattern, canonical) with ``{i}`` = layer index. Non-canonical rows
    are accepted aliases on load (e.g. a bare ``q_proj.weight`` without the ``.linear.`` level)."""
    rows = [
        ("patch_embedder.input_proj.weight", "vision_entry.input_projection.weight", True),
        ("patch_embedder.position_embedding_table", "vision_entry.pos_emb_param", True),
        ("std_bias", "vision_exit.std_bias", True),
        ("std_scale", "vision_exit.std_scale", True),
    ]
    layer = "encoder.layers.{i}."
    for hf, ours in (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "post_attention_norm"),
                     ("pre_feedforward_layernorm", "pre_ffw_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
                     ("self_attn.q_norm", "attention.query_norm"), ("self_attn.k_norm", "attention.key_norm")):
        rows.append((f"{layer}{hf}.weight", f"layer_{{i}}.{ours}.scale", True))
    for hf, ours in (("self_attn.q_proj", "attention.query"), ("self_attn.k_proj", "attention.key"),
                     ("self_attn.v_proj", "attention.value"), ("self_attn.o_proj", "attention.out"),
                     ("mlp.gate_proj", "mlp.wi_0"), ("mlp.up_proj", "mlp.wi_1"), ("mlp.down_proj", "mlp.wo")):
        rows.append((f"{layer}{hf}.linear.weight", f"layer_{{i}}.{ours}.weight", True))
        rows.append((f"{layer}{hf}.weight", f"layer_{{i}}.{ours}.weight", False))
        for b in _CLIP:
            rows.append((f"{layer}{hf}.{b}", f"layer_{{i}}.{ours}.{b}", True))
    return rows


_TOWER_KEYS = KeyMap(_rules())
_POS_TABLE = "vision_entry.pos_emb_param"
# HF stores the position table [2, N_pos, D]; the modules keep MaxText's [N_pos, 2, D]
_TOWER_LAYOUTS = {_POS_TABLE: Layout(to_module=lambda t: t.transpose(0, 1) if t.dim() == 3 else t,
                                     to_checkpoint=lambda t: t.transpose(0, 1))}


def _detect_tower_prefix(keys: list[str]) -> str | None:
    """The text before the tower's keys: from the patch embedder's key, or (when that key is the
    one missing) the prefix most of the other tower keys share."""
    found = detect_prefix(keys, _TOWER_ANCHOR, "vision tower")
    return found if found is not None else _TOWER_KEYS.most_common_prefix(keys)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _parts(target) -> list[tuple[str, torch.nn.Module]]:
    """(kind, module) pairs: kind "tower" or "projector"."""
    if isinstance(target, (tuple, list)):
        return [p for t in target if t is not None for p in _parts(t)]
    if isinstance(target, Gemma4VisionEncoderLayer):
        return [("tower", target)]
    if isinstance(target, Gemma4VisionProjector):
        return [("projector", target)]
    enc, proj = getattr(target, "encoder", None), getattr(target, "projector", None)
    if isinstance(enc, Gemma4VisionEncoderLayer) and isinstance(proj, Gemma4VisionProjector):  # keras_hub module
        return [("tower", enc), ("projector", proj)]
    raise TypeError(f"cannot load a Gemma 4 vision checkpoint into {type(target).__name__}")


def load_hf_state_dict(target, checkpoint, *, strict: bool = True, vision_prefix: str | None = None,
                       embedder_prefix: str | None = None) -> LoadReport:
    """Load HF Gemma 4 vision weights into ``target`` (tower, projector, keras_hub encoder, or a tuple).

    Prefixes are detected from the keys (the text before ``patch_embedder.input_proj.weight`` and
    before ``embedding_projection.weight``, preferring ``embed_vision`` over ``embed_audio``) unless
    given. With ``strict`` any missing, unexpected or mis-shaped key raises
    :class:`CheckpointMismatchError` before anything is copied. Values are cast to the module's dtypes.
    """
    sd = read_checkpoint(checkpoint)
    keys = list(sd.keys())
    parts = _parts(target)
    kinds = {k for k, _ in parts}
    tp = vision_prefix if vision_prefix is not None else _detect_tower_prefix(keys)
    ep = embedder_prefix if embedder_prefix is not None else detect_prefix(keys, _EMBED_ANCHOR, "embedder",
                                                                           prefer="vision", avoid="audio")

    mapped: dict[str, dict[str, str]] = {"tower": {}, "projector": {}}
    unexpected = []
    for k in keys:
        if ep is not None and k.startswith(ep) and k[len(ep):] in (_EMBED_ANCHOR,):
            mapped["projector"]["projection.weight"] = k
            continue
        if ep is not None and ep and k.startswith(ep):
            if "projector" in kinds:
                unexpected.append(k)
            continue
        if tp is None or not k.startswith(tp):
            continue
        rel = k[len(tp):]
        ours = _TOWER_KEYS.to_ours(rel)
        if ours is not None:
            mapped["tower"][ours] = k
        elif not _IGNORED_TOWER.match(rel) and "tower" in kinds and (tp or not rel.startswith("embedding_")):
            unexpected.append(k)

    missing, mismatched, loads = [], [], []
    for kind, module in parts:
        # Missing keys are reported in full: under the detected prefix, else under the prefix of a
        # Gemma4ForConditionalGeneration checkpoint (nothing of that part was found at all).
        if kind == "tower":
            prefix = tp if tp is not None else DEFAULT_VISION_PREFIX
            sub, miss, bad = check_part(module, mapped[kind], sd, _TOWER_KEYS.to_hf, prefix, _TOWER_LAYOUTS)
            # Tower keys the module does not have (e.g. clip bounds into an unclipped config).
            expected = module.state_dict()
            unexpected += [k for name, k in mapped[kind].items() if name not in expected]
        else:
            prefix = ep if ep is not None else DEFAULT_EMBEDDER_PREFIX
            sub, miss, bad = check_part(module, mapped[kind], sd, lambda name: _EMBED_ANCHOR, prefix)
        missing += miss
        mismatched += bad
        loads.append((module, sub))

    report = LoadReport(sorted(missing), sorted(unexpected), sorted(mismatched))
    return finish_load(report, strict, lambda: _describe(target, report, tp, ep), loads)


def _describe(target, report: LoadReport, tp, ep) -> str:
    names = ", ".join(type(m).__name__ for _, m in _parts(target))
    kinds = {k for k, _ in _parts(target)}
    notes = []
    if tp is None and "tower" in kinds:
        notes.append(f"no vision tower key was found (keys are shown under {DEFAULT_VISION_PREFIX!r})")
    if ep is None and "projector" in kinds:
        notes.append(f"no vision embedder key was found (keys are shown under {DEFAULT_EMBEDDER_PREFIX!r})")
    return mismatch_message(
        f"HF Gemma 4 vision checkpoint does not match {names} (vision prefix {tp!r}, embedder prefix {ep!r})",
        report, notes,
        "check use_clipped_linears / standardize / sizes of the config, or pass vision_prefix= / embedder_prefix=")


# ---------------------------------------------------------------------------------------------
# Export and construction
# ---------------------------------------------------------------------------------------------
def to_hf_state_dict(target, *, vision_prefix: str = DEFAULT_VISION_PREFIX,
                     embedder_prefix: str = DEFAULT_EMBEDDER_PREFIX) -> dict[str, torch.Tensor]:
    """HF-named, HF-layout state dict of ``target`` (the inverse of :func:`load_hf_state_dict`)."""
    out = {}
    for kind, module in _parts(target):
        for name, tensor in module.state_dict().items():
            if kind == "projector":
                out[embedder_prefix + _EMBED_ANCHOR] = tensor.detach().contiguous()
                continue
            if name in _TOWER_LAYOUTS:
                tensor = _TOWER_LAYOUTS[name].to_checkpoint(tensor)
            out[vision_prefix + _TOWER_KEYS.to_hf(name)] = tensor.detach().contiguous()
    return out


def save_hf_safetensors(target, path, **prefixes) -> None:
    """Write :func:`to_hf_state_dict` to a ``.safetensors`` file."""
    save_safetensors(to_hf_state_dict(target, **prefixes), path)


def from_hf(hf_config: Any, checkpoint=None, *, projector: bool = True, dtype: torch.dtype | None = None,
            device=None, strict: bool = True, **overrides):
    """``(tower, projector_or_None)`` built from an HF config, loaded from ``checkpoint`` if given, in eval mode."""
    config = config_from_hf(hf_config, **overrides)
    tower = Gemma4VisionEncoderLayer(config, device=device, dtype=dtype).eval()
    proj = None
    if projector and config.text_hidden_size is not None:
        proj = Gemma4VisionProjector(config, device=device, dtype=dtype).eval()
    if checkpoint is not None:
        load_hf_state_dict((tower, proj), checkpoint, strict=strict)
    return tower, proj

"""HF ``transformers`` interop for the Gemma 4 vision tower: configs and checkpoints.

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

import glob
import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector

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


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not match the module: lists missing, unexpected, mis-shaped keys."""


class LoadReport(NamedTuple):
    missing: list[str]  # HF names the module needs and the checkpoint lacks
    unexpected: list[str]  # checkpoint keys under the vision prefixes that map to nothing
    mismatched: list[str]  # "key: checkpoint shape vs module shape"


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


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_HF_TO_OURS = [(_compile(hf), ours) for hf, ours, _ in _rules()]
_OURS_TO_HF = [(_compile(ours), hf) for hf, ours, canonical in _rules() if canonical]
_POS_TABLE = "vision_entry.pos_emb_param"  # HF [2, N_pos, D] <-> ours [N_pos, 2, D]


def _map(name: str, table) -> str | None:
    for rx, out in table:
        m = rx.match(name)
        if m:
            return out.replace("{i}", m.group("i")) if "{i}" in out else out
    return None


def _tower_to_hf_name(ours: str) -> str:
    return _map(ours, _OURS_TO_HF) or ours


# ---------------------------------------------------------------------------------------------
# Checkpoint reading
# ---------------------------------------------------------------------------------------------
class _LazySafetensors(Mapping):
    """Read-on-access view over one or more safetensors files (only the vision keys get loaded)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        for f in files:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    self._where[k] = f

    def __getitem__(self, key):
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as fh:
            return fh.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def read_checkpoint(checkpoint) -> Mapping[str, torch.Tensor]:
    """A state dict, a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a directory of safetensors shards."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        return _LazySafetensors(files)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".safetensors"):
        return _LazySafetensors([path])
    return torch.load(path, map_location="cpu", weights_only=True)


_HF_SUFFIXES = [re.compile("^(?P<prefix>.*?)" + rx.pattern[1:]) for rx, _ in _HF_TO_OURS]


def _detect_tower_prefix(keys: list[str]) -> str | None:
    """The text before the tower's keys: from the patch embedder's key, or (when that key is the
    one missing) the prefix most of the other tower keys share."""
    found = _detect_prefix(keys, _TOWER_ANCHOR, "vision tower")
    if found is not None:
        return found
    counts: dict[str, int] = {}
    for k in keys:
        for rx in _HF_SUFFIXES:
            m = rx.match(k)
            if m:
                counts[m.group("prefix")] = counts.get(m.group("prefix"), 0) + 1
                break
    return max(counts, key=counts.get) if counts else None


def _detect_prefix(keys: list[str], anchor: str, what: str, prefer: str | None = None) -> str | None:
    found = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})
    if prefer is not None and len(found) > 1:
        # A full checkpoint has one embedder per modality: prefer the vision one, never the audio one.
        found = [p for p in found if "audio" not in p] or found
        found = [p for p in found if prefer in p] or found
    if len(found) > 1:
        raise CheckpointMismatchError(f"several {what} prefixes in the checkpoint {found}; pass the prefix explicitly")
    return found[0] if found else None


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
    ep = embedder_prefix if embedder_prefix is not None else _detect_prefix(keys, _EMBED_ANCHOR, "embedder", "vision")

    mapped: dict[str, dict[str, tuple[str, Any]]] = {"tower": {}, "projector": {}}
    unexpected = []
    for k in keys:
        if ep is not None and k.startswith(ep) and k[len(ep):] in (_EMBED_ANCHOR,):
            mapped["projector"]["projection.weight"] = (k, None)
            continue
        if ep is not None and ep and k.startswith(ep):
            if "projector" in kinds:
                unexpected.append(k)
            continue
        if tp is None or not k.startswith(tp):
            continue
        rel = k[len(tp):]
        ours = _map(rel, _HF_TO_OURS)
        if ours is not None:
            mapped["tower"][ours] = (k, rel)
        elif not _IGNORED_TOWER.match(rel) and "tower" in kinds and (tp or not rel.startswith("embedding_")):
            unexpected.append(k)

    missing, mismatched, loads = [], [], []
    for kind, module in parts:
        src = mapped[kind]
        # Missing keys are reported in full: under the detected prefix, else under the prefix of a
        # Gemma4ForConditionalGeneration checkpoint (nothing of that part was found at all).
        if kind == "tower":
            prefix = tp if tp is not None else DEFAULT_VISION_PREFIX
        else:
            prefix = ep if ep is not None else DEFAULT_EMBEDDER_PREFIX
        expected = module.state_dict()
        sub = {}
        for name, tensor in expected.items():
            if name not in src:
                hf_rel = _tower_to_hf_name(name) if kind == "tower" else _EMBED_ANCHOR
                missing.append(prefix + hf_rel)
                continue
            key = src[name][0]
            value = sd[key]
            if name == _POS_TABLE and value.dim() == 3:
                value = value.transpose(0, 1)  # HF [2, N_pos, D] -> MaxText layout [N_pos, 2, D]
            if tuple(value.shape) != tuple(tensor.shape):
                want = tuple(tensor.transpose(0, 1).shape) if name == _POS_TABLE else tuple(tensor.shape)
                got = tuple(sd[key].shape)
                mismatched.append(f"{key}: checkpoint {got} vs module {want}")
                continue
            sub[name] = value
        if kind == "tower":
            # Tower keys the module does not have (e.g. clip bounds into an unclipped config).
            unexpected += [k for name, (k, _) in src.items() if name not in expected]
        loads.append((module, sub))

    report = LoadReport(sorted(missing), sorted(unexpected), sorted(mismatched))
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(_describe(target, report, tp, ep))
    for module, sub in loads:
        _load_into(module, sub)
    return report


def _load_into(module: torch.nn.Module, sub: dict[str, torch.Tensor]) -> None:
    """Copies ``sub`` into ``module`` (values cast to the module's dtypes). Tensors of a module built
    on the meta device have no storage to copy into: those are replaced by the checkpoint's values
    (on the checkpoint's device, in the module's dtype), and any that the checkpoint does not
    provide is an error rather than a silent meta tensor."""
    current = module.state_dict(keep_vars=True)
    meta = {name for name, t in current.items() if t.is_meta}
    if not meta:
        module.load_state_dict(sub, strict=False)
        return
    left = sorted(meta - set(sub))
    if left:
        raise CheckpointMismatchError(
            f"{type(module).__name__} is on the meta device and the checkpoint does not provide "
            f"{len(left)} of its tensors, which would stay without data: {left[:20]}")
    cast = {name: value.to(current[name].dtype) if name in current else value for name, value in sub.items()}
    module.load_state_dict(cast, strict=False, assign=True)
    # assign=True keeps the checkpoint's requires_grad (False for plain tensors): parameters stay
    # trainable as they would be after a regular load
    for p in module.parameters():
        p.requires_grad_(True)


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _compress_keys(keys: list[str]) -> list[str]:
    """Every key, in full, with the keys that differ only in their layer index written once:
    ``...encoder.layers.{0-3,5}.mlp.down_proj.input_max``. Nothing is dropped (a mismatch of a whole
    config lists hundreds of keys otherwise)."""
    groups: dict[str, list[int]] = {}
    singles = []
    for k in keys:
        m = _LAYER_INDEX.search(k.split(": ")[0])
        if m is None:
            singles.append(k)
            continue
        pattern = k[: m.start()] + ".layers.{}." + k[m.end():]
        groups.setdefault(pattern, []).append(int(m.group(1)))

    def ranges(ix):
        ix = sorted(set(ix))
        out, start = [], ix[0]
        for a, b in zip(ix, ix[1:] + [None]):
            if b != a + 1:
                out.append(str(start) if start == a else f"{start}-{a}")
                start = b
        return ",".join(out)

    lines = singles + [p.replace("{}", ix and (str(ix[0]) if len(ix) == 1 else "{" + ranges(ix) + "}"))
                       for p, ix in groups.items()]
    return sorted(lines)


def _describe(target, report: LoadReport, tp, ep) -> str:
    def block(title, items):
        if not items:
            return ""
        shown = "\n".join(f"    {x}" for x in _compress_keys(items))
        return f"\n  {title} ({len(items)}):\n{shown}"

    names = ", ".join(type(m).__name__ for _, m in _parts(target))
    kinds = {k for k, _ in _parts(target)}
    notes = ""
    if tp is None and "tower" in kinds:
        notes += f"\n  no vision tower key was found (keys are shown under {DEFAULT_VISION_PREFIX!r})"
    if ep is None and "projector" in kinds:
        notes += f"\n  no vision embedder key was found (keys are shown under {DEFAULT_EMBEDDER_PREFIX!r})"
    return (
        f"HF Gemma 4 vision checkpoint does not match {names} (vision prefix {tp!r}, embedder prefix {ep!r})"
        + notes
        + block("missing keys", report.missing)
        + block("unexpected keys", report.unexpected)
        + block("shape mismatches", report.mismatched)
        + "\n  (check use_clipped_linears / standardize / sizes of the config, or pass vision_prefix= / embedder_prefix=)"
    )


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
            if name == _POS_TABLE:
                tensor = tensor.transpose(0, 1)
            out[vision_prefix + _tower_to_hf_name(name)] = tensor.detach().contiguous()
    return out


def save_hf_safetensors(target, path, **prefixes) -> None:
    """Write :func:`to_hf_state_dict` to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    save_file(to_hf_state_dict(target, **prefixes), os.fspath(path))


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

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
from ..ops import avg_pool_by_positions, factorized_posemb, qkv_norm_rope
from ._patch import make_sites
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


# ---------------------------------------------------------------------------------------------
# Drop-in patch of HF's Gemma 4 vision classes (vitops.hf.patch; the mechanism is vitops.hf._patch)
# ---------------------------------------------------------------------------------------------
_HF_MODULE = "transformers.models.gemma4.modeling_gemma4"
_modeling = None  # HF's module, bound by patch_sites(): the replacements read its attention registry


def _rope_pair_tables(table: torch.Tensor, ndim: int) -> torch.Tensor:
    """HF's N-D rotate-half cos/sin ``[B, L, hd]`` (per axis chunk of 2 * (hd // (2 ndim)) channels,
    both halves equal) as the op's ``[B, L, hd / 2]`` one value per rotated pair, pairs numbered
    through the chunks: the first half of every chunk."""
    width = 2 * (table.shape[-1] // (2 * ndim))
    return table.unflatten(-1, (ndim, width))[..., : width // 2].flatten(-2)


def _patched_position_embeddings(self, pixel_position_ids: torch.Tensor, padding_positions: torch.Tensor
                                 ) -> torch.Tensor:
    """``Gemma4VisionPatchEmbedder._position_embeddings`` as one ``vitops.factorized_posemb``: the x and
    y table rows summed once in the table's dtype (HF's ``x_emb + y_emb``); padding rows zero."""
    # HF clamps negative coordinates to 0 and zeroes the rows it marks as padding; the op reads -1 as
    # "contributes zero", so padding rows get (-1, -1) and other rows HF's clamped coordinates.
    positions = torch.where(padding_positions.unsqueeze(-1), -1, pixel_position_ids.clamp(min=0))
    return factorized_posemb(self.position_embedding_table, positions, layout="hf")


def _patched_attention_forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor = None,
                               attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                               **kwargs):
    """``Gemma4VisionAttention.forward`` with q_norm / k_norm / v_norm and the multidimensional RoPE of
    q and k as one ``vitops.qkv_norm_rope`` reading the projections in place and HF's cos/sin."""
    q_norm, k_norm, v_norm = self.q_norm, self.k_norm, self.v_norm
    if not (q_norm.with_scale and k_norm.with_scale and not v_norm.with_scale
            and q_norm.eps == k_norm.eps == v_norm.eps):
        # A hand-modified module: the op takes one eps and HF's norm kinds. HF's code is exact.
        return _HF_ORIGINALS["Gemma4VisionAttention.forward"](
            self, hidden_states, position_embeddings, attention_mask, position_ids, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape)
    ndim = position_ids.shape[-1]
    # cos/sin are already rounded to the hidden states' dtype by HF's rotary embedding
    query_states, key_states, value_states = qkv_norm_rope(
        query_states, key_states, value_states, q_norm.weight, k_norm.weight, position_ids, eps=q_norm.eps,
        rope_dtype=cos.dtype, rope_cos=_rope_pair_tables(cos, ndim), rope_sin=_rope_pair_tables(sin, ndim))
    attention_interface = _modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, _modeling.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _patched_pooler_forward(self, hidden_states: torch.Tensor, pixel_position_ids: torch.Tensor,
                            padding_positions: torch.Tensor, output_length: int | None = None):
    """``Gemma4VisionPooler.forward`` with the pooling as ``vitops.avg_pool_by_positions`` (HF's one-hot
    matrix [B, L, length] and its float32 GEMM are never built); the same float32 result and mask."""
    if output_length is None or output_length >= hidden_states.shape[1]:
        # nothing to pool (or HF's own error): HF's code, which is cheap there
        return _HF_ORIGINALS["Gemma4VisionPooler.forward"](
            self, hidden_states, pixel_position_ids, padding_positions, output_length)
    pooled, mask = avg_pool_by_positions(hidden_states, positions_xy=pixel_position_ids, length=output_length)
    # HF clamps padding coordinates to (0, 0): its slot 0 counts as filled whenever an image has padding
    mask = torch.cat((mask[:, :1] | padding_positions.any(dim=-1, keepdim=True), mask[:, 1:]), dim=1)
    return pooled.float() * self.root_hidden_size, mask


_HF_ORIGINALS: dict = {}  # "Class.attr" -> HF's function (vitops.hf._patch.hf_originals)


def patch_sites():
    """The :class:`vitops.hf._patch.Site` s of Gemma 4 (imports HF's module; ImportError without it)."""
    global _modeling
    import importlib

    _modeling = importlib.import_module(_HF_MODULE)
    return make_sites("gemma4", [
        ("posemb", _HF_MODULE, "Gemma4VisionPatchEmbedder", "_position_embeddings", _patched_position_embeddings),
        ("rope", _HF_MODULE, "Gemma4VisionAttention", "forward", _patched_attention_forward),
        ("pooler", _HF_MODULE, "Gemma4VisionPooler", "forward", _patched_pooler_forward),
    ], _FINGERPRINTS, _HF_ORIGINALS)


# Fingerprints (vitops.hf._patch.fingerprint) of the HF code each replacement reproduces, in
# transformers 5.17.0 and 5.18.0 (equal there); tools/hf_fingerprints.py prints them.
_FINGERPRINTS: dict[str, dict[str, frozenset[str]]] = {
    "posemb": {"Gemma4VisionPatchEmbedder._position_embeddings": frozenset({"3e58959fa78639fa"})},
    "rope": {"Gemma4VisionAttention.forward": frozenset({"d9a996c59343866a"}), "Gemma4RMSNorm.forward": frozenset({"eb6852644ce8b347"}),
             "Gemma4RMSNorm._norm": frozenset({"39e381890052aa98"}), "apply_multidimensional_rope": frozenset({"af9c062765fc1c04"}),
             "apply_rotary_pos_emb": frozenset({"7cf93867d52652db"}), "rotate_half": frozenset({"e3672a39802de532"}),
             "Gemma4VisionRotaryEmbedding.recomposition_frequencies": frozenset({"bfe1fac3160b3af6"})},
    "pooler": {"Gemma4VisionPooler.forward": frozenset({"ef03741d2507c9d2"}),
               "Gemma4VisionPooler._avg_pool_by_positions": frozenset({"e2da9ca05af8530c"})},
}

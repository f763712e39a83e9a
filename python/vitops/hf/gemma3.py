"""HF ``transformers`` interop for the Gemma 3 vision tower and projector: configs and checkpoints
(``vitops.hf.gemma3``).

* :func:`config_from_hf` / :func:`to_hf_vision_config` / :func:`to_hf_config`: HF ``Gemma3Config`` /
  ``SiglipVisionConfig`` (objects, dicts, or a ``config.json`` / checkpoint directory) <->
  :class:`Gemma3VisionConfig`. Hub configs that omit ``hidden_act`` / ``layer_norm_eps`` get the
  Gemma 3 values (gelu_pytorch_tanh, 1e-6); exports set ``vision_use_head=False`` (SigLIP builds its
  pooling head unless the attribute is present and False).
* :func:`load_hf_state_dict`: the SigLIP tower and ``multi_modal_projector`` in every key form
  transformers has used (facts_transformers_5_18.md section 3): hub / pre-4.52
  ``vision_tower.vision_model.*``, 4.52-4.x in memory ``model.vision_tower.vision_model.*``, 5.18 in
  memory ``model.vision_tower.*``, 5.18 ``save_pretrained`` ``vision_tower.*`` (and a standalone
  ``SiglipVisionModel``'s names), from a state dict, a ``.safetensors`` file or a sharded directory
  (the attention-pooling ``head.*`` of a SigLIP built without ``vision_use_head=False`` is skipped),
  into :class:`Gemma3VisionEncoderLayer` / :class:`VisionEmbedder` (or a tuple). A mismatch raises
  :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.
* :func:`to_hf_state_dict` / :func:`save_hf_safetensors`: the inverse (5.18 ``save_pretrained`` names).
* :func:`from_hf`: build (and optionally load) the tower + projector from an HF config.
* :func:`decoder_config_from_hf` / :func:`load_hf_decoder_state_dict` / :func:`decoder_to_hf_state_dict` /
  :func:`decoder_from_hf`: the text decoder layers (:class:`Gemma3ScannableBlock`) from
  ``Gemma3ForConditionalGeneration`` / ``Gemma3ForCausalLM`` / ``Gemma3TextModel`` configs and weights.
"""

from __future__ import annotations

import re
from typing import Any

import torch

import torch.nn.functional as F

from ..models._hf_config import config_getter, square_side
from ..ops import avg_pool_rms_norm, patchify
from ..layers import AttentionType
from ..models.gemma3 import (
    Gemma3DecoderConfig,
    Gemma3ScannableBlock,
    Gemma3VisionConfig,
    Gemma3VisionEncoderLayer,
    VisionEmbedder,
    get_attention_type,
)
from ._patch import make_sites
from ._checkpoint import (
    CheckpointMismatchError,
    KeyMap,
    Layout,
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
    "decoder_config_from_hf",
    "decoder_from_hf",
    "decoder_to_hf_state_dict",
    "from_hf",
    "load_hf_decoder_state_dict",
    "load_hf_state_dict",
    "save_hf_safetensors",
    "to_hf_config",
    "to_hf_state_dict",
    "to_hf_vision_config",
]

DEFAULT_VISION_PREFIX = "vision_tower."  # transformers 5.18 save_pretrained
DEFAULT_PROJECTOR_PREFIX = "multi_modal_projector."
_TOWER_ANCHOR = "embeddings.patch_embedding.weight"
_PROJECTOR_ANCHOR = "mm_input_projection_weight"


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf_config: Any, **overrides) -> Gemma3VisionConfig:
    """vitops config from an HF ``Gemma3Config`` (vision_config, mm_tokens_per_image, text_config's
    hidden size) or a ``SiglipVisionConfig`` alone (no projector); objects, dicts, a ``config.json``
    path or a checkpoint directory."""
    data = read_config(hf_config)
    get = config_getter(data)
    vision = get("vision_config")
    v = config_getter(vision if vision is not None else data)
    act = v("hidden_act")
    if act is not None and act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh", "gelu_fast"):
        raise ValueError(f"vitops.hf.gemma3: the Gemma 3 tower uses the tanh GELU, got hidden_act={act!r}")
    kwargs = dict(
        hidden_size=v("hidden_size"), intermediate_size=v("intermediate_size"), num_layers=v("num_hidden_layers"),
        num_heads=v("num_attention_heads"), num_channels=v("num_channels"),
        image_size=square_side(v("image_size"), "Gemma3VisionConfig"),
        patch_size=square_side(v("patch_size"), "Gemma3VisionConfig"), layer_norm_eps=v("layer_norm_eps"),
        attention_dropout=v("attention_dropout"),
    )
    kwargs = {k: val for k, val in kwargs.items() if val is not None}
    for name in ("layer_norm_eps", "attention_dropout"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    if vision is not None:
        tokens = get("mm_tokens_per_image")
        if tokens is not None:
            kwargs["mm_tokens_per_image"] = int(tokens)
        kwargs["text_hidden_size"] = config_getter(get("text_config"))("hidden_size")
    else:  # a SiglipVisionConfig alone: the full grid, no projector
        side = kwargs.get("image_size", 896) // kwargs.get("patch_size", 14)
        kwargs.setdefault("mm_tokens_per_image", side * side)
    kwargs.update(overrides)
    return Gemma3VisionConfig(**kwargs)


def to_hf_vision_config(config: Gemma3VisionConfig, attn_implementation: str | None = "sdpa"):
    """The HF ``SiglipVisionConfig`` with the same math (``vision_use_head=False``)."""
    from transformers import SiglipVisionConfig

    if config.posemb != "learn":
        raise ValueError('vitops.hf.gemma3: HF SigLIP has only the learned position table (posemb="learn")')
    hf = SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, num_channels=config.num_channels,
        image_size=config.image_size, patch_size=config.patch_size, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=config.layer_norm_eps, attention_dropout=config.attention_dropout, vision_use_head=False,
    )
    if attn_implementation is not None:
        hf._attn_implementation = attn_implementation
    return hf


def to_hf_config(config: Gemma3VisionConfig, attn_implementation: str | None = "sdpa"):
    """The HF ``Gemma3Config`` with the same vision math and projector (text model minimal)."""
    from transformers import Gemma3Config

    text = {"hidden_size": config.text_hidden_size or 2560, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 64}
    hf = Gemma3Config(vision_config=to_hf_vision_config(config, attn_implementation).to_dict(), text_config=text,
                      mm_tokens_per_image=config.mm_tokens_per_image)
    if attn_implementation is not None:
        hf.vision_config._attn_implementation = attn_implementation
    return hf


# ---------------------------------------------------------------------------------------------
# Key maps (HF name relative to the tower root <-> vitops MaxText-style name)
# ---------------------------------------------------------------------------------------------
def _tower_rows() -> list[tuple[str, str, bool]]:
    rows = [(f"embeddings.patch_embedding.{p}", f"embedding.{p}", True) for p in ("weight", "bias")]
    rows.append(("embeddings.position_embedding.weight", "pos_embedding", True))
    rows += [(f"post_layernorm.{p}", f"Transformer.encoder_norm.{p}", True) for p in ("weight", "bias")]
    layer, ours = "encoder.layers.{i}.", "Transformer.encoderblock_{i}."
    pairs = [("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1"),
             ("self_attn.q_proj", "MultiHeadDotProductAttention_0.query"),
             ("self_attn.k_proj", "MultiHeadDotProductAttention_0.key"),
             ("self_attn.v_proj", "MultiHeadDotProductAttention_0.value"),
             ("self_attn.out_proj", "MultiHeadDotProductAttention_0.out"),
             ("mlp.fc1", "MlpBlockViT_0.Dense_0"), ("mlp.fc2", "MlpBlockViT_0.Dense_1")]
    for hf, mine in pairs:
        rows += [(f"{layer}{hf}.{p}", f"{ours}{mine}.{p}", True) for p in ("weight", "bias")]
    return rows


_TOWER_KEYS = KeyMap(_tower_rows())
_PROJECTOR_KEYS = KeyMap([(_PROJECTOR_ANCHOR, "mm_input_projection.w", True),
                          ("mm_soft_emb_norm.weight", "mm_soft_embedding_norm.scale", True)])
# SigLIP's attention-pooling head (built unless vision_use_head is False; Gemma 3 never runs it):
# present in some exports, harmless, skipped
_IGNORED_TOWER = re.compile(r"^head\.")
# HF's position table is an nn.Embedding [L, D]; MaxText's pos_embedding is [1, L, D]
_TOWER_LAYOUTS = {"pos_embedding": Layout(lambda t: t.unsqueeze(0), lambda t: t.squeeze(0))}


def _parts(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, (tuple, list)):
        return [p for t in target if t is not None for p in _parts(t)]
    if isinstance(target, Gemma3VisionEncoderLayer):
        return [("tower", target)]
    if isinstance(target, VisionEmbedder):
        return [("projector", target)]
    raise TypeError(f"cannot load a Gemma 3 vision checkpoint into {type(target).__name__}")


def _specs(target, keys, vision_prefix, projector_prefix) -> list[Part]:
    specs = []
    for kind, module in _parts(target):
        if kind == "tower":
            prefix = vision_prefix
            if prefix is None:  # e.g. "vision_tower.vision_model.", "model.vision_tower.", "" (SiglipVisionModel)
                prefix = detect_prefix(keys, _TOWER_ANCHOR, "vision tower", prefer="vision_tower")
                prefix = prefix if prefix is not None else _TOWER_KEYS.most_common_prefix(keys)
            specs.append(Part("tower", module, _TOWER_KEYS, prefix, DEFAULT_VISION_PREFIX, layouts=_TOWER_LAYOUTS,
                              ignored=_IGNORED_TOWER))
        else:
            prefix = projector_prefix
            if prefix is None:
                prefix = detect_prefix(keys, _PROJECTOR_ANCHOR, "projector", prefer="multi_modal_projector")
            specs.append(Part("projector", module, _PROJECTOR_KEYS, prefix, DEFAULT_PROJECTOR_PREFIX))
    return specs


def load_hf_state_dict(target, checkpoint, *, strict: bool = True, vision_prefix: str | None = None,
                       projector_prefix: str | None = None) -> LoadReport:
    """Load HF Gemma 3 vision tower (+ projector) weights into ``target`` (a
    :class:`Gemma3VisionEncoderLayer`, a :class:`VisionEmbedder`, or a tuple). Prefixes are detected
    from the keys (the text before ``embeddings.patch_embedding.weight`` /
    ``mm_input_projection_weight``) unless given; every transformers key form is accepted. With
    ``strict`` any missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError`
    before anything is copied. Values are cast to the module's dtypes; a module on the meta device
    gets the tensors."""
    sd = read_checkpoint(checkpoint)
    specs = _specs(target, list(sd.keys()), vision_prefix, projector_prefix)

    def message(report):
        return parts_message("Gemma 3 vision", specs, report,
                             "check num_layers / sizes of the config, or pass vision_prefix= / projector_prefix=")

    return load_parts(specs, sd, strict, message)


def to_hf_state_dict(target, *, vision_prefix: str = DEFAULT_VISION_PREFIX,
                     projector_prefix: str = DEFAULT_PROJECTOR_PREFIX) -> dict[str, torch.Tensor]:
    """HF-named state dict of ``target`` (the inverse of :func:`load_hf_state_dict`; 5.18
    ``save_pretrained`` names by default)."""
    return export_parts(_specs(target, [], vision_prefix, projector_prefix))


def save_hf_safetensors(target, path, **prefixes) -> None:
    """Write :func:`to_hf_state_dict` to a ``.safetensors`` file."""
    save_safetensors(to_hf_state_dict(target, **prefixes), path)


def from_hf(hf_config: Any, checkpoint=None, *, projector: bool = True, dtype: torch.dtype | None = None,
            device=None, strict: bool = True, **overrides):
    """``(tower, projector_or_None)`` built from an HF config (object, dict, ``config.json`` path or
    checkpoint directory), loaded from ``checkpoint`` if given, in eval mode."""
    config = config_from_hf(hf_config, **overrides)
    tower = Gemma3VisionEncoderLayer(config, device=device, dtype=dtype).eval()
    proj = None
    if projector and config.text_hidden_size is not None:
        proj = VisionEmbedder(config, device=device, dtype=dtype).eval()
    if checkpoint is not None:
        load_hf_state_dict((tower, proj), checkpoint, strict=strict)
    return tower, proj


# ---------------------------------------------------------------------------------------------
# Text decoder layers: config and checkpoints
# ---------------------------------------------------------------------------------------------
def _rope_settings(t) -> dict:
    """(local theta, global theta, global linear factor) from a text config: transformers 5.x
    ``rope_parameters`` per layer type, or the 4.x fields (``rope_theta``, ``rope_local_base_freq``,
    ``rope_scaling``)."""
    params = t("rope_parameters")
    out = {}
    if isinstance(params, dict) and "full_attention" in params:
        local, full = params.get("sliding_attention") or {}, params.get("full_attention") or {}
        for name, p in (("sliding_attention", local), ("full_attention", full)):
            kind = p.get("rope_type", "default")
            if kind not in ("default", "linear"):
                raise ValueError(f"vitops.hf.gemma3: {name} RoPE type {kind!r} is not supported (default or linear)")
        if local.get("rope_type", "default") == "linear":
            raise ValueError("vitops.hf.gemma3: linear RoPE scaling on the sliding layers is not supported")
        if "rope_theta" in local:
            out["rope_local_base_freq"] = float(local["rope_theta"])
        if "rope_theta" in full:
            out["rope_theta"] = float(full["rope_theta"])
        out["rope_linear_factor"] = float(full["factor"]) if full.get("rope_type") == "linear" else None
        return out
    if t("rope_local_base_freq") is not None:
        out["rope_local_base_freq"] = float(t("rope_local_base_freq"))
    if t("rope_theta") is not None:
        out["rope_theta"] = float(t("rope_theta"))
    scaling = t("rope_scaling")
    if scaling is None:
        out["rope_linear_factor"] = None
    else:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise ValueError(f"vitops.hf.gemma3: rope_scaling type {kind!r} is not supported (linear)")
        out["rope_linear_factor"] = float(scaling["factor"])
    return out


def decoder_config_from_hf(hf_config: Any, **overrides) -> Gemma3DecoderConfig:
    """vitops decoder config from an HF ``Gemma3Config`` (its text_config) or ``Gemma3TextConfig``
    (objects, dicts, a ``config.json`` path or a checkpoint directory). The layer pattern must be
    HF's 5:1 (``layer_types``), which MaxText's :func:`get_attention_type` reproduces."""
    data = read_config(hf_config)
    get = config_getter(data)
    text = get("text_config")
    t = config_getter(text if text is not None else data)
    act = t("hidden_activation") or t("hidden_act")
    if act is not None and act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh", "gelu_fast"):
        raise ValueError(f"vitops.hf.gemma3: the Gemma 3 decoder MLP uses the tanh GELU, got {act!r}")
    if t("use_bidirectional_attention"):
        raise ValueError("vitops.hf.gemma3: use_bidirectional_attention (EmbeddingGemma) is not supported")
    # attn_logit_softcapping: HF 5.18 never applies it in Gemma 3 (facts file section 4.6); ignored here too
    layer_types = t("layer_types")
    if layer_types is not None:
        expected = ["full_attention" if get_attention_type(i) == AttentionType.GLOBAL else "sliding_attention"
                    for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise ValueError(f"vitops.hf.gemma3: layer_types {list(layer_types)} differ from Gemma 3's 5:1 pattern "
                             f"{expected}")
    kwargs = dict(hidden_size=t("hidden_size"), intermediate_size=t("intermediate_size"),
                  num_heads=t("num_attention_heads"), num_kv_heads=t("num_key_value_heads"), head_dim=t("head_dim"),
                  query_pre_attn_scalar=t("query_pre_attn_scalar"), sliding_window=t("sliding_window"),
                  rms_norm_eps=t("rms_norm_eps"), attention_dropout=t("attention_dropout"))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for name in ("query_pre_attn_scalar", "rms_norm_eps", "attention_dropout"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    kwargs.update(_rope_settings(t))
    kwargs.update(overrides)
    return Gemma3DecoderConfig(**kwargs)


def num_decoder_layers(hf_config: Any) -> int:
    data = read_config(hf_config)
    text = config_getter(data)("text_config")
    n = config_getter(text if text is not None else data)("num_hidden_layers")
    if n is None:
        raise ValueError("vitops.hf.gemma3: the config has no num_hidden_layers")
    return int(n)


def _decoder_rows() -> list[tuple[str, str, bool]]:
    pairs = [("input_layernorm.weight", "pre_self_attention_norm.scale"),
             ("post_attention_layernorm.weight", "post_self_attention_norm.scale"),
             ("pre_feedforward_layernorm.weight", "pre_ffw_norm.scale"),
             ("post_feedforward_layernorm.weight", "post_ffw_norm.scale"),
             ("self_attn.q_proj.weight", "self_attention.query.weight"),
             ("self_attn.k_proj.weight", "self_attention.key.weight"),
             ("self_attn.v_proj.weight", "self_attention.value.weight"),
             ("self_attn.o_proj.weight", "self_attention.out.weight"),
             ("self_attn.q_norm.weight", "self_attention.query_norm.scale"),
             ("self_attn.k_norm.weight", "self_attention.key_norm.scale"),
             ("mlp.gate_proj.weight", "mlp.wi_0.weight"), ("mlp.up_proj.weight", "mlp.wi_1.weight"),
             ("mlp.down_proj.weight", "mlp.wo.weight")]
    return [(f"layers.{{i}}.{hf}", f"layers_{{i}}.{ours}", True) for hf, ours in pairs]


_DECODER_KEYS = KeyMap(_decoder_rows())
_DECODER_ANCHOR = re.compile(r"^(?P<prefix>.*?)layers\.\d+\.self_attn\.q_norm\.weight$")
DEFAULT_DECODER_PREFIX = "language_model.model."  # the hub / save_pretrained form of Gemma3ForConditionalGeneration


def _decoder_prefix(keys) -> str | None:
    """The text before ``layers.{i}.`` of the decoder's keys (every form of the facts file's section 3:
    ``language_model.model.``, ``model.language_model.``, ``model.`` (Gemma3ForCausalLM), ``''``
    (Gemma3TextModel)); SigLIP's layers have no q_norm, so the anchor cannot match the tower."""
    found = sorted({m.group("prefix") for k in keys if (m := _DECODER_ANCHOR.match(k))})
    if len(found) > 1:
        raise CheckpointMismatchError(f"several decoder prefixes in the checkpoint {found}; pass decoder_prefix=")
    return found[0] if found else None


def load_hf_decoder_state_dict(block: Gemma3ScannableBlock, checkpoint, *, strict: bool = True,
                               decoder_prefix: str | None = None) -> LoadReport:
    """Load HF Gemma 3 text decoder layers (``...layers.{i}.*`` of ``Gemma3ForConditionalGeneration``,
    ``Gemma3ForCausalLM`` or ``Gemma3TextModel``, any key form) into a :class:`Gemma3ScannableBlock`
    (``layers_{i}``). The embeddings, final norm and lm_head are not part of it (ignored); a layer
    index past the block, a missing or mis-shaped tensor raises :class:`CheckpointMismatchError`
    listing them all (``strict``)."""
    if not isinstance(block, Gemma3ScannableBlock):
        raise TypeError(f"load_hf_decoder_state_dict loads into a Gemma3ScannableBlock, got {type(block).__name__}")
    sd = read_checkpoint(checkpoint)
    prefix = decoder_prefix if decoder_prefix is not None else _decoder_prefix(list(sd.keys()))
    rest = re.compile(r"^(?!layers\.)")  # embed_tokens, norm, ...: not decoder layers
    spec = Part("decoder", block, _DECODER_KEYS, prefix, DEFAULT_DECODER_PREFIX, ignored=rest)

    def message(report):
        return parts_message("Gemma 3 decoder", [spec], report,
                             "check the block's num_of_layers / sizes, or pass decoder_prefix=")

    return load_parts([spec], sd, strict, message)


def decoder_to_hf_state_dict(block: Gemma3ScannableBlock, *, decoder_prefix: str = DEFAULT_DECODER_PREFIX
                             ) -> dict[str, torch.Tensor]:
    """HF-named state dict of the layers (the inverse of :func:`load_hf_decoder_state_dict`)."""
    return export_parts([Part("decoder", block, _DECODER_KEYS, decoder_prefix, decoder_prefix)])


def decoder_from_hf(hf_config: Any, checkpoint=None, *, dtype: torch.dtype | None = None, device=None,
                    strict: bool = True, **overrides) -> Gemma3ScannableBlock:
    """The whole decoder stack as one :class:`Gemma3ScannableBlock` (its block-local pattern is the
    global one), built from an HF config and loaded from ``checkpoint`` if given, in eval mode."""
    config = decoder_config_from_hf(hf_config, **overrides)
    block = Gemma3ScannableBlock(config, num_decoder_layers(hf_config), device=device, dtype=dtype).eval()
    if checkpoint is not None:
        load_hf_decoder_state_dict(block, checkpoint, strict=strict)
    return block


# ---------------------------------------------------------------------------------------------
# Drop-in patch of HF's Gemma 3 vision classes (vitops.hf.patch; the mechanism is vitops.hf._patch)
# ---------------------------------------------------------------------------------------------
_HF_MODULE = "transformers.models.gemma3.modeling_gemma3"
_SIGLIP_MODULE = "transformers.models.siglip.modeling_siglip"


def _patched_projector_forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
    """``Gemma3MultiModalProjector.forward`` with the AvgPool2d and ``mm_soft_emb_norm`` as one
    ``vitops.avg_pool_rms_norm`` reading the ``[B, L, D]`` tokens in place (no NCHW copy)."""
    side, tokens = self.patches_per_image, self.tokens_per_side
    if self.kernel_size * tokens != side or vision_outputs.dim() != 3 or vision_outputs.shape[1] != side * side:
        # AvgPool2d drops a remainder the op does not (or HF raises its own shape error): HF's code
        return _HF_ORIGINALS["Gemma3MultiModalProjector.forward"](self, vision_outputs)
    norm = self.mm_soft_emb_norm
    normed = avg_pool_rms_norm(vision_outputs, tokens * tokens, norm.weight, eps=norm.eps, norm="scale_plus_one")
    return torch.matmul(normed, self.mm_input_projection_weight).type_as(vision_outputs)


def _patched_siglip_embeddings_forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False
                                       ) -> torch.Tensor:
    """``SiglipVisionEmbeddings.forward`` with the patch convolution as ``vitops.patchify`` (NCHW tiles
    in the convolution weight's (channel, row, col) order) + one GEMM, where that measured faster
    (bfloat16 on the CPU: benchmarks/NOTES.md entry 11); HF's convolution elsewhere."""
    conv = self.patch_embedding
    weight = conv.weight
    p = self.patch_size
    height, width = pixel_values.shape[-2:]
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or height % p or width % p
            or tuple(conv.stride) != (p, p) or tuple(conv.kernel_size) != (p, p) or conv.groups != 1
            or tuple(conv.dilation) != (1, 1) or conv.padding not in ("valid", (0, 0))):
        return _HF_ORIGINALS["SiglipVisionEmbeddings.forward"](self, pixel_values,
                                                                               interpolate_pos_encoding)
    patches, _ = patchify(pixel_values.to(weight.dtype), p, channels_first=True)
    embeddings = F.linear(patches, weight.flatten(1), conv.bias)
    if interpolate_pos_encoding:
        return embeddings + self.interpolate_pos_encoding(embeddings, height, width)
    return embeddings + self.position_embedding(self.position_ids)


_HF_ORIGINALS: dict = {}  # "Class.attr" -> HF's function (vitops.hf._patch.hf_originals)


def patch_sites():
    """The :class:`vitops.hf._patch.Site` s of Gemma 3 (imports HF's modules; ImportError without them)."""
    import importlib

    importlib.import_module(_HF_MODULE)
    importlib.import_module(_SIGLIP_MODULE)
    return make_sites("gemma3", [
        ("pooler", _HF_MODULE, "Gemma3MultiModalProjector", "forward", _patched_projector_forward),
        ("patch_embedding", _SIGLIP_MODULE, "SiglipVisionEmbeddings", "forward", _patched_siglip_embeddings_forward),
    ], _FINGERPRINTS, _HF_ORIGINALS)


# Fingerprints (vitops.hf._patch.fingerprint) of the HF code each replacement reproduces, in
# transformers 5.17.0 and 5.18.0 (equal there); tools/hf_fingerprints.py prints them.
_FINGERPRINTS: dict[str, dict[str, frozenset[str]]] = {
    "pooler": {"Gemma3MultiModalProjector.forward": frozenset({"34a86d96191f9d9d"}),
               "Gemma3MultiModalProjector.__init__": frozenset({"92766c3f5ab658d8"}),
               "Gemma3RMSNorm.forward": frozenset({"d9f5a887fac30ad1"}), "Gemma3RMSNorm._norm": frozenset({"5ed575597bb44c20"})},
    "patch_embedding": {"SiglipVisionEmbeddings.forward": frozenset({"2aaa5847c777812c"}),
                        "SiglipVisionEmbeddings.__init__": frozenset({"302486f88467c0fc"})},
}

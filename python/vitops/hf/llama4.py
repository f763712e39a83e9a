"""HF ``transformers`` interop for the Llama 4 vision model and text decoder layers: configs and checkpoints (``vitops.hf.llama4``).

* :func:`config_from_hf` / :func:`to_hf_vision_config`: HF ``Llama4Config`` / ``Llama4VisionConfig``
  (objects, dicts, or a ``config.json`` / checkpoint directory) <-> :class:`Llama4VisionConfig`.
* :func:`load_hf_state_dict`: ``vision_model.*`` and ``multi_modal_projector.*`` (HF's hub names equal
  its in-memory names in 5.18; other prefixes, e.g. a standalone ``Llama4VisionModel``'s bare names,
  are detected) from a state dict, a ``.safetensors`` file or a sharded directory into
  :class:`Llama4VisionModel` / :class:`Llama4MultiModalProjector` (or a tuple). A mismatch raises
  :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.
* :func:`to_hf_state_dict` / :func:`save_hf_safetensors`: the inverse.
* :func:`from_hf`: build (and optionally load) the model + projector from an HF config.
* :func:`decoder_config_from_hf` / :func:`load_hf_decoder_state_dict` / :func:`decoder_to_hf_state_dict` /
  :func:`decoder_from_hf`: the text decoder layers (:class:`Llama4ScannableBlock`, MoE experts included).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..models._hf_config import config_getter
from ..ops import patchify, pixel_shuffle, qkv_norm_rope
from ..models.llama4 import (
    Llama4DecoderConfig,
    Llama4MultiModalProjector,
    Llama4ScannableBlock,
    Llama4VisionConfig,
    Llama4VisionModel,
)
from ._patch import make_sites
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
    "decoder_config_from_hf",
    "decoder_from_hf",
    "decoder_to_hf_state_dict",
    "load_hf_config",
    "load_hf_decoder_state_dict",
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


# ---------------------------------------------------------------------------------------------
# Text decoder layers: config and checkpoints
# ---------------------------------------------------------------------------------------------
def _text_getter(hf_config: Any):
    data = read_config(hf_config)
    text = config_getter(data)("text_config")
    return config_getter(text if text is not None else data)


def _rope_scaling(t) -> tuple[float | None, dict | None]:
    """(theta, llama3 scaling or None) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` / ``rope_scaling``."""
    params = t("rope_parameters")
    if isinstance(params, dict) and params:
        theta, kind, scaling = params.get("rope_theta"), params.get("rope_type", "default"), params
    else:
        scaling = t("rope_scaling")
        theta, kind = t("rope_theta"), (None if scaling is None else scaling.get("rope_type", scaling.get("type")))
        kind = kind or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"vitops.hf.llama4: RoPE type {kind!r} is not supported (default or llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k]) for k in keys}


def _interval_of(flags: list[bool], what: str) -> int | None:
    """The n of a 0-based every-n-th pattern ((i + 1) % n == 0) that ``flags`` follows, None when no
    flag is set; any other pattern raises (MaxText's helpers express only these)."""
    from ..models.llama4 import determine_is_moe_layer

    if not any(flags):
        return None
    n = flags.index(True) + 1
    if [determine_is_moe_layer(i, n) for i in range(len(flags))] != list(flags):
        raise ValueError(f"vitops.hf.llama4: the {what} layers {[i for i, f in enumerate(flags) if f]} are not every "
                         f"n-th layer ((i + 1) % n == 0), which Llama4ScannableBlock builds")
    return n


def decoder_config_from_hf(hf_config: Any, **overrides) -> tuple[Llama4DecoderConfig, int | None, int | None, int]:
    """``(config, nope_layer_interval, interleave_moe_layer_step, num_layers)`` of the text decoder from
    an HF ``Llama4Config`` (its text_config) or ``Llama4TextConfig`` (objects, dicts, ``config.json``
    or a checkpoint directory). The NoPE and MoE layers are read from ``no_rope_layers`` (0 = NoPE)
    and ``moe_layers`` (or ``interleave_moe_layer_step``); an int ``attn_temperature_tuning`` (older
    files) counts as bool."""
    t = _text_getter(hf_config)
    if (t("num_experts_per_tok") or 1) != 1:
        raise ValueError(f"vitops.hf.llama4: top-{t('num_experts_per_tok')} routing is not supported (Llama 4: top-1)")
    layers = t("num_hidden_layers")
    if layers is None:
        raise ValueError("vitops.hf.llama4: the config has no num_hidden_layers")
    layers = int(layers)
    no_rope = t("no_rope_layers")
    if no_rope:
        nope = _interval_of([not bool(f) for f in no_rope], "NoPE")
    else:
        interval = t("no_rope_layer_interval")
        nope = interval if interval else None
    moe = t("moe_layers")
    if moe is not None:
        step = _interval_of([i in set(moe) for i in range(layers)], "MoE")
    else:
        step = t("interleave_moe_layer_step")
    theta, scaling = _rope_scaling(t)
    tuning = t("attn_temperature_tuning")
    kwargs = dict(hidden_size=t("hidden_size"), intermediate_size=t("intermediate_size"),
                  intermediate_size_mlp=t("intermediate_size_mlp"), num_heads=t("num_attention_heads"),
                  num_kv_heads=t("num_key_value_heads"), head_dim=t("head_dim"), rms_norm_eps=t("rms_norm_eps"),
                  rope_theta=theta, num_experts=t("num_local_experts"), use_qk_norm=t("use_qk_norm"),
                  attention_chunk_size=t("attention_chunk_size"), floor_scale=t("floor_scale"),
                  attn_scale=t("attn_scale"), hidden_act=t("hidden_act"), attention_dropout=t("attention_dropout"))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for name in ("rms_norm_eps", "rope_theta", "floor_scale", "attn_scale", "attention_dropout"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    if "use_qk_norm" in kwargs:
        kwargs["use_qk_norm"] = bool(kwargs["use_qk_norm"])
    if tuning is not None:
        kwargs["attn_temperature_tuning"] = bool(tuning)
    kwargs.update(rope_scaling=scaling, nope_layer_interval=nope, interleave_moe_layer_step=step)
    kwargs.update(overrides)
    config = Llama4DecoderConfig(**kwargs)
    return config, config.nope_layer_interval, config.interleave_moe_layer_step, layers


def _decoder_rows() -> list[tuple[str, str, bool]]:
    pairs = [("input_layernorm.weight", "pre_self_attention_layer_norm.scale"),
             ("post_attention_layernorm.weight", "post_self_attention_layer_norm.scale"),
             ("self_attn.q_proj.weight", "self_attention.query.weight"),
             ("self_attn.k_proj.weight", "self_attention.key.weight"),
             ("self_attn.v_proj.weight", "self_attention.value.weight"),
             ("self_attn.o_proj.weight", "self_attention.out.weight"),
             ("feed_forward.router.weight", "Llama4MoEBlock_0.gate.weight"),
             ("feed_forward.experts.gate_up_proj", "Llama4MoEBlock_0.wi"),
             ("feed_forward.experts.down_proj", "Llama4MoEBlock_0.wo"),
             ("feed_forward.shared_expert.gate_proj.weight", "Llama4MoEBlock_0.shared_experts.wi_0.weight"),
             ("feed_forward.shared_expert.up_proj.weight", "Llama4MoEBlock_0.shared_experts.wi_1.weight"),
             ("feed_forward.shared_expert.down_proj.weight", "Llama4MoEBlock_0.shared_experts.wo.weight"),
             ("feed_forward.gate_proj.weight", "mlp.wi_0.weight"), ("feed_forward.up_proj.weight", "mlp.wi_1.weight"),
             ("feed_forward.down_proj.weight", "mlp.wo.weight")]
    return [(f"layers.{{i}}.{hf}", f"layers_{{i}}.{ours}", True) for hf, ours in pairs]


_DECODER_KEYS = KeyMap(_decoder_rows())
# text layers have feed_forward.*; the vision encoder's layers have mlp.fc1 / fc2
_DECODER_ANCHOR = re.compile(r"^(?P<prefix>.*?)layers\.\d+\.feed_forward\.")
DEFAULT_DECODER_PREFIX = "language_model.model."  # Llama4ForConditionalGeneration's one key form


def _decoder_prefix(keys) -> str | None:
    found = sorted({m.group("prefix") for k in keys if (m := _DECODER_ANCHOR.match(k))})
    if len(found) > 1:
        raise CheckpointMismatchError(f"several decoder prefixes in the checkpoint {found}; pass decoder_prefix=")
    return found[0] if found else None


def load_hf_decoder_state_dict(block: Llama4ScannableBlock, checkpoint, *, strict: bool = True,
                               decoder_prefix: str | None = None) -> LoadReport:
    """Load HF Llama 4 text decoder layers (``...layers.{i}.*`` of ``Llama4ForConditionalGeneration``,
    ``Llama4ForCausalLM`` or ``Llama4TextModel``) into a :class:`Llama4ScannableBlock` (``layers_{i}``):
    attention, norms, the router ``[E, H]``, experts ``gate_up_proj [E, H, 2I]`` (gate first) and
    ``down_proj [E, I, H]`` (used as ``x @ W``, as HF), the shared expert and the dense MLPs. A layer
    whose MoE/dense kind differs from the block's shows up as missing + unexpected keys; everything
    wrong is listed in one :class:`CheckpointMismatchError` (``strict``)."""
    if not isinstance(block, Llama4ScannableBlock):
        raise TypeError(f"load_hf_decoder_state_dict loads into a Llama4ScannableBlock, got {type(block).__name__}")
    sd = read_checkpoint(checkpoint)
    prefix = decoder_prefix if decoder_prefix is not None else _decoder_prefix(list(sd.keys()))
    spec = Part("decoder", block, _DECODER_KEYS, prefix, DEFAULT_DECODER_PREFIX, ignored=re.compile(r"^(?!layers\.)"))

    def message(report):
        return parts_message("Llama 4 decoder", [spec], report,
                             "check the block's layers, NoPE / MoE intervals and sizes, or pass decoder_prefix=")

    return load_parts([spec], sd, strict, message)


def decoder_to_hf_state_dict(block: Llama4ScannableBlock, *, decoder_prefix: str = DEFAULT_DECODER_PREFIX
                             ) -> dict[str, torch.Tensor]:
    """HF-named state dict of the layers (the inverse of :func:`load_hf_decoder_state_dict`)."""
    return export_parts([Part("decoder", block, _DECODER_KEYS, decoder_prefix, decoder_prefix)])


def decoder_from_hf(hf_config: Any, checkpoint=None, *, dtype: torch.dtype | None = None, device=None,
                    strict: bool = True, **overrides) -> Llama4ScannableBlock:
    """The whole text decoder as one :class:`Llama4ScannableBlock` (block-local patterns equal the
    global ones), built from an HF config and loaded from ``checkpoint`` if given, in eval mode."""
    config, nope, step, layers = decoder_config_from_hf(hf_config, **overrides)
    block = Llama4ScannableBlock(config, nope, step, num_of_layers=layers, device=device, dtype=dtype).eval()
    if checkpoint is not None:
        load_hf_decoder_state_dict(block, checkpoint, strict=strict)
    return block


# ---------------------------------------------------------------------------------------------
# Drop-in patch of HF's Llama 4 vision classes (vitops.hf.patch; the mechanism is vitops.hf._patch)
# ---------------------------------------------------------------------------------------------
_HF_MODULE = "transformers.models.llama4.modeling_llama4"
_modeling = None  # HF's module, bound by patch_sites(): the replacements read its attention registry


def _patched_vision_attention_forward(self, hidden_states: torch.Tensor, freqs_ci: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
    """``Llama4VisionAttention.forward`` with ``vision_apply_rotary_emb`` (a complex product in float32,
    rounded once) as one ``vitops.qkv_norm_rope`` (interleaved pairs, HF's ``freqs_ci`` as cos/sin)."""
    if not freqs_ci.is_complex():
        # `model.to(dtype)` casts the complex buffer to a real one (dropping sin); HF's code then
        # multiplies by cos alone. Kept as HF computes it, so a patched model equals the unpatched one.
        return _HF_ORIGINALS["Llama4VisionAttention.forward"](
            self, hidden_states, freqs_ci, attention_mask, past_key_values, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape)
    # freqs_ci [L, 1, hd / 2] complex64 -> cos / sin [1, L, hd / 2] views (float32, as HF's product)
    angles = torch.view_as_real(freqs_ci.to(query_states.device)).flatten(1, -3).transpose(0, 1)
    batch, length = query_states.shape[:2]
    positions = query_states.new_zeros((1, 1, 1), dtype=torch.int32).expand(batch, length, 1)  # shape only
    query_states, key_states, _ = qkv_norm_rope(
        query_states, key_states, None, None, None, positions, rope_dtype=torch.float32, norm="none",
        v_norm=False, pairing="interleaved", rope_cos=angles[..., 0], rope_sin=angles[..., 1])
    value_states = value_states.transpose(1, 2)
    attention_interface = _modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, _modeling.vision_eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, None,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=None, is_causal=False, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _patched_unfold_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Llama4UnfoldConvolution.forward`` with ``nn.Unfold`` + permute as ``vitops.patchify``
    (channels first: bitwise the unfold's patches, written in the [B, L, C p^2] layout the linear reads)."""
    unfold = self.unfold
    kernel = unfold.kernel_size if isinstance(unfold.kernel_size, tuple) else (unfold.kernel_size,) * 2
    stride = unfold.stride if isinstance(unfold.stride, tuple) else (unfold.stride,) * 2
    padding = unfold.padding if isinstance(unfold.padding, tuple) else (unfold.padding,) * 2
    dilation = unfold.dilation if isinstance(unfold.dilation, tuple) else (unfold.dilation,) * 2
    p = kernel[0]
    if (kernel != (p, p) or stride != (p, p) or padding != (0, 0) or dilation != (1, 1) or hidden_states.dim() != 4
            or hidden_states.shape[-1] % p or hidden_states.shape[-2] % p):
        # overlapping, padded or partial windows: HF's unfold
        return _HF_ORIGINALS["Llama4UnfoldConvolution.forward"](self, hidden_states)
    patches, _ = patchify(hidden_states, p, channels_first=True)
    return self.linear(patches)


def _patched_pixel_shuffle_mlp_forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
    """``Llama4VisionPixelShuffleMLP.forward`` with the shuffle as one ``vitops.pixel_shuffle`` (no copies)."""
    return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio))


_HF_ORIGINALS: dict = {}  # "Class.attr" -> HF's function (vitops.hf._patch.hf_originals)


def patch_sites():
    """The :class:`vitops.hf._patch.Site` s of Llama 4 (imports HF's module; ImportError without it)."""
    global _modeling
    import importlib

    _modeling = importlib.import_module(_HF_MODULE)
    return make_sites("llama4", [
        ("rope", _HF_MODULE, "Llama4VisionAttention", "forward", _patched_vision_attention_forward),
        ("patch_embedding", _HF_MODULE, "Llama4UnfoldConvolution", "forward", _patched_unfold_forward),
        ("pixel_shuffle", _HF_MODULE, "Llama4VisionPixelShuffleMLP", "forward", _patched_pixel_shuffle_mlp_forward),
    ], _FINGERPRINTS, _HF_ORIGINALS)


# Fingerprints (vitops.hf._patch.fingerprint) of the HF code each replacement reproduces, in
# transformers 5.17.0 and 5.18.0 (equal there); tools/hf_fingerprints.py prints them.
_FINGERPRINTS: dict[str, dict[str, frozenset[str]]] = {
    "rope": {"Llama4VisionAttention.forward": frozenset({"233a0c7df5f8222f"}), "vision_apply_rotary_emb": frozenset({"f1009458933ed9de"}),
             "reshape_for_broadcast": frozenset({"6b968e2f4a67aa70"})},
    "patch_embedding": {"Llama4UnfoldConvolution.forward": frozenset({"e81f55eaf44e507c"})},
    "pixel_shuffle": {"Llama4VisionPixelShuffleMLP.forward": frozenset({"e01d4967e997c98e"}), "pixel_shuffle": frozenset({"5ac62bd820803e94"})},
}

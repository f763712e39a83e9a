"""Tiny random HF conditional-generation models of the three families, with an image prompt each
(tests of vitops.hf.patch; also run by tests/hf_patch_worker.py under another transformers release)."""

from __future__ import annotations

import torch

IMAGE_TOKEN, BOI, EOI = 300, 301, 302
FAMILIES = ("gemma4", "gemma3", "llama4")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (HF zero-initialises some norms and projections), and random float
    buffers (Gemma 4's standardize statistics), so every patched path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if p.dim() == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("std_scale") else 0.0))
        for name, b in model.named_buffers():
            if b.is_floating_point() and name.endswith(("std_bias", "std_scale")):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5 + (1.0 if name.endswith("std_scale") else 0.0))


def _grid_positions(side: int, batch: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)[None].repeat(batch, 1, 1)


def build(family: str, seed: int = 0, attn: str = "sdpa"):
    """``(model, inputs)``: an eval-mode conditional-generation model and generate() inputs with images."""
    import transformers as t

    torch.manual_seed(seed)
    if family == "gemma4":
        vc = t.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, patch_size=4, position_embedding_size=32,
                                  pooling_kernel_size=2, standardize=True)
        tc = t.Gemma4TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                                hidden_size_per_layer_input=8, vocab_size_per_layer_input=320, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"])
        cfg = t.Gemma4Config(text_config=tc, vision_config=vc, audio_config=None, image_token_id=IMAGE_TOKEN,
                             boi_token_id=BOI, eoi_token_id=EOI)
        model_cls = t.Gemma4ForConditionalGeneration
        # two images: 8 x 8 patches, and 6 x 4 patches padded to 64 rows with (-1, -1)
        pos = _grid_positions(8, 2)
        small = _grid_positions(6, 1)[0]
        small = small[small[:, 1] < 4]
        pos[1] = -1
        pos[1, : small.shape[0]] = small
        pixels = torch.rand(2, 64, 48)
        pixels[1, small.shape[0]:] = 0.0  # the processor's padding rows
        tokens = [16, small.shape[0] // 4]
        images = dict(pixel_values=pixels, image_position_ids=pos)
    elif family == "gemma3":
        vc = t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=4)
        tc = t.Gemma3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)
        cfg = t.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
                             boi_token_index=BOI, eoi_token_index=EOI)
        model_cls = t.Gemma3ForConditionalGeneration
        tokens = [16, 16]
        images = dict(pixel_values=torch.randn(2, 3, 32, 32))
    elif family == "llama4":
        vc = t.Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=4, vision_output_dim=32, projector_input_dim=32,
                                  projector_output_dim=32, pixel_shuffle_ratio=0.5)
        tc = t.Llama4TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                num_local_experts=4, interleave_moe_layer_step=1, attention_chunk_size=16)
        cfg = t.Llama4Config(text_config=tc, vision_config=vc, image_token_index=IMAGE_TOKEN)
        model_cls = t.Llama4ForConditionalGeneration
        tokens = [16, 16]
        images = dict(pixel_values=torch.randn(2, 3, 32, 32))
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    model = model_cls(cfg).eval()
    _randomize(model, seed)
    ids = [2, 5]
    for n in tokens:
        ids += [BOI] + [IMAGE_TOKEN] * n + [EOI, 7]
    input_ids = torch.tensor([ids + [9, 11]])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **images)
    if family == "gemma3":
        inputs["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    return model, inputs


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` keeping complex buffers complex (``Module.to`` turns Llama 4's complex
    ``freqs_ci`` into a real tensor, dropping sin, and HF's own rotary then multiplies by cos alone)."""
    complex_buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_complex()}
    model = model.to(dtype)
    for name, b in complex_buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, b)
    return model


def image_features(model, inputs) -> torch.Tensor:
    """The vision path's output: the soft tokens the text model receives, one [N, D] tensor."""
    if type(model).__name__.startswith("Llama4"):
        # the vision model (unfold, encoder, pixel-shuffle MLP) and the projector forward() applies
        hidden = model.vision_model(inputs["pixel_values"]).last_hidden_state
        feats = model.multi_modal_projector(hidden)
        return feats.reshape(-1, feats.shape[-1])
    kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_position_ids")}
    out = model.model.get_image_features(**kwargs)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (tuple, list)):
        feats = torch.cat(list(feats), dim=0)
    return feats.reshape(-1, feats.shape[-1])


def vision_module(model) -> torch.nn.Module:
    """The HF vision model inside a conditional-generation model."""
    if hasattr(model, "vision_model"):
        return model.vision_model
    return model.model.vision_tower

"""Gemma 3 vision tower (vitops.models.gemma3) against transformers 5.18's SiglipVisionModel (as
Gemma 3 builds it, vision_use_head=False) followed by Gemma3MultiModalProjector, random weights,
eval. The HF -> MaxText-name weight copy below is the test's own (the checkpoint loader is a
separate piece of issue 11)."""

import math

import pytest
import torch

from vitops.models.gemma3 import (
    Gemma3VisionConfig,
    Gemma3VisionEncoderLayer,
    VisionEmbedder,
    VisionExit,
    posemb_sincos_2d,
)

from _utils import randn

transformers = pytest.importorskip("transformers")
from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector  # noqa: E402
from transformers.models.siglip.modeling_siglip import SiglipVisionModel  # noqa: E402


def hf_models(cfg: Gemma3VisionConfig, seed=0):
    vc = SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                            hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    tc = Gemma3TextConfig(hidden_size=cfg.text_hidden_size, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    gc = Gemma3Config(vision_config=vc.to_dict(), text_config=tc.to_dict(), mm_tokens_per_image=cfg.mm_tokens_per_image)
    torch.manual_seed(seed)
    tower = SiglipVisionModel(gc.vision_config).eval()
    projector = Gemma3MultiModalProjector(gc).eval()
    with torch.no_grad():  # random norm weight (HF initialises it to zeros) and non-trivial biases
        projector.mm_soft_emb_norm.weight.normal_(0, 0.5)
        projector.mm_input_projection_weight.normal_(0, cfg.hidden_size**-0.5)
        for name, p in tower.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return tower, projector


def copy_weights(ours: Gemma3VisionEncoderLayer, embedder: VisionEmbedder, tower, projector):
    """HF module names -> the MaxText names of vitops.models.gemma3."""
    sd = tower.state_dict()  # 5.18 in-memory names: no `vision_model.`
    names = {
        "embeddings.patch_embedding.weight": "embedding.weight",
        "embeddings.patch_embedding.bias": "embedding.bias",
        "post_layernorm.weight": "Transformer.encoder_norm.weight",
        "post_layernorm.bias": "Transformer.encoder_norm.bias",
    }
    per_layer = {"layer_norm1": "LayerNorm_0", "layer_norm2": "LayerNorm_1",
                 "self_attn.q_proj": "MultiHeadDotProductAttention_0.query",
                 "self_attn.k_proj": "MultiHeadDotProductAttention_0.key",
                 "self_attn.v_proj": "MultiHeadDotProductAttention_0.value",
                 "self_attn.out_proj": "MultiHeadDotProductAttention_0.out",
                 "mlp.fc1": "MlpBlockViT_0.Dense_0", "mlp.fc2": "MlpBlockViT_0.Dense_1"}
    for i in range(ours.config.num_layers):
        for hf_name, our_name in per_layer.items():
            for leaf in ("weight", "bias"):
                names[f"encoder.layers.{i}.{hf_name}.{leaf}"] = f"Transformer.encoderblock_{i}.{our_name}.{leaf}"
    state = {names[k]: v for k, v in sd.items() if k in names}
    state["pos_embedding"] = sd["embeddings.position_embedding.weight"][None]
    missing, unexpected = ours.load_state_dict(state, strict=True), None
    embedder.load_state_dict({"mm_soft_embedding_norm.scale": projector.mm_soft_emb_norm.weight,
                              "mm_input_projection.w": projector.mm_input_projection_weight})
    assert unexpected is None and not missing.missing_keys


def build(cfg, dtype=torch.float32, seed=0):
    tower, projector = hf_models(cfg, seed)
    ours, embedder = Gemma3VisionEncoderLayer(cfg).eval(), VisionEmbedder(cfg).eval()
    copy_weights(ours, embedder, tower, projector)
    if dtype != torch.float32:
        for m in (tower, projector, ours, embedder):
            m.to(dtype)
    return tower, projector, ours, embedder


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (hidden, heads, layers, image, patch, mm tokens): head dims 16 and 24, pooling 4x4 -> 2x2 and
# 6x6 -> 3x3 / 1x1, an odd grid (5x5 -> 1 token), the identity exit
CONFIGS = [
    (64, 4, 2, 56, 14, 4),
    (96, 4, 2, 84, 14, 9),
    (48, 2, 1, 70, 14, 1),
    (64, 2, 3, 48, 8, 36),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("n_images", [1, 3])
def test_tower_and_projector_match_hf_float32(config, n_images):
    d, h, layers, image, patch, tokens = config
    cfg = Gemma3VisionConfig(hidden_size=d, intermediate_size=2 * d + 8, num_layers=layers, num_heads=h,
                             image_size=image, patch_size=patch, mm_tokens_per_image=tokens, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg)
    torch.manual_seed(1)
    px = torch.randn(2 * n_images, 3, image, image)
    with torch.no_grad():
        hidden = tower(pixel_values=px).last_hidden_state
        want = projector(hidden)
        nhwc = px.permute(0, 2, 3, 1).reshape(2, n_images, image, image, 3)
        pooled = ours(nhwc)
        got = embedder(pooled)
    assert pooled.shape == (2, n_images, tokens, d) and got.shape == (2, n_images, tokens, 40)
    assert rel_err(got.reshape(want.shape), want) < 1e-5
    # the pooled tower output equals HF's last_hidden_state pooled the same way
    side, k = image // patch, image // patch // math.isqrt(tokens)
    ref_pool = torch.nn.functional.avg_pool2d(hidden.transpose(1, 2).reshape(-1, d, side, side), k, k)
    assert rel_err(pooled.reshape(-1, tokens, d), ref_pool.flatten(2).transpose(1, 2)) < 1e-5


def test_single_image_nhwc_input_and_bad_shapes():
    cfg = Gemma3VisionConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, image_size=28,
                             patch_size=14, mm_tokens_per_image=1)
    ours = Gemma3VisionEncoderLayer(cfg).eval()
    x = randn(3, 28, 28, 3)
    with torch.no_grad():
        a, b = ours(x), ours(x[:, None])
    assert a.shape == (3, 1, 1, 32) and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"`inputs` must be NHWC images \[B, N, 28, 28, 3\]"):
        ours(randn(3, 3, 28, 28))
    with pytest.raises(ValueError, match="mm_tokens_per_image 8 must be a square"):
        Gemma3VisionConfig(mm_tokens_per_image=8)
    with pytest.raises(ValueError, match="VisionExit: 16 tokens do not pool to 9"):
        VisionExit(9)(randn(1, 16, 4))


def test_bfloat16_error_against_float64_no_worse_than_hf():
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    ours_err, hf_err = [], []
    for seed in range(3):
        tower, projector, ours, embedder = build(cfg, seed=seed)
        torch.manual_seed(10 + seed)
        px = torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            ref = projector.double()(tower.double()(pixel_values=px.double()).last_hidden_state)
        tower, projector, ours, embedder = build(cfg, torch.bfloat16, seed=seed)
        with torch.no_grad():
            hf_out = projector(tower(pixel_values=px.bfloat16()).last_hidden_state)
            out = embedder(ours(px.permute(0, 2, 3, 1).bfloat16()))
        assert out.dtype == torch.bfloat16
        ours_err.append(rel_err(out.reshape(ref.shape), ref))
        hf_err.append(rel_err(hf_out, ref))
    assert sum(ours_err) / 3 <= 1.05 * sum(hf_err) / 3, (ours_err, hf_err)


def test_sincos2d_table():
    """MaxText's MoCo v3 table: closed form at a few entries, frequency k / (width / 4 - 1)."""
    t = posemb_sincos_2d(3, 4, 16)
    assert t.shape == (1, 12, 16)
    omega = 1.0 / 10000.0 ** (torch.arange(4, dtype=torch.float64) / 3)
    for m in (0, 5, 11):
        y, x = divmod(m, 4)
        want = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
        torch.testing.assert_close(t[0, m].double(), want, rtol=1e-6, atol=1e-6)
    cfg = Gemma3VisionConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, image_size=28,
                             patch_size=14, mm_tokens_per_image=4, posemb="sincos2d")
    ours = Gemma3VisionEncoderLayer(cfg)
    assert ours.pos_embedding is None and ours(randn(1, 28, 28, 3)).shape == (1, 1, 4, 32)


def test_dropout_applies_in_train_mode_only():
    cfg = Gemma3VisionConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, image_size=28,
                             patch_size=14, mm_tokens_per_image=4, dropout=0.5)
    ours = Gemma3VisionEncoderLayer(cfg)
    x = randn(2, 28, 28, 3)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), ours(x)) and torch.equal(ours(x), ours(x, deterministic=True))
        assert not torch.equal(ours(x), ours(x, deterministic=False))
        ours.train()
        assert not torch.equal(ours(x), ours(x, deterministic=True))


def test_gradients_match_hf():
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg)
    px = torch.randn(2, 3, 56, 56, requires_grad=True)
    g = torch.randn(2, 4, 40)
    want = torch.autograd.grad((projector(tower(pixel_values=px).last_hidden_state) * g).sum(),
                               [px, tower.encoder.layers[0].self_attn.q_proj.weight])
    nhwc = px.detach().permute(0, 2, 3, 1).requires_grad_()
    got = torch.autograd.grad((embedder(ours(nhwc))[:, 0] * g).sum(),
                              [nhwc, ours.Transformer.encoderblock_0.MultiHeadDotProductAttention_0.query.weight])
    assert rel_err(got[0].permute(0, 3, 1, 2), want[0]) < 1e-5
    assert rel_err(got[1], want[1]) < 1e-5

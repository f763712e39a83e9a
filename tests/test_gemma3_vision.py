"""Gemma 3 vision tower (vitops.models.gemma3) against transformers 5.18's SiglipVisionModel (as
Gemma 3 builds it, vision_use_head=False) followed by Gemma3MultiModalProjector, random weights,
eval; and the HF checkpoint interop (vitops.hf.gemma3) in every key form transformers has used."""

import math

import pytest
import torch

from vitops.models.gemma3 import (
    Gemma3VisionConfig,
    Gemma3VisionEncoderLayer,
    VisionEmbedder,
    VisionExit,
    encode_images,
    posemb_sincos_2d,
)

from vitops.hf import gemma3 as gemma3_hf
from vitops.hf import CheckpointMismatchError

from _utils import DEVICES, randn

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


def hf_state_dict(tower, projector):
    """transformers 5.18 save_pretrained names of a standalone tower and projector."""
    sd = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    sd.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    return sd


def build(cfg, dtype=torch.float32, seed=0):
    tower, projector = hf_models(cfg, seed)
    ours, embedder = Gemma3VisionEncoderLayer(cfg).eval(), VisionEmbedder(cfg).eval()
    gemma3_hf.load_hf_state_dict((ours, embedder), hf_state_dict(tower, projector))
    if dtype != torch.float32:
        for m in (tower, projector, ours, embedder):
            m.to(dtype)
    return tower, projector, ours, embedder


def soft_tokens(ours, embedder, nhwc, fused, deterministic=None):
    """The two ways to the soft tokens: the MaxText modules one after the other (the exit pooling
    alone, then the embedder's norm), or encode_images (pooling + norm as one op)."""
    if fused:
        return encode_images(ours, embedder, nhwc, deterministic)
    return embedder(ours(nhwc, deterministic))


PATHS = pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])


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
        fused = encode_images(ours, embedder, nhwc)
    assert pooled.shape == (2, n_images, tokens, d) and got.shape == (2, n_images, tokens, 40)
    assert fused.shape == got.shape
    assert rel_err(got.reshape(want.shape), want) < 1e-5
    assert rel_err(fused.reshape(want.shape), want) < 1e-5
    torch.testing.assert_close(fused, got, rtol=1e-5, atol=1e-6)
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


@pytest.mark.parametrize("seed", range(6))
def test_vision_exit_equals_avg_pool2d_on_random_grids(seed):
    """The exit's op path (pooling that tiles the grid) against AvgPool2d on the NCHW grid, for seeded
    random grids, pools, dtypes and a non-contiguous input, forward and backward; and KerasHub's
    floor pooling of a side the pool does not divide."""
    gen = torch.Generator().manual_seed(seed)
    out_side = int(torch.randint(1, 5, (1,), generator=gen))
    k = int(torch.randint(1, 5, (1,), generator=gen))
    side, d, b = out_side * k, int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
    dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[seed % 4]
    base = torch.randn(b, side * side, 2 * d, generator=gen).to(dtype)
    x = base[..., ::2].requires_grad_()  # strided channels
    for exit_ in (VisionExit(out_side**2), VisionExit(pool_size=k)):
        got = exit_(x)
        grid = x.transpose(1, 2).reshape(b, d, side, side)
        want = torch.nn.functional.avg_pool2d(grid, k, k).flatten(2).transpose(1, 2)
        assert got.shape == (b, out_side**2, d) and got.dtype == dtype
        tol = dict(rtol=0, atol=0) if dtype in (torch.float32, torch.float64) and k == 1 else {}
        torch.testing.assert_close(got, want, **tol)
        g = torch.randn(got.shape, generator=gen).to(dtype)
        (ga,) = torch.autograd.grad((got * g).sum(), x)
        (gb,) = torch.autograd.grad((want * g).sum(), x)
        torch.testing.assert_close(ga, gb)
    # floor pooling: a 7x7 grid with pool 3 keeps the top-left 6x6
    x = randn(2, 49, 5)
    got = VisionExit(pool_size=3)(x)
    want = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, 5, 7, 7)[..., :6, :6], 3, 3)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embedding_as_patchify_and_gemm_equals_the_convolution(dtype):
    """embed_patches' two forms (and "auto"), forward and backward, against HF's conv embedding."""
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=1, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg, dtype)
    px = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        ref64 = tower.double().embeddings.patch_embedding(px).flatten(2).transpose(1, 2)
    outs = {}
    for mode in ("conv", "patchify", "auto"):
        ours.patch_embedding = mode
        ours.zero_grad()
        nhwc = px.permute(0, 2, 3, 1).to(dtype).requires_grad_()
        out = ours.embed_patches(nhwc)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        (out * g).sum().backward()
        outs[mode] = (out.detach(), nhwc.grad, ours.embedding.weight.grad.clone(), ours.embedding.bias.grad.clone())
    conv, gemm = outs["conv"], outs["patchify"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(conv, gemm):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    # the same error against float64 as the convolution (both round one float32-accumulated dot)
    assert rel_err(gemm[0], ref64) <= 1.05 * rel_err(conv[0], ref64) + 1e-7
    auto = outs["auto"]
    assert torch.equal(auto[0], (gemm if dtype == torch.bfloat16 else conv)[0])
    ours.patch_embedding = "im2col"
    with pytest.raises(ValueError, match='`patch_embedding` must be "auto", "conv" or "patchify"'):
        ours.embed_patches(px.permute(0, 2, 3, 1).to(dtype))


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


@PATHS
def test_gradients_match_hf(fused):
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg)
    px = torch.randn(2, 3, 56, 56, requires_grad=True)
    g = torch.randn(2, 4, 40)
    want = torch.autograd.grad((projector(tower(pixel_values=px).last_hidden_state) * g).sum(),
                               [px, tower.encoder.layers[0].self_attn.q_proj.weight])
    nhwc = px.detach().permute(0, 2, 3, 1).requires_grad_()
    got = torch.autograd.grad((soft_tokens(ours, embedder, nhwc, fused)[:, 0] * g).sum(),
                              [nhwc, ours.Transformer.encoderblock_0.MultiHeadDotProductAttention_0.query.weight,
                               embedder.mm_soft_embedding_norm.scale])
    want_norm = torch.autograd.grad((projector(tower(pixel_values=px).last_hidden_state) * g).sum(),
                                    projector.mm_soft_emb_norm.weight)[0]
    assert rel_err(got[0].permute(0, 3, 1, 2), want[0]) < 1e-5
    assert rel_err(got[1], want[1]) < 1e-5
    assert rel_err(got[2], want_norm) < 1e-5


# ---------------------------------------------------------------------------------------------
# Checkpoints: configs and every key form (facts_transformers_5_18.md section 3)
# ---------------------------------------------------------------------------------------------
SMALL = Gemma3VisionConfig(hidden_size=48, intermediate_size=104, num_layers=2, num_heads=4, image_size=42,
                           patch_size=14, mm_tokens_per_image=9, text_hidden_size=32)


def _full_hf_model(seed=0):
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    hf = Gemma3ForConditionalGeneration(gemma3_hf.to_hf_config(SMALL)).eval()
    with torch.no_grad():  # HF initialises the norm weight and the projection to zeros
        hf.model.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0, 0.5)
        hf.model.multi_modal_projector.mm_input_projection_weight.normal_(0, SMALL.hidden_size**-0.5)
        for name, p in hf.model.vision_tower.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return hf


def _hf_image_features(hf, px):
    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=px)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _renamed(sd, rules):
    out = {}
    for k, v in sd.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def test_every_key_form_loads_and_matches_hf(tmp_path):
    hf = _full_hf_model()
    px = torch.randn(3, 3, 42, 42)
    want = _hf_image_features(hf, px)
    memory = hf.state_dict()  # 5.18 in memory: model.vision_tower.embeddings...
    assert any(k.startswith("model.vision_tower.embeddings.") for k in memory)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    hf.save_pretrained(tmp_path / "single")
    forms = {
        "5.18 in memory": memory,
        "hub (pre-4.52)": _renamed(memory, [("model.vision_tower.", "vision_tower.vision_model."),
                                             ("model.multi_modal_projector.", "multi_modal_projector."),
                                             ("model.language_model.", "language_model.model.")]),
        "4.52-4.x in memory": _renamed(memory, [("model.vision_tower.", "model.vision_tower.vision_model.")]),
        "5.18 save_pretrained, sharded directory": str(tmp_path / "sharded"),
        "5.18 save_pretrained, .safetensors file": str(tmp_path / "single" / "model.safetensors"),
    }
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for name, checkpoint in forms.items():
        tower, proj = gemma3_hf.from_hf(tmp_path / "single", checkpoint)
        with torch.no_grad():
            got = proj(tower(px.permute(0, 2, 3, 1)))[:, 0]
        assert rel_err(got, want.reshape(got.shape)) < 1e-5, name


def test_round_trip_and_save_pretrained_names(tmp_path):
    hf = _full_hf_model()
    hf.save_pretrained(tmp_path)
    tower, proj = gemma3_hf.from_hf(hf.config, str(tmp_path))
    exported = gemma3_hf.to_hf_state_dict((tower, proj))
    from safetensors.torch import load_file

    saved = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()
             if k.startswith(("vision_tower.", "multi_modal_projector."))}
    assert set(exported) == set(saved)
    for k, v in saved.items():
        assert torch.equal(exported[k], v), k
    gemma3_hf.save_hf_safetensors((tower, proj), tmp_path / "ours.safetensors")
    again, again_proj = gemma3_hf.from_hf(hf.config, str(tmp_path / "ours.safetensors"))
    for a, b in zip(again.state_dict().values(), tower.state_dict().values()):
        assert torch.equal(a, b)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    hf = _full_hf_model()
    sd = dict(hf.state_dict())
    del sd["model.vision_tower.encoder.layers.1.mlp.fc2.bias"]
    sd["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 47)
    tower = Gemma3VisionEncoderLayer(dataclasses_replace(SMALL, num_layers=1))
    with pytest.raises(CheckpointMismatchError) as info:
        gemma3_hf.load_hf_state_dict(tower, sd)
    text = str(info.value)
    assert "model.vision_tower.encoder.layers.1" in text  # unexpected (a layer past num_layers)
    assert "q_proj.weight: checkpoint (48, 47)" in text
    tower2 = Gemma3VisionEncoderLayer(SMALL)
    with pytest.raises(CheckpointMismatchError, match=r"model\.vision_tower\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        gemma3_hf.load_hf_state_dict(tower2, sd)
    report = gemma3_hf.load_hf_state_dict(tower2, {k: v for k, v in hf.state_dict().items()}, strict=False)
    assert not report.missing and not report.mismatched


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_config_from_hub_json_without_act_and_eps(tmp_path):
    """Hub config.json copies list only non-default keys; 5.18's SigLIP defaults give Gemma 3's values."""
    import json

    data = {"model_type": "gemma3", "mm_tokens_per_image": 256,
            "text_config": {"hidden_size": 2560, "model_type": "gemma3_text"},
            "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                              "model_type": "siglip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = gemma3_hf.config_from_hf(tmp_path)
    assert cfg == Gemma3VisionConfig(text_hidden_size=2560)
    assert gemma3_hf.config_from_hf(data["vision_config"]).mm_tokens_per_image == 4096
    hf_vision = gemma3_hf.to_hf_vision_config(cfg)
    assert hf_vision.vision_use_head is False and hf_vision.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="tanh GELU"):
        gemma3_hf.config_from_hf({**data["vision_config"], "hidden_act": "quick_gelu"})


# ---------------------------------------------------------------------------------------------
# KerasHub entry point
# ---------------------------------------------------------------------------------------------
KH = dict(image_size=56, patch_size=14, num_heads=4, hidden_dim=64, num_layers=2, intermediate_dim=136, output_dim=40,
          pool_size=2)


def test_keras_hub_encoder_equals_the_tower_and_projector():
    from vitops.keras_hub import Gemma3VisionEncoder

    kh = Gemma3VisionEncoder(**KH).eval()
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg)
    kh.encoder.load_state_dict(ours.state_dict())
    kh.projector.load_state_dict(embedder.state_dict())
    images = randn(2, 3, 56, 56, 3)
    with torch.no_grad():
        got = kh(images)
        want = projector(tower(pixel_values=images.flatten(0, 1).permute(0, 3, 1, 2)).last_hidden_state)
    assert got.shape == (6, 4, 40) and kh.num_vision_tokens_per_image == 4
    assert rel_err(got, want) < 1e-5


def test_keras_hub_pooling_drops_a_remainder_and_config_round_trip():
    from vitops.keras_hub import Gemma3VisionEncoder

    # the 4x4 grid pooled by 3: KerasHub's valid pooling keeps one window (the first 3x3 patches)
    kh = Gemma3VisionEncoder(**{**KH, "pool_size": 3}).eval()
    x = randn(1, 16, 64)
    pooled = kh.encoder.VisionExit(x)
    assert pooled.shape == (1, 1, 64)
    torch.testing.assert_close(pooled[0, 0], x[0].view(4, 4, 64)[:3, :3].mean((0, 1)))
    assert kh.num_vision_tokens_per_image == 16 // 9  # KerasHub's own (floor) count
    assert kh(randn(1, 1, 56, 56, 3)).shape == (1, 1, 40)
    config = kh.get_config()
    assert config == {**KH, "pool_size": 3, "layer_norm_epsilon": 1e-6}
    again = Gemma3VisionEncoder.from_config(config)
    assert again.get_config() == config
    assert Gemma3VisionEncoder(**KH, dtype="bfloat16").projector.mm_input_projection.w.dtype == torch.bfloat16


@pytest.mark.parametrize("changes, match", [
    (dict(pool_size=5), r"pool_size \(5\) is larger than the 4x4 patch grid"),
    (dict(hidden_dim=66), r"hidden_dim \(66\) must be divisible by num_heads \(4\)"),
    (dict(image_size=50), r"image_size \(50\) must be a multiple of patch_size \(14\)"),
    (dict(num_layers=0), r"`num_layers` must be a positive int"),
    (dict(dtype="int8"), r"dtype must be None, 'float32'"),
])
def test_keras_hub_argument_errors(changes, match):
    from vitops.keras_hub import Gemma3VisionEncoder

    with pytest.raises(ValueError, match=match):
        Gemma3VisionEncoder(**{**KH, **changes})


def test_keras_hub_bad_images():
    from vitops.keras_hub import Gemma3VisionEncoder

    kh = Gemma3VisionEncoder(**KH)
    with pytest.raises(ValueError, match=r"images must be \[batch, images, 56, 56, 3\], got \(2, 56, 56, 3\)"):
        kh(randn(2, 56, 56, 3))


# ---------------------------------------------------------------------------------------------
# The released vision config at full size (identical for 4B / 12B / 27B; the text width only sets
# the projector's output): all 27 layers at 896² for one image; a pan-and-scan batch (an image and
# its crops) with 2 layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("num_layers,images", [(27, 1), (2, 3)])
def test_released_config_float32(num_layers, images):
    cfg = Gemma3VisionConfig(num_layers=num_layers, text_hidden_size=2560)
    tower, projector = hf_models(cfg)
    ours, embedder = gemma3_hf.from_hf(gemma3_hf.to_hf_config(cfg), hf_state_dict(tower, projector), device="meta")
    torch.manual_seed(3)
    px = torch.randn(images, 3, 896, 896)
    with torch.no_grad():
        hidden = tower(pixel_values=px).last_hidden_state
        want = projector(hidden)
        features = ours.encode(px.permute(0, 2, 3, 1)[None])  # one prompt's image + crops: [1, N, 4096, 1152]
        pooled = ours.VisionExit(features[0])[None]  # [1, N, 256, 1152]
        got = embedder(pooled)[0]
        fused = embedder.pool_and_embed(features, 256)[0]  # encode_images' path
    assert got.shape == fused.shape == (images, 256, 2560)
    err, fused_err = rel_err(got, want), rel_err(fused, want)
    print(f"gemma3 released vision config, {num_layers} layers, {images} images, float32 tower+projector: "
          f"rel err {err:.2e} (pool + norm fused: {fused_err:.2e})")
    assert err <= 1e-4 and fused_err <= 1e-4
    for width in (3840, 5376):  # the 12B and 27B projectors on the same tower output
        w = torch.randn(1152, width) / 1152**0.5
        norm = torch.randn(1152) * 0.5
        with torch.no_grad():
            projector.mm_input_projection_weight = torch.nn.Parameter(w)
            projector.mm_soft_emb_norm.weight.copy_(norm)
            wide = VisionEmbedder(cfg.replace(text_hidden_size=width))
            wide.load_state_dict({"mm_soft_embedding_norm.scale": norm, "mm_input_projection.w": w})
            assert rel_err(wide(pooled)[0], projector(hidden)) <= 1e-5


@pytest.mark.parametrize("pool_size", [2, 3])
def test_keras_hub_encoder_matches_keras_hub(pool_size):
    """Against keras-hub 0.32 itself (torch backend; skipped where keras-hub is not installed, as in
    CI: it pulls TensorFlow). Measured 1.6e-7 / 1.5e-7 relative error for pool sizes 2 / 3."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    kh_mod = pytest.importorskip("keras_hub")
    import keras
    import numpy as np

    from vitops.keras_hub import Gemma3VisionEncoder

    if keras.backend.backend() != "torch":
        pytest.skip("keras runs another backend in this process")
    args = {**KH, "pool_size": pool_size}
    torch.manual_seed(0)
    ours = Gemma3VisionEncoder(**args).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "scale" in name:
                p.normal_(0, 0.3)
    kh = kh_mod.models.Gemma3VisionEncoder(**args)
    sd = ours.state_dict()
    blocks = {"query_proj": "MultiHeadDotProductAttention_0.query", "key_proj": "MultiHeadDotProductAttention_0.key",
              "value_proj": "MultiHeadDotProductAttention_0.value", "out_proj": "MultiHeadDotProductAttention_0.out",
              "layer_norm_1": "LayerNorm_0", "layer_norm_2": "LayerNorm_1", "mlp_dense_1": "MlpBlockViT_0.Dense_0",
              "mlp_dense_2": "MlpBlockViT_0.Dense_1"}
    leaves = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
    for w in kh.weights:
        path = w.path
        if path.endswith("embedding_conv/kernel"):
            v = sd["encoder.embedding.weight"].permute(2, 3, 1, 0)  # HWIO
        elif path.endswith("embedding_conv/bias"):
            v = sd["encoder.embedding.bias"]
        elif path.endswith("position_embedding/embeddings"):
            v = sd["encoder.pos_embedding"][0]
        elif path.startswith("image_encoder/encoder_layer_norm/"):
            v = sd["encoder.Transformer.encoder_norm." + leaves[path.rsplit("/", 1)[1]]]
        elif path.startswith("vision_output_encoder/vision_soft_embedding_norm"):
            v = sd["projector.mm_soft_embedding_norm.scale"]
        elif path.startswith("vision_output_encoder/vision_input_projection"):
            v = sd["projector.mm_input_projection.w"]
        else:
            _, block, *rest = path.split("/")
            key = (f"encoder.Transformer.encoderblock_{int(block.rsplit('_', 1)[1])}.{blocks[rest[-2]]}."
                   f"{leaves[rest[-1]]}")
            v = sd[key].T if rest[-1] == "kernel" else sd[key]
        w.assign(v.detach().numpy())
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 56, 56, 3)).astype(np.float32)
    want = torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(kh(images))))
    with torch.no_grad():
        got = ours(torch.from_numpy(images))
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------
# Per module, dtypes, gradients, torch.compile
# ---------------------------------------------------------------------------------------------
def test_each_module_matches_its_hf_module_float32():
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    tower, projector, ours, embedder = build(cfg)
    x = randn(3, 16, 64)
    hf_layer = tower.encoder.layers[1]
    block = ours.Transformer.encoderblock_1
    with torch.no_grad():
        pairs = [
            (block.MlpBlockViT_0(x), hf_layer.mlp(x)),
            (block.MultiHeadDotProductAttention_0(x), hf_layer.self_attn(x)[0]),
            (block(x), hf_layer(x, None)[0] if isinstance(hf_layer(x, None), tuple) else hf_layer(x, None)),
            (ours.Transformer(x), tower.post_layernorm(tower.encoder(inputs_embeds=x).last_hidden_state)),
            (embedder(ours.VisionExit(x)), projector(x)),
            (embedder.mm_soft_embedding_norm(x), projector.mm_soft_emb_norm(x)),
        ]
    for i, (got, want) in enumerate(pairs):
        assert got.shape == want.shape, i
        assert rel_err(got, want) <= 1e-5, i


@PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_against_float64_no_worse_than_hf(dtype, fused):
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    ours_err, hf_err = [], []
    for seed in range(4):
        tower, projector, ours, embedder = build(cfg, seed=seed)
        torch.manual_seed(20 + seed)
        px = torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            ref = projector.double()(tower.double()(pixel_values=px.double()).last_hidden_state)
        tower, projector, ours, embedder = build(cfg, dtype, seed=seed)
        with torch.no_grad():
            hf_out = projector(tower(pixel_values=px.to(dtype)).last_hidden_state)
            out = soft_tokens(ours, embedder, px.permute(0, 2, 3, 1).to(dtype), fused)
        assert out.dtype == dtype
        ours_err.append(rel_err(out.reshape(ref.shape), ref))
        hf_err.append(rel_err(hf_out, ref))
    assert sum(ours_err) / 4 <= 1.05 * sum(hf_err) / 4, (ours_err, hf_err)


@PATHS
def test_compile_fullgraph_dynamic_no_recompile_for_another_crop_count(fused):
    import torch._dynamo
    import torch._dynamo.testing

    cfg = Gemma3VisionConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, image_size=28,
                             patch_size=14, mm_tokens_per_image=1, text_hidden_size=16)
    ours, embedder = Gemma3VisionEncoderLayer(cfg).eval(), VisionEmbedder(cfg).eval()

    def f(images):
        return soft_tokens(ours, embedder, images, fused)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        # batch sizes and crop counts; dynamo specialises sizes of 1 and unifies equal sizes at the first
        # call (duck shaping: N = 3 would take the channel count's constant), so the first call avoids both
        for b, n in ((2, 4), (5, 6), (4, 7)):
            x = randn(b, n, 28, 28, 3)
            torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1


def test_siglip_attention_pooling_head_is_skipped():
    """A SigLIP built without vision_use_head=False carries head.* (unused by Gemma 3): skipped."""
    vc = gemma3_hf.to_hf_vision_config(SMALL)
    vc.vision_use_head = True
    with_head = SiglipVisionModel(vc).eval()
    sd = {f"vision_tower.{k}": v for k, v in with_head.state_dict().items()}
    assert any(".head." in k for k in sd)
    tower = Gemma3VisionEncoderLayer(SMALL)
    report = gemma3_hf.load_hf_state_dict(tower, sd)
    assert not report.missing and not report.unexpected


@PATHS
@pytest.mark.parametrize("device", DEVICES)
def test_tower_and_projector_on_each_device(device, fused):
    """fp32 parity and the bf16 error against float64 (vs HF's own on the same device), per device
    (the CUDA variant runs in tools/gpu_check.sh)."""
    cfg = Gemma3VisionConfig(hidden_size=64, intermediate_size=136, num_layers=2, num_heads=4, image_size=56,
                             patch_size=14, mm_tokens_per_image=4, text_hidden_size=40)
    torch.manual_seed(5)
    px = torch.randn(2, 3, 56, 56)
    tower, projector, ours, embedder = build(cfg)
    with torch.no_grad():
        ref64 = projector.double()(tower.double()(pixel_values=px.double()).last_hidden_state)
    for dtype in (torch.float32, torch.bfloat16):
        tower, projector, ours, embedder = build(cfg, dtype)
        for m in (tower, projector, ours, embedder):
            m.to(device)
        x = px.to(device=device, dtype=dtype)
        with torch.no_grad():
            want = projector(tower(pixel_values=x).last_hidden_state)
            got = soft_tokens(ours, embedder, x.permute(0, 2, 3, 1), fused)[:, 0]
        assert got.device.type == device and got.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(got.cpu(), want.cpu()) < 1e-5
        else:
            assert rel_err(got.cpu(), ref64) <= 1.05 * rel_err(want.cpu(), ref64)

"""vitops.models.llama4 and vitops.hf.llama4: modules, the whole vision model + projector against HF
transformers (random weights, eval), checkpoints, dtypes, gradients, torch.compile, train mode."""

import pytest
import torch

from vitops.hf import llama4 as hf_llama4
from vitops.models import llama4
from vitops.models.llama4 import Llama4VisionConfig

from _utils import DEVICES

hf_mod = pytest.importorskip("transformers.models.llama4.modeling_llama4")

# small configs: several head counts, tile and patch sizes, shuffle ratios 0.5 and 0.25
CONFIGS = {
    "r0.5": Llama4VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, image_size=56,
                               patch_size=14, projector_input_dim=48, projector_output_dim=48, vision_output_dim=48,
                               text_hidden_size=40, rope_theta=10000.0),
    "r0.25": Llama4VisionConfig(hidden_size=48, intermediate_size=768, num_layers=1, num_heads=2, image_size=64,
                                patch_size=8, pixel_shuffle_ratio=0.25, projector_input_dim=32,
                                projector_output_dim=32, vision_output_dim=32, text_hidden_size=24, rope_theta=500.0),
    "heads3": Llama4VisionConfig(hidden_size=96, intermediate_size=384, num_layers=3, num_heads=3, image_size=48,
                                 patch_size=12, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64,
                                 text_hidden_size=None, num_channels=3),
}


def _hf_pair(config, dtype=torch.float32, device="cpu"):
    """HF Llama4VisionModel (SDPA) with random weights and ours loaded from its state dict."""
    torch.manual_seed(0)
    hf = hf_mod.Llama4VisionModel(hf_llama4.to_hf_vision_config(config)).eval()
    ours, _ = hf_llama4.from_hf(hf_llama4.to_hf_vision_config(config), projector=False)
    hf_llama4.load_hf_state_dict(ours, {f"vision_model.{k}": v for k, v in hf.state_dict().items()})
    if dtype == torch.bfloat16:  # never .to(bfloat16): it drops the imaginary part of HF's RoPE buffer
        hf, ours = hf.bfloat16(), ours.bfloat16()
    elif dtype == torch.float16:
        hf, ours = hf.half(), ours.half()
    return hf.to(device), ours.to(device)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("device", DEVICES)
def test_model_matches_hf_float32(name, device):
    config = CONFIGS[name]
    hf, ours = _hf_pair(config, device=device)
    pixels = torch.randn(3, 3, config.image_size, config.image_size, device=device)
    with torch.no_grad():
        want = hf(pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, config.tokens_per_tile, config.vision_output_dim) == want.shape
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, rel
    # MaxText's tile form [b, t, C, H, W] -> [b, t, 144, D]
    tiles = ours(pixels.view(1, 3, *pixels.shape[1:]))
    assert torch.equal(tiles[0], got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_hf(dtype):
    """Error against a float64 run of the same weights, ours vs HF's, mean over seeds."""
    config = CONFIGS["r0.5"]
    errs = {"ours": [], "hf": []}
    for seed in range(3):
        hf32, ours32 = _hf_pair(config)
        hf64, ours64 = hf32.double(), ours32.double()
        hf_low, ours_low = _hf_pair(config, dtype)
        torch.manual_seed(100 + seed)
        pixels = torch.randn(2, 3, config.image_size, config.image_size)
        with torch.no_grad():
            ref = ours64(pixels.double())
            for key, model in (("ours", ours_low), ("hf", None)):
                out = model(pixels.to(dtype)) if model is not None else hf_low(pixels.to(dtype)).last_hidden_state
                errs[key].append(((out.double() - ref).norm() / ref.norm()).item())
        with torch.no_grad():
            assert torch.allclose(hf64(pixels.double()).last_hidden_state, ref, rtol=1e-9, atol=1e-12)
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert mean["ours"] <= mean["hf"] * 1.05 + 1e-6, mean


def test_modules_match_hf():
    config = CONFIGS["r0.5"]
    hf, ours = _hf_pair(config)
    x = torch.randn(2, config.num_patches + 1, config.hidden_size)
    with torch.no_grad():
        # encoder layer (its RoPE from HF's freqs_ci)
        freqs = hf.rotary_embedding(x)
        want = hf.model.layers[0](x, freqs_ci=freqs)[0]
        got = ours.encoder.layers_0(x, ours.positions(2, x.device))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # adapter (pixel shuffle + MLP2)
        h = torch.randn(2, config.num_patches, config.hidden_size)
        torch.testing.assert_close(ours.pixel_shuffle_mlp(h), hf.vision_adapter(h), rtol=1e-5, atol=1e-6)
        # unfold patch embedding
        pixels = torch.randn(2, 3, config.image_size, config.image_size)
        torch.testing.assert_close(ours.unfold_convolution(pixels), hf.patch_embedding(pixels), rtol=1e-6, atol=1e-6)
        # pixel shuffle, the MaxText function
        assert torch.equal(llama4.pixel_shuffle(h, 0.5), hf_mod.pixel_shuffle(h, 0.5))


def test_projector_and_full_checkpoint_round_trip(tmp_path):
    config = CONFIGS["r0.5"]
    hf_cfg = hf_llama4.to_hf_config(config)
    torch.manual_seed(1)
    hf_full = hf_mod.Llama4ForConditionalGeneration(hf_cfg).eval()
    sd = hf_full.state_dict()
    assert any(k.startswith("vision_model.") for k in sd) and "multi_modal_projector.linear_1.weight" in sd
    model, proj = hf_llama4.from_hf(hf_cfg, sd)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        feats = hf_full.vision_model(pixels).last_hidden_state
        want = hf_full.multi_modal_projector(feats.view(-1, feats.shape[-1]))
        got = proj(model(pixels))
    torch.testing.assert_close(got.view(-1, got.shape[-1]), want, rtol=1e-5, atol=1e-6)
    # export equals the HF names and values; a safetensors round trip through a directory
    exported = hf_llama4.to_hf_state_dict((model, proj))
    for k, v in exported.items():
        assert torch.equal(v, sd[k]), k
    assert len(exported) == sum(1 for k in sd if k.startswith(("vision_model.", "multi_modal_projector.")))
    (tmp_path / "ckpt").mkdir()
    hf_llama4.save_hf_safetensors((model, proj), tmp_path / "ckpt" / "model.safetensors")
    hf_cfg.save_pretrained(tmp_path / "ckpt")
    model2, proj2 = hf_llama4.from_hf(tmp_path / "ckpt", tmp_path / "ckpt", device="meta")
    with torch.no_grad():
        assert torch.equal(proj2(model2(pixels)), got)


def test_checkpoint_mismatch_lists_every_key():
    config = CONFIGS["r0.5"]
    model = llama4.Llama4VisionModel(config)
    sd = {f"vision_model.{k}": v for k, v in hf_llama4.to_hf_state_dict(model, vision_prefix="").items()}
    bad = dict(sd)
    del bad["vision_model.model.layers.1.mlp.fc1.bias"]
    bad["vision_model.model.layers.2.mlp.fc1.bias"] = torch.zeros(256)  # a layer the config does not have
    bad["vision_model.layernorm_pre.weight"] = torch.zeros(65)
    bad["vision_model.rotary_embedding.freqs_ci"] = torch.zeros(1)  # ignored (HF buffer)
    bad["language_model.model.embed_tokens.weight"] = torch.zeros(3)  # outside the prefixes: ignored
    with pytest.raises(hf_llama4.CheckpointMismatchError) as err:
        hf_llama4.load_hf_state_dict(model, bad)
    msg = str(err.value)
    assert "missing keys (1):\n    vision_model.model.layers.1.mlp.fc1.bias" in msg
    assert "unexpected keys (1):\n    vision_model.model.layers.2.mlp.fc1.bias" in msg
    assert "vision_model.layernorm_pre.weight: checkpoint (65,) vs module (64,)" in msg
    report = hf_llama4.load_hf_state_dict(model, bad, strict=False)
    assert len(report.missing) == len(report.unexpected) == len(report.mismatched) == 1
    # a standalone Llama4VisionModel's bare names are found without a prefix
    hf_llama4.load_hf_state_dict(model, {k.removeprefix("vision_model."): v for k, v in sd.items()})


def test_config_from_hf_dict_and_released_values():
    released = Llama4VisionConfig()
    assert (released.head_dim, released.grid_side, released.tokens_per_tile) == (88, 24, 144)
    hf_cfg = hf_llama4.to_hf_config(CONFIGS["r0.25"])
    for source in (hf_cfg, hf_cfg.to_dict(), hf_cfg.vision_config):
        c = hf_llama4.config_from_hf(source)
        assert c.replace(text_hidden_size=None) == CONFIGS["r0.25"].replace(text_hidden_size=None)
    assert hf_llama4.config_from_hf(hf_cfg).text_hidden_size == hf_cfg.text_config.hidden_size
    with pytest.raises(ValueError, match="must equal intermediate_size"):
        Llama4VisionConfig(intermediate_size=1000)
    with pytest.raises(ValueError, match="pixel_shuffle_ratio"):
        Llama4VisionConfig(pixel_shuffle_ratio=0.3)
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        Llama4VisionConfig(hidden_size=1410, num_heads=15, intermediate_size=5640)


def test_gradients_match_hf():
    config = CONFIGS["heads3"]
    hf, ours = _hf_pair(config)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    p1, p2 = pixels.clone().requires_grad_(), pixels.clone().requires_grad_()
    hf(p1).last_hidden_state.square().sum().backward()
    ours(p2).square().sum().backward()
    torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5)
    hf_grads = dict(hf.named_parameters())
    for name, g in (("model.layers.0.self_attn.q_proj.weight", ours.encoder.layers_0.self_attention_vision.query),
                    ("patch_embedding.linear.weight", ours.unfold_convolution.vit_unfold_linear)):
        torch.testing.assert_close(g.weight.grad, hf_grads[name].grad, rtol=1e-4, atol=1e-5)


def test_compile_dynamic_one_graph_for_tile_counts():
    config = CONFIGS["r0.5"]
    _, ours = _hf_pair(config)
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    compiled = torch.compile(ours, backend=backend, fullgraph=True, dynamic=True)
    for tiles in (2, 3, 5):
        pixels = torch.randn(tiles, 3, config.image_size, config.image_size)
        with torch.no_grad():
            torch.testing.assert_close(compiled(pixels), ours(pixels), rtol=1e-5, atol=1e-6)
    assert counts["n"] == 1


def test_train_mode_applies_dropout_and_eval_does_not():
    config = CONFIGS["r0.5"].replace(projector_dropout=0.5, attention_dropout=0.5)
    model = llama4.Llama4VisionModel(config)
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    model.eval()
    with torch.no_grad():
        a, b = model(pixels), model(pixels)
        assert torch.equal(a, b)
        assert torch.equal(model(pixels, deterministic=True), a)
        model.train()
        assert not torch.equal(model(pixels), a)
        assert torch.equal(model(pixels, deterministic=True), a)


def test_bad_inputs():
    model = llama4.Llama4VisionModel(CONFIGS["r0.5"])
    with pytest.raises(ValueError, match=r"tiles must be \[B, 3, 56, 56\] \(NCHW\)"):
        model(torch.randn(2, 56, 56, 3))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(56, 56))
    with pytest.raises(NotImplementedError):
        model(torch.randn(1, 3, 56, 56), output_attentions=True)
    with pytest.raises(ValueError, match="needs config.text_hidden_size"):
        llama4.Llama4MultiModalProjector(CONFIGS["heads3"])


# ---------------------------------------------------------------------------------------------
# Released sizes with random weights (slow): all 34 layers at 1 tile; 2 layers at 3 tiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("num_layers,tiles", [(34, 1), (2, 3)])
def test_released_config_float32(num_layers, tiles):
    config = Llama4VisionConfig(num_layers=num_layers)
    hf_cfg = hf_llama4.to_hf_config(config)
    torch.manual_seed(0)
    hf_model = hf_mod.Llama4VisionModel(hf_cfg.vision_config).eval()
    projector = hf_mod.Llama4MultiModalProjector(hf_cfg).eval()
    sd = {**{f"vision_model.{k}": v for k, v in hf_model.state_dict().items()},
          **{f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}}
    model, proj = hf_llama4.from_hf(hf_cfg, sd, device="meta")
    pixels = torch.randn(tiles, 3, 336, 336)
    with torch.no_grad():
        feats = hf_model(pixels).last_hidden_state
        want = projector(feats)
        got = proj(model(pixels))
    assert got.shape == (tiles, 144, 5120)
    err = ((got - want).norm() / want.norm()).item()
    print(f"llama4 released vision config, {num_layers} layers, {tiles} tiles, float32 model+projector: rel err {err:.2e}")
    assert err <= 1e-4


def test_older_config_json_with_int_temperature_tuning(tmp_path):
    """transformers 5.18 rejects an int attn_temperature_tuning (older saved configs have 4): the
    loaders read the file themselves and coerce it."""
    import json

    data = hf_llama4.to_hf_config(CONFIGS["r0.5"]).to_dict()
    data["text_config"]["attn_temperature_tuning"] = 4
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert hf_llama4.config_from_hf(tmp_path) == CONFIGS["r0.5"].replace(text_hidden_size=data["text_config"]["hidden_size"])
    hf_cfg = hf_llama4.load_hf_config(tmp_path / "config.json")
    assert hf_cfg.text_config.attn_temperature_tuning is True
    model, proj = hf_llama4.from_hf(tmp_path)
    assert proj is not None and model.config.num_layers == 2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_autocast_bitwise_equal_to_hf(name):
    """CPU autocast (bf16) over the float32 model: the patch rows leave their Linear in bf16 and meet the
    float32 CLS parameter in torch.cat, which promotes to float32 (the position table follows); the
    rotation reads bf16 q/k and returns bf16 as HF's type_as. Casting CLS to the rows' dtype instead
    (the earlier code) kept the residual stream in bf16: 1.3x HF's error against float64."""
    config = CONFIGS[name]
    hf, ours = _hf_pair(config)
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = hf(pixels).last_hidden_state
        got = ours(pixels)
    assert got.dtype == want.dtype and torch.equal(got, want)

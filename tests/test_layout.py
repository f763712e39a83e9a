"""The package layout: lazy family imports, the MaxText module names, the public names kept, the
shared layers (against transformers) and the MaxText layer-pattern helpers of Llama 4 and Gemma 3."""

import subprocess
import sys

import pytest
import torch

import vitops
from vitops import layers
from vitops.models import gemma3, llama4


def test_import_vitops_loads_no_family():
    code = ("import sys, vitops; print(sorted(m for m in sys.modules if m.startswith('vitops.')"
            " and m.split('.')[1] in ('models', 'hf', 'keras_hub', 'preprocess', 'serving')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_maxtext_module_names_and_public_names():
    import importlib

    for name in ("gemma4_vision", "llama4", "gemma3"):
        assert importlib.import_module(f"vitops.models.{name}") is getattr(vitops.models, name)
    from vitops.hf import CheckpointMismatchError, from_hf, load_hf_state_dict  # noqa: F401
    from vitops.keras_hub import Gemma4VisionEncoder
    from vitops.models import Gemma4VisionEncoderLayer
    from vitops.preprocess import Gemma4ImageProcessor, demo_image  # noqa: F401

    assert Gemma4VisionEncoder is vitops.keras_hub.gemma4.Gemma4VisionEncoder
    assert Gemma4VisionEncoderLayer is vitops.models.gemma4_vision.Gemma4VisionEncoderLayer
    assert Gemma4ImageProcessor is vitops.preprocess.gemma4.Gemma4ImageProcessor
    assert CheckpointMismatchError is vitops.hf._checkpoint.CheckpointMismatchError
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        vitops.models.nope  # noqa: B018


# ---------------------------------------------------------------------------------------------
# shared layers against transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_kinds_match_hf(dtype):
    gemma3_hf = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    gemma4_hf = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    x = (3 * torch.randn(4, 7, 48)).to(dtype)
    w = 0.5 * torch.randn(48)
    hf3 = gemma3_hf.Gemma3RMSNorm(48, eps=1e-6)
    hf4 = gemma4_hf.Gemma4RMSNorm(48, eps=1e-6)
    ours3 = layers.RMSNorm(48, 1e-6, plus_one=True)
    ours4 = layers.RMSNorm(48, 1e-6)
    with torch.no_grad():
        for m in (hf3, hf4, ours3, ours4):
            m.weight.copy_(w) if hasattr(m, "weight") else m.scale.copy_(w)
        # bitwise on the CPU (torch's rsqrt there is 1 / sqrt, the same as pow(., -0.5))
        assert torch.equal(ours3(x), hf3(x))
        assert torch.equal(ours4(x), hf4(x))
        assert ours3.kind == "scale_plus_one" and ours4.kind == "scale"
        assert torch.equal(layers.rms_norm(x, None, 1e-6), layers.rms_norm(x, torch.ones(48), 1e-6))
    assert not layers.RMSNorm(48, plus_one=True).scale.any()  # Gemma 3 initialises the offset weight to zero


def test_rms_norm_rejects_a_bad_kind_or_weight():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        layers.rms_norm(x, torch.ones(8), 1e-6, "layer")
    with pytest.raises(ValueError, match="kind='rms' takes no scale"):
        layers.rms_norm(x, torch.ones(8), 1e-6, "rms")
    with pytest.raises(ValueError, match="kind='scale_plus_one' needs a scale"):
        layers.rms_norm(x, None, 1e-6, "scale_plus_one")
    with pytest.raises(ValueError, match="plus_one needs with_scale=True"):
        layers.RMSNorm(8, with_scale=False, plus_one=True)


def test_gated_mlp_matches_hf_gemma3_mlp():
    gemma3_hf = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    config = pytest.importorskip("transformers.models.gemma3.configuration_gemma3").Gemma3TextConfig(
        hidden_size=32, intermediate_size=80, hidden_activation="gelu_pytorch_tanh")
    hf = gemma3_hf.Gemma3MLP(config)
    ours = layers.GatedMlp(32, 80, "gelu_pytorch_tanh")
    with torch.no_grad():
        ours.wi_0.weight.copy_(hf.gate_proj.weight)
        ours.wi_1.weight.copy_(hf.up_proj.weight)
        ours.wo.weight.copy_(hf.down_proj.weight)
        x = torch.randn(3, 5, 32)
        assert torch.equal(ours(x), hf(x))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        layers.GatedMlp(4, 8, "swish")


def test_attention_mask():
    keys = torch.tensor([[True, True, False], [True, False, False]])
    seg = torch.tensor([[0, 0, 1], [2, 2, 2]])
    assert layers.attention_mask(2, 3) is None
    m = layers.attention_mask(2, 3, keys, seg)
    assert m.shape == (2, 1, 3, 3)
    want = keys[:, None, None, :] & (seg[:, :, None] == seg[:, None, :])[:, None]
    assert torch.equal(m, want)


# ---------------------------------------------------------------------------------------------
# MaxText layer-pattern helpers, against HF's configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interval", [1, 2, 3, 4, 7])
def test_llama4_layer_patterns_match_hf(interval):
    cfg_mod = pytest.importorskip("transformers.models.llama4.configuration_llama4")
    num_layers = 12
    hf = cfg_mod.Llama4TextConfig(num_hidden_layers=num_layers, no_rope_layer_interval=interval,
                                  interleave_moe_layer_step=interval)
    nope = [llama4.determine_is_nope_layer(i, interval) for i in range(num_layers)]
    moe = [llama4.determine_is_moe_layer(i, interval) for i in range(num_layers)]
    assert nope == [not rope for rope in hf.no_rope_layers]  # HF's polarity: 1 = RoPE
    assert [i for i, m in enumerate(moe) if m] == list(hf.moe_layers)


def test_llama4_layer_patterns_guard_nonpositive_intervals():
    for n in (0, -1, None):
        assert not any(llama4.determine_is_nope_layer(i, n) for i in range(8))
        assert not any(llama4.determine_is_moe_layer(i, n) for i in range(8))
    assert [i for i in range(12) if llama4.determine_is_nope_layer(i, 4)] == [3, 7, 11]
    assert [i for i in range(6) if llama4.determine_is_moe_layer(i, 2)] == [1, 3, 5]


def test_gemma3_attention_pattern_matches_hf():
    cfg_mod = pytest.importorskip("transformers.models.gemma3.configuration_gemma3")
    hf = cfg_mod.Gemma3TextConfig(num_hidden_layers=26)
    ours = [gemma3.get_attention_type(i) for i in range(26)]
    kinds = {"sliding_attention": layers.AttentionType.LOCAL_SLIDING, "full_attention": layers.AttentionType.GLOBAL}
    assert ours == [kinds[t] for t in hf.layer_types]
    assert gemma3.GEMMA3_ATTENTION_PATTERN.count(layers.AttentionType.GLOBAL) == 1


def test_gemma3_query_pre_attn_scalar():
    from types import SimpleNamespace

    assert gemma3.get_query_pre_attn_scalar(SimpleNamespace(model_name="gemma3-4b", head_dim=256)) == 256**-0.5
    assert gemma3.get_query_pre_attn_scalar({"model_name": "gemma3-12b", "head_dim": 256}) == 256**-0.5
    cfg = SimpleNamespace(model_name="gemma3-27b", head_dim=128, base_emb_dim=5376, base_num_query_heads=32)
    assert gemma3.get_query_pre_attn_scalar(cfg) == 168**-0.5
    with pytest.raises(ValueError, match="Unsupported model name: gemma3-1b"):
        gemma3.get_query_pre_attn_scalar(SimpleNamespace(model_name="gemma3-1b", head_dim=256))


# ---------------------------------------------------------------------------------------------
# the shared kernels cover the other families' layouts (what the Llama 4 and Gemma 3 ops build on)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side,ratio,channels", [(4, 0.5, 3), (8, 0.25, 5), (24, 0.5, 16), (6, 1 / 3, 2)])
def test_llama4_pixel_shuffle_is_patchify_of_the_token_grid(side, ratio, channels):
    """HF's Llama 4 pixel_shuffle with ratio 1/n equals patchify (csrc/kernels/permute) of the
    [side, side, C] token grid with patch n: same (dh, dw, c) order, tokens row-major."""
    llama4_hf = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    x = torch.randn(2, side * side, channels)
    n = round(1 / ratio)
    patches, _ = vitops.patchify(x.view(2, side, side, channels), n)
    assert torch.equal(patches, llama4_hf.pixel_shuffle(x, ratio))


@pytest.mark.parametrize("side,pooled", [(8, 4), (12, 3), (6, 6), (64, 16)])
def test_gemma3_square_avg_pool_is_the_full_grid_case_of_position_pooling(side, pooled):
    """HF Gemma 3's exit (AvgPool2d over the square token grid, flattened row-major) equals
    avg_pool_by_positions (csrc/kernels/pool) with the full grid's positions."""
    d = 24
    x = torch.randn(2, side * side, d)
    k = side // pooled
    grid = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, d, side, side), k, k)
    want = grid.flatten(2).transpose(1, 2)
    idx = torch.arange(side * side)
    pos = torch.stack([idx % side, idx // side], -1).expand(2, -1, -1)
    got, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=pooled * pooled)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert mask.all()

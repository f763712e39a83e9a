"""vitops.serving.estimates: cache-entry bytes for the released configs (the facts file's table) and
against the soft tokens the towers produce; the activation-memory model against the measured peak
of live tensors during the forward (CPU: tests/_memory.py; CUDA: torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from vitops.models import gemma3 as g3m
from vitops.models import gemma4_vision as g4m
from vitops.models import llama4 as l4m
from vitops.serving import estimate_activation_memory, estimate_vision_cache_entry_bytes, vision_cache_entry_shape

from _memory import LiveTensorBytes

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# Released configs, built with transformers' config classes (no hub)
# ---------------------------------------------------------------------------------------------
def gemma4_config(text_hidden: int, large: bool):
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    vision = (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   num_key_value_heads=16, head_dim=72, standardize=True) if large else
              dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                   num_key_value_heads=12, head_dim=64, use_clipped_linears=True))
    return Gemma4Config(text_config=Gemma4TextConfig(hidden_size=text_hidden),
                        vision_config=Gemma4VisionConfig(patch_size=16, pooling_kernel_size=3,
                                                         position_embedding_size=10240, **vision))


def gemma3_config(text_hidden: int):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=Gemma3TextConfig(hidden_size=text_hidden), vision_config=vision,
                        mm_tokens_per_image=256)


def llama4_config():
    from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig

    vision = Llama4VisionConfig(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                                image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
                                projector_output_dim=4096, vision_output_dim=4096)
    return Llama4Config(vision_config=vision, text_config=Llama4TextConfig(hidden_size=5120))


RELEASED = {  # facts_transformers_5_18.md section 6 D6: bfloat16 bytes per entry
    "gemma4-e2b": (lambda: gemma4_config(1536, False), 3_492_864, (1137, 1536)),
    "gemma4-e4b": (lambda: gemma4_config(2560, False), 5_821_440, (1137, 2560)),
    "gemma4-26b-a4b": (lambda: gemma4_config(2816, True), 6_403_584, (1137, 2816)),
    "gemma4-31b": (lambda: gemma4_config(5376, True), 12_225_024, (1137, 5376)),
    "gemma3-4b": (lambda: gemma3_config(2560), 1_310_720, (256, 2560)),
    "gemma3-12b": (lambda: gemma3_config(3840), 1_966_080, (256, 3840)),
    "gemma3-27b": (lambda: gemma3_config(5376), 2_752_512, (256, 5376)),
    "llama4-scout-maverick": (llama4_config, 25_067_520, (17 * 144, 5120)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_entry_bytes(name, tmp_path):
    make, expected, shape = RELEASED[name]
    config = make()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    for form in (config, config.to_dict(), path, tmp_path):  # object, dict, config.json, checkpoint directory
        assert estimate_vision_cache_entry_bytes(form) == expected
        assert vision_cache_entry_shape(form) == shape
    assert estimate_vision_cache_entry_bytes(config, torch.float32) == 2 * expected
    if name.startswith("gemma4"):
        # a budget instead of MAX's bound (the processor's largest budget is 1120 < 1137)
        assert vision_cache_entry_shape(config, max_soft_tokens=280) == (280, shape[1])
        assert estimate_vision_cache_entry_bytes(config, max_soft_tokens=1120) == 1120 * shape[1] * 2
    if name.startswith("llama4"):
        assert vision_cache_entry_shape(config, max_tiles=4) == (5 * 144, 5120)
        assert vision_cache_entry_shape(config, max_tiles=1) == (144, 5120)  # one tile: no global tile


def test_released_activation_memory_scales():
    e2b = gemma4_config(1536, False)
    one = estimate_activation_memory(e2b, 1)
    assert estimate_activation_memory(e2b, 4) == 4 * one  # every term is per image
    assert estimate_activation_memory(e2b, 0) == 0
    assert estimate_activation_memory(e2b, 1, max_soft_tokens=280) < one
    assert estimate_activation_memory(e2b, 1, dtype=torch.float32) > one
    for config in (gemma3_config(2560), llama4_config()):
        assert 0 < estimate_activation_memory(config, 1, projector=False) <= estimate_activation_memory(config, 1)


def test_estimating_one_family_loads_no_other():
    import ast
    import subprocess
    import sys

    config = {"model_type": "gemma3", "mm_tokens_per_image": 256, "text_config": {"hidden_size": 2560},
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                                "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896,
                                "patch_size": 14}}
    code = ("import sys, vitops.serving as s; "
            f"assert s.estimate_vision_cache_entry_bytes({config!r}) == 1310720; "
            f"s.estimate_activation_memory({config!r}, 2); "
            "print(sorted(m for m in sys.modules if m.startswith(('vitops.models.', 'vitops.hf.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(out)
    assert "vitops.models.gemma3" in loaded
    assert not [m for m in loaded if "gemma4" in m or "llama4" in m], loaded


def test_bad_input():
    from transformers import Gemma4Config, Gemma4VisionConfig

    with pytest.raises(ValueError, match="no vision_config"):
        estimate_vision_cache_entry_bytes(Gemma4Config())  # the text/audio-only default: MAX raises too
    with pytest.raises(ValueError, match="no text_config"):
        estimate_vision_cache_entry_bytes(Gemma4VisionConfig())  # the vision config alone
    with pytest.raises(ValueError, match="no text_config"):
        estimate_vision_cache_entry_bytes({"model_type": "gemma4", "vision_config": Gemma4VisionConfig().to_dict()})
    with pytest.raises(ValueError, match="no text_config"):
        estimate_activation_memory(Gemma4VisionConfig(), 1)
    assert estimate_activation_memory(Gemma4VisionConfig(), 1, projector=False) > 0
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        estimate_vision_cache_entry_bytes({"model_type": "llama"})
    with pytest.raises(TypeError, match="hf_config must be an HF config"):
        estimate_vision_cache_entry_bytes(3)
    config = gemma3_config(2560)
    with pytest.raises(ValueError, match="`max_soft_tokens` is Gemma 4's"):
        estimate_vision_cache_entry_bytes(config, max_soft_tokens=280)
    with pytest.raises(ValueError, match="`max_tiles` is Llama 4's"):
        estimate_activation_memory(config, 1, max_tiles=4)
    with pytest.raises(ValueError, match="`max_soft_tokens` must be an int >= 1"):
        estimate_vision_cache_entry_bytes(gemma4_config(1536, False), max_soft_tokens=0)
    with pytest.raises(ValueError, match="`max_tiles` must be an int >= 1"):
        estimate_vision_cache_entry_bytes(llama4_config(), max_tiles=1.5)
    with pytest.raises(ValueError, match="`batch` must be an int >= 0"):
        estimate_activation_memory(config, -1)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        estimate_vision_cache_entry_bytes(config, torch.int8)
    with pytest.raises(TypeError, match="`pixel_dtype` must be a floating torch.dtype"):
        estimate_activation_memory(config, 1, pixel_dtype="float32")


# ---------------------------------------------------------------------------------------------
# Small random configs of each family, worst-case inputs
# ---------------------------------------------------------------------------------------------
def random_gemma4(rng: random.Random) -> g4m.Gemma4VisionConfig:
    heads, hd = rng.choice([2, 4]), rng.choice([8, 16])
    return g4m.Gemma4VisionConfig(
        hidden_size=heads * hd + rng.choice([0, 8]), intermediate_size=rng.choice([32, 96, 200]),
        num_layers=rng.choice([1, 2]), num_heads=heads, num_kv_heads=rng.choice([h for h in (1, 2, heads) if heads % h == 0]),
        head_dim=hd, patch_size=rng.choice([2, 4]), pooling_kernel_size=rng.choice([1, 2, 3]),
        position_embedding_size=rng.choice([64, 150, 300]), text_hidden_size=rng.choice([24, 100]),
        use_clipped_linears=rng.random() < 0.5, standardize=rng.random() < 0.5,
        hidden_activation=rng.choice(["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"]))


def random_gemma3(rng: random.Random) -> g3m.Gemma3VisionConfig:
    side, p, heads = rng.choice([4, 6, 8]), rng.choice([2, 3]), rng.choice([2, 4])
    return g3m.Gemma3VisionConfig(
        hidden_size=heads * rng.choice([8, 16]), intermediate_size=rng.choice([40, 128]), num_layers=rng.choice([1, 2]),
        num_heads=heads, image_size=side * p, patch_size=p, mm_tokens_per_image=rng.choice([1, 4, side * side])
        if side % 2 == 0 else 1, text_hidden_size=rng.choice([24, 100]))


def random_llama4(rng: random.Random) -> l4m.Llama4VisionConfig:
    heads, hd, p, side = rng.choice([2, 4]), rng.choice([8, 16]), rng.choice([2, 4]), rng.choice([4, 6])
    width = rng.choice([32, 80])
    return l4m.Llama4VisionConfig(
        hidden_size=heads * hd, intermediate_size=heads * hd * 4, num_layers=rng.choice([0, 1, 2]), num_heads=heads,
        image_size=side * p, patch_size=p, projector_input_dim=width, projector_output_dim=width,
        vision_output_dim=width, text_hidden_size=rng.choice([24, 100]))


def gemma4_inputs(config, batch: int, tokens: int, pixel_dtype=torch.float32):
    """``batch`` images filling ``tokens`` soft tokens: a k x (tokens k) patch grid, no padding."""
    k = config.pooling_kernel_size
    length, width = tokens * k * k, tokens * k
    idx = torch.arange(length)
    positions = torch.stack([idx % width, idx // width], -1).expand(batch, length, 2).contiguous()
    return torch.rand(batch, length, config.patch_dim).to(pixel_dtype), positions


def encode(family: str, config, batch: int, dtype: torch.dtype, *, tokens=None, max_tiles=1, projector=True,
           pixel_dtype=None, device="cpu"):
    """(run, worst-case inputs): ``run()`` encodes them with the family's tower (+ projector)."""
    kw = dict(device=device, dtype=dtype)
    if family == "gemma4":
        tower = g4m.Gemma4VisionEncoderLayer(config, **kw).eval()
        proj = g4m.Gemma4VisionProjector(config, **kw).eval() if projector else None
        pixels, positions = gemma4_inputs(config, batch, tokens, pixel_dtype or torch.float32)
        pixels, positions = pixels.to(device), positions.to(device)

        def run():
            out, _ = tower(pixels, image_position_ids=positions)
            return proj(out) if proj is not None else out
    elif family == "gemma3":
        tower = g3m.Gemma3VisionEncoderLayer(config, **kw).eval()
        proj = g3m.VisionEmbedder(config, **kw).eval() if projector else None
        # the processor's layout: float32 NCHW, read as NHWC [B, 1, S, S, 3]
        pixels = torch.rand(batch, 3, config.image_size, config.image_size, device=device)
        pixels = pixels.to(pixel_dtype or torch.float32).permute(0, 2, 3, 1)[:, None]

        def run():
            return g3m.encode_images(tower, proj, pixels)
    else:
        model = l4m.Llama4VisionModel(config, **kw).eval()
        proj = l4m.Llama4MultiModalProjector(config, **kw).eval() if projector else None
        tiles = max_tiles + 1 if max_tiles > 1 else 1
        pixels = torch.rand(batch * tiles, 3, config.image_size, config.image_size, device=device)
        pixels = pixels.to(pixel_dtype or torch.bfloat16)  # the processor's bfloat16 tiles

        def run():
            out = model(pixels)
            return proj(out) if proj is not None else out
    return run


FAMILIES = {"gemma4": random_gemma4, "gemma3": random_gemma3, "llama4": random_llama4}


# ---------------------------------------------------------------------------------------------
# Entry bytes == the soft tokens the towers produce
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_entry_bytes_equal_the_encoded_soft_tokens(family, seed):
    rng = random.Random(seed)
    config = FAMILIES[family](rng)
    options = {}
    if family == "gemma4":
        options = {"max_soft_tokens": rng.choice([3, 7])} if seed == 2 else {}
        tokens = options.get("max_soft_tokens", config.position_embedding_size // config.pooling_kernel_size**2)
        run = encode(family, config, 1, torch.bfloat16, tokens=tokens)
    elif family == "llama4":
        options = {"max_tiles": rng.choice([1, 2, 4])}
        run = encode(family, config, 1, torch.bfloat16, max_tiles=options["max_tiles"])
    else:
        run = encode(family, config, 1, torch.bfloat16)
    with torch.no_grad():
        soft = run().reshape(-1, config.text_hidden_size)  # one image's [tokens, text hidden]
    assert vision_cache_entry_shape(config, **options) == tuple(soft.shape)
    assert estimate_vision_cache_entry_bytes(config, **options) == soft.nbytes
    assert estimate_vision_cache_entry_bytes(config, torch.float32, **options) == soft.float().nbytes


def test_entry_bytes_from_hf_configs_equal_vitops_configs():
    from vitops.hf import gemma3 as hf3
    from vitops.hf import gemma4 as hf4
    from vitops.hf import llama4 as hf4l
    from transformers import Gemma4Config, Gemma4TextConfig

    rng = random.Random(5)
    g4 = random_gemma4(rng)
    hf = Gemma4Config(text_config=Gemma4TextConfig(hidden_size=g4.text_hidden_size),
                      vision_config=hf4.to_hf_vision_config(g4))
    g3, l4 = random_gemma3(rng), random_llama4(rng)
    for ours, theirs in ((g4, hf), (g3, hf3.to_hf_config(g3)), (l4, hf4l.to_hf_config(l4))):
        assert estimate_vision_cache_entry_bytes(theirs) == estimate_vision_cache_entry_bytes(ours)
        for batch in (1, 3):
            assert estimate_activation_memory(theirs, batch) == estimate_activation_memory(ours, batch)


def test_gemma4_processed_images_fit_their_entry():
    """Real images through Gemma4ImageProcessor: each image's soft tokens fit the budget's entry."""
    from vitops.preprocess import Gemma4ImageProcessor

    config = g4m.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, patch_size=4,
                                    position_embedding_size=128, text_hidden_size=40)
    tower, proj = g4m.Gemma4VisionEncoderLayer(config).eval(), g4m.Gemma4VisionProjector(config).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((48, 48), (30, 90), (120, 36))]
    batch = Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)(images)
    with torch.no_grad():
        out, mask = tower(batch.pixel_values, image_position_ids=batch.pixel_position_ids)
        soft = proj(out)
    entry = estimate_vision_cache_entry_bytes(config, torch.float32, max_soft_tokens=70)
    assert soft[0].nbytes == entry  # the padded rows of one image: the budget
    for i, n in enumerate(batch.num_soft_tokens_per_image):
        assert soft[i][mask[i]].nbytes == n * 40 * 4 <= entry


# ---------------------------------------------------------------------------------------------
# Activation memory == the measured peak (within 10%, from above)
# ---------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def measure_cpu(run) -> int:
    with torch.no_grad(), LiveTensorBytes() as live:
        run()
    return live.peak


def worst_case(family: str, config, rng: random.Random) -> tuple[dict, dict]:
    """(encode kwargs, estimate kwargs) of a random worst case."""
    if family == "gemma4":
        budget = rng.choice([None, 7])
        tokens = budget or config.position_embedding_size // config.pooling_kernel_size**2
        return {"tokens": tokens}, ({"max_soft_tokens": budget} if budget else {})
    if family == "llama4":
        tiles = rng.choice([1, 2, 4])
        return {"max_tiles": tiles}, {"max_tiles": tiles}
    return {}, {}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_estimate_bounds_the_measured_peak(family, seed, dtype):
    rng = random.Random(1000 * seed + DTYPES.index(dtype))
    config = FAMILIES[family](rng)
    batch = rng.choice([1, 2, 3])
    projector = rng.random() < 0.8
    run_kw, est_kw = worst_case(family, config, rng)
    pixel_dtype = rng.choice([None, torch.bfloat16, torch.float32, torch.float16])
    measured = measure_cpu(encode(family, config, batch, dtype, projector=projector, pixel_dtype=pixel_dtype, **run_kw))
    estimate = estimate_activation_memory(config, batch, dtype=dtype, projector=projector, pixel_dtype=pixel_dtype,
                                          **est_kw)
    assert measured <= estimate <= 1.1 * measured, (config, batch, projector, estimate / measured)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma4-e2b", "gemma4-31b", "gemma3", "llama4"])
def test_activation_estimate_at_released_widths(name):
    """The released widths and sequence lengths in bfloat16, with two layers (the peak is per layer;
    the second layer is where Gemma 3's and Llama 4's encoder input is still held): within 0.1%."""
    dtype = torch.bfloat16
    family, config, run_kw, est_kw = {
        "gemma4-e2b": ("gemma4", g4m.Gemma4VisionConfig.preset("e2b", num_layers=2), {"tokens": 280},
                       {"max_soft_tokens": 280}),
        "gemma4-31b": ("gemma4", g4m.Gemma4VisionConfig.preset("31b", num_layers=2), {"tokens": 280},
                       {"max_soft_tokens": 280}),
        "gemma3": ("gemma3", g3m.Gemma3VisionConfig(num_layers=2, text_hidden_size=2560), {}, {}),
        "llama4": ("llama4", l4m.Llama4VisionConfig(num_layers=2), {"max_tiles": 1}, {"max_tiles": 1}),
    }[name]
    measured = measure_cpu(encode(family, config, 1, dtype, **run_kw))
    estimate = estimate_activation_memory(config, 1, dtype=dtype, **est_kw)
    assert measured <= estimate <= 1.001 * measured, estimate / measured


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_estimate_bounds_the_cuda_peak(family, dtype):
    """On a GPU: ``torch.cuda.max_memory_allocated`` during the forward, after a warm-up (cuBLAS and
    cuDNN workspaces are then allocated already). Larger configs than the CPU test, so that the
    allocator's 512-byte rounding and the fused attention kernels' small buffers stay in the margin."""
    configs = {
        "gemma4": g4m.Gemma4VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                                         patch_size=8, position_embedding_size=2304, text_hidden_size=512),
        "gemma3": g3m.Gemma3VisionConfig(hidden_size=256, intermediate_size=960, num_layers=2, num_heads=4,
                                         image_size=448, patch_size=14, text_hidden_size=512),
        "llama4": l4m.Llama4VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                                         image_size=224, patch_size=14, projector_input_dim=512,
                                         projector_output_dim=512, vision_output_dim=512, text_hidden_size=512),
    }
    config = configs[family]
    run_kw, est_kw = {"gemma4": ({"tokens": 256}, {"max_soft_tokens": 256}), "gemma3": ({}, {}),
                      "llama4": ({"max_tiles": 4}, {"max_tiles": 4})}[family]
    run = encode(family, config, 2, dtype, device="cuda", **run_kw)
    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
    estimate = estimate_activation_memory(config, 2, dtype=dtype, **est_kw)
    assert measured <= 1.05 * estimate and estimate <= 1.5 * measured, estimate / measured

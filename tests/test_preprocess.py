"""vitops.preprocess vs HF transformers' Gemma4ImageProcessorPil (pinned transformers 5.18)."""

from __future__ import annotations

import math
import pathlib
import runpy

import numpy as np
import pytest
import torch

from vitops import preprocess as pp

Image = pytest.importorskip("PIL.Image")
hf_pil = pytest.importorskip("transformers.models.gemma4.image_processing_pil_gemma4")

BUDGETS = (70, 140, 280, 560, 1120)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth waves plus noise: exercises both the filter shape and uint8 saturation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(x / 17 + y / 29), 128 + 90 * np.cos(y / 13), 255 * x / max(w, 1)], -1)
    img += rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _hf(images, budget: int):
    out = hf_pil.Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"], [int(n) for n in out["num_soft_tokens_per_image"]]


def _assert_same_as_hf(ours: pp.Gemma4Preprocessed, images, budget: int) -> None:
    pv, pos, ntok = _hf(images, budget)
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_position_ids.dtype == torch.int64
    assert ours.num_soft_tokens_per_image == ntok
    assert torch.equal(ours.pixel_position_ids, pos)
    assert torch.equal(ours.pixel_values, pv)  # bitwise


# ------------------------------------------------------------------------------------------------
# size rule
# ------------------------------------------------------------------------------------------------
def _sizes():
    rng = np.random.default_rng(1)
    fixed = [(480, 640), (672, 960), (960, 672), (896, 896), (1, 1), (1, 5000), (5000, 1), (7, 2000),
             (50, 3000), (3000, 50), (20, 30), (37, 53), (4032, 3024), (100, 101)]
    rand = [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(200)]
    return fixed + rand


@pytest.mark.parametrize("budget", BUDGETS)
def test_size_rule_matches_hf(budget):
    for h, w in _sizes():
        for p, k in ((16, 3), (14, 2)):
            mp = budget * k * k
            ref = hf_pil.get_aspect_ratio_preserving_size(h, w, p, mp, k)
            assert pp.get_aspect_ratio_preserving_size(h, w, p, mp, k) == ref, (h, w, p, k)
            th, tw = ref
            assert th % (k * p) == 0 and tw % (k * p) == 0 and th * tw <= mp * p * p


def test_size_rule_known_values():
    proc = pp.Gemma4ImageProcessor()
    assert proc.target_size(672, 960) == (672, 960)  # the exact fit: 42 x 60 patches = 2520
    assert proc.num_soft_tokens(672, 960) == 280
    assert proc.target_size(896, 896) == (768, 768)
    # Extreme aspect ratio: the short side rounds to 0 and is set to one pooling block (48 px),
    # the long side to floor(long/short) blocks capped at the budget.
    assert proc.target_size(10, 5000) == (48, 280 * 48)
    assert proc.target_size(5000, 10) == (280 * 48, 48)
    assert proc.target_size(50, 3000, 70) == (48, 3072)


def test_size_rule_errors_like_hf():
    # Unreachable with the supported budgets (the area always fits at least one pooling block), but
    # the function raises like HF's for budgets below one block...
    for fn in (pp.get_aspect_ratio_preserving_size, hf_pil.get_aspect_ratio_preserving_size):
        with pytest.raises(ValueError, match="0 x 0"):
            fn(10, 10, 16, 4, 3)
    # ...and on an empty image, where HF would raise ZeroDivisionError instead.
    with pytest.raises(ValueError, match="positive size"):
        pp.get_aspect_ratio_preserving_size(0, 10, 16, 2520, 3)


# ------------------------------------------------------------------------------------------------
# parity with HF's PIL backend
# ------------------------------------------------------------------------------------------------
PARITY_SIZES = [(480, 640), (672, 960), (960, 672), (50, 3000), (3000, 50), (7, 700), (20, 30), (333, 517)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("hw", PARITY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pil_matches_hf_bitwise(hw, budget):
    img = Image.fromarray(_noisy(*hw, seed=hw[0] * 7 + hw[1]))
    out = pp.Gemma4ImageProcessor(max_soft_tokens=budget)(img)
    _assert_same_as_hf(out, img, budget)
    th, tw = out.resized_hw[0]
    assert out.patch_grid_hw == [(th // 16, tw // 16)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_demo_image_matches_hf_bitwise(budget):
    img = pp.demo_image()
    _assert_same_as_hf(pp.preprocess_gemma4(img, max_soft_tokens=budget), img, budget)


@pytest.mark.parametrize("budget", (70, 280, 1120))
def test_batch_of_different_sizes(budget):
    imgs = [Image.fromarray(_noisy(h, w, seed=i)) for i, (h, w) in enumerate([(480, 640), (1000, 200), (64, 64), (672, 960)])]
    proc = pp.Gemma4ImageProcessor(max_soft_tokens=budget)
    out = proc(imgs)
    _assert_same_as_hf(out, imgs, budget)
    assert out.pixel_values.shape == (4, budget * 9, 768)
    # each image on its own gives the same rows
    for i, im in enumerate(imgs):
        single = proc(im)
        assert torch.equal(single.pixel_values[0], out.pixel_values[i])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_mode_conversion_matches_hf(mode):
    rgb = Image.fromarray(_noisy(300, 410, seed=3))
    if mode == "RGBA":
        img = rgb.copy()
        img.putalpha(Image.fromarray(_noisy(300, 410, seed=4)[..., 0]))
    elif mode == "P":
        img = rgb.quantize(64)
    elif mode == "I;16":
        img = Image.fromarray((_noisy(300, 410, seed=5)[..., 0].astype(np.uint16) * 3)).convert("I;16")
    else:
        img = rgb.convert(mode)
    assert img.mode == mode
    _assert_same_as_hf(pp.preprocess_gemma4(img), img, 280)


def test_numpy_uint8_matches_hf_bitwise():
    a = _noisy(321, 123, seed=9)
    ref = pp.preprocess_gemma4(Image.fromarray(a))
    for arr, cl in ((a, None), (a.transpose(2, 0, 1).copy(), None), (a.transpose(2, 0, 1), False)):
        out = pp.preprocess_gemma4(arr, channels_last=cl)
        assert torch.equal(out.pixel_values, ref.pixel_values)
    _assert_same_as_hf(pp.preprocess_gemma4(a), a, 280)


def test_uint8_tensor_with_pil_backend_is_bitwise():
    a = _noisy(500, 260, seed=2)
    out = pp.preprocess_gemma4(torch.from_numpy(a), backend="pil", max_soft_tokens=140)
    _assert_same_as_hf(out, Image.fromarray(a), 140)


def test_grayscale_and_rgba_arrays_follow_pil_conversion():
    a = _noisy(200, 300, seed=6)
    gray = a[..., 0]
    ref = pp.preprocess_gemma4(Image.fromarray(gray).convert("RGB"))
    for g in (gray, gray[..., None], torch.from_numpy(gray), torch.from_numpy(gray)[None]):
        out = pp.preprocess_gemma4(g, backend="pil")
        assert torch.equal(out.pixel_values, ref.pixel_values)
    rgba = np.concatenate([a, a[..., :1]], -1)
    ref = pp.preprocess_gemma4(Image.fromarray(rgba, "RGBA"))  # PIL drops alpha without compositing
    assert torch.equal(pp.preprocess_gemma4(rgba).pixel_values, ref.pixel_values)


# ------------------------------------------------------------------------------------------------
# output structure
# ------------------------------------------------------------------------------------------------
def test_padding_and_positions():
    imgs = [Image.fromarray(_noisy(480, 640)), Image.fromarray(_noisy(90, 1000, seed=1))]
    out = pp.preprocess_gemma4(imgs, max_soft_tokens=70)
    assert out.pixel_values.shape == (2, 630, 768) and out.pixel_position_ids.shape == (2, 630, 2)
    assert out["image_position_ids"] is out.pixel_position_ids
    for i, (hp, wp) in enumerate(out.patch_grid_hw):
        n = hp * wp
        assert hp % 3 == 0 and wp % 3 == 0 and out.num_soft_tokens_per_image[i] == n // 9 <= 70
        ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        assert torch.equal(out.pixel_position_ids[i, :n], torch.stack([xs, ys], -1).reshape(-1, 2))
        assert (out.pixel_position_ids[i, n:] == -1).all()
        assert (out.pixel_values[i, n:] == 0).all()
        v = out.pixel_values[i, :n]
        assert v.min() >= 0 and v.max() <= 1


def test_patch_layout_is_row_col_channel():
    # An image whose pixels encode their own coordinates, at exactly 672x960 so no resize happens.
    h, w, p = 672, 960, 16
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], -1).astype(np.uint8)
    out = pp.preprocess_gemma4(a)
    patch = out.pixel_values[0, 61].reshape(p, p, 3) * 255  # patch n = y*Wp + x -> (x=1, y=1)
    assert out.pixel_position_ids[0, 61].tolist() == [1, 1]
    assert torch.equal(patch.round().to(torch.uint8), torch.from_numpy(a[16:32, 16:32]))


# ------------------------------------------------------------------------------------------------
# torch path and float inputs vs the PIL path (tolerances measured, see module docstring)
# ------------------------------------------------------------------------------------------------
TOL_U8_MAX = 2.0 / 255 + 1e-6
TOL_U8_FRAC = 0.015
TOL_FLOAT_MAX = 1.2 / 255
TOL_FLOAT_MEAN = 0.35 / 255

TOL_CASES = [("demo", None), ("noisy", (480, 640)), ("noisy", (50, 3000)), ("noisy", (1000, 700)), ("noisy", (37, 53))]


def _case(name, hw):
    return np.array(pp.demo_image()) if name == "demo" else _noisy(*hw, seed=11)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name,hw", TOL_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_tensor_and_float_paths_close_to_pil(name, hw, budget):
    a = _case(name, hw)
    proc = pp.Gemma4ImageProcessor(max_soft_tokens=budget)
    ref = proc(Image.fromarray(a))
    t = torch.from_numpy(a)
    u8 = proc(t)
    assert u8.num_soft_tokens_per_image == ref.num_soft_tokens_per_image
    assert torch.equal(u8.pixel_position_ids, ref.pixel_position_ids)
    d = (u8.pixel_values - ref.pixel_values).abs()
    assert d.max() <= TOL_U8_MAX and (d > 1e-6).float().mean() <= TOL_U8_FRAC
    for f in (proc(t.float() / 255), proc(t.permute(2, 0, 1).double() / 255), proc(a.astype(np.float32) / 255)):
        d = (f.pixel_values - ref.pixel_values).abs()
        assert d.max() <= TOL_FLOAT_MAX and d.mean() <= TOL_FLOAT_MEAN
        assert torch.equal(f.pixel_position_ids, ref.pixel_position_ids)


def test_no_resize_is_exact_on_every_path():
    a = _noisy(672, 960, seed=8)
    ref = pp.preprocess_gemma4(Image.fromarray(a))
    _assert_same_as_hf(ref, Image.fromarray(a), 280)
    assert torch.equal(pp.preprocess_gemma4(torch.from_numpy(a)).pixel_values, ref.pixel_values)
    f = pp.preprocess_gemma4(torch.from_numpy(a).float() / 255).pixel_values
    torch.testing.assert_close(f, ref.pixel_values, rtol=0, atol=1e-7)


def test_layout_inference_and_batches():
    a = _noisy(120, 200, seed=5)
    t = torch.from_numpy(a)
    ref = pp.preprocess_gemma4(t)
    assert torch.equal(pp.preprocess_gemma4(t.permute(2, 0, 1)).pixel_values, ref.pixel_values)
    batch = pp.preprocess_gemma4(torch.stack([t, t.flip(0)]))
    assert batch.pixel_values.shape[0] == 2 and torch.equal(batch.pixel_values[0], ref.pixel_values[0])
    mixed = pp.preprocess_gemma4([t, Image.fromarray(a), a])
    assert torch.equal(mixed.pixel_values[1], mixed.pixel_values[2])
    with pytest.raises(ValueError, match="channels_last"):
        pp.preprocess_gemma4(torch.zeros(3, 50, 3, dtype=torch.uint8))  # both ends look like channels
    out = pp.preprocess_gemma4(torch.zeros(3, 50, 3, dtype=torch.uint8), channels_last=True)
    assert out.resized_hw[0][0] < out.resized_hw[0][1]  # read as H=3, W=50


@pytest.mark.cuda
def test_cuda_tensor_path_matches_cpu():
    a = torch.from_numpy(_noisy(480, 640, seed=4))
    cpu = pp.preprocess_gemma4(a)
    gpu = pp.preprocess_gemma4(a.cuda())
    assert gpu.pixel_values.is_cuda and gpu.pixel_position_ids.is_cuda
    d = (gpu.pixel_values.cpu() - cpu.pixel_values).abs()
    assert d.max() <= 1 / 255 + 1e-6 and (d > 1e-6).float().mean() < 1e-3
    assert torch.equal(gpu.pixel_position_ids.cpu(), cpu.pixel_position_ids)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 69, 100, 256, 281, 2240, "280", True, None])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        pp.Gemma4ImageProcessor(max_soft_tokens=budget)
    if budget is not None:
        with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
            pp.Gemma4ImageProcessor().preprocess(np.zeros((8, 8, 3), np.uint8), max_soft_tokens=budget)


@pytest.mark.parametrize(
    "image",
    [np.zeros((2, 8, 8, 8, 3), np.uint8), np.zeros(10, np.uint8), np.zeros((8, 8, 2), np.uint8),
     torch.zeros(5, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, 8, dtype=torch.uint8)],
    ids=["5d", "1d", "2ch", "5ch", "no-channel-axis"],
)
def test_bad_shape(image):
    with pytest.raises(ValueError):
        pp.preprocess_gemma4(image)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.int8])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match="uint8"):
        pp.preprocess_gemma4(torch.zeros(16, 16, 3, dtype=dtype))
    with pytest.raises(TypeError, match="uint8"):
        pp.preprocess_gemma4(np.zeros((16, 16, 3), dtype=str(dtype).split(".")[-1]))


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), 255.0])
def test_float_out_of_range(value):
    t = torch.rand(20, 20, 3)
    t[3, 4, 1] = value
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pp.preprocess_gemma4(t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pp.preprocess_gemma4(t.numpy())


def test_tiny_and_empty_images():
    # 1x1 and 1xN images are fine in HF (upscaled to at least one 48 px block) and here.
    for hw in ((1, 1), (1, 900), (2, 3)):
        img = Image.fromarray(_noisy(*hw))
        _assert_same_as_hf(pp.preprocess_gemma4(img, max_soft_tokens=70), img, 70)
    # An empty image: HF dies with ZeroDivisionError, we say what is wrong.
    with pytest.raises(ValueError, match="positive size"):
        pp.preprocess_gemma4(torch.zeros(0, 10, 3, dtype=torch.uint8))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="no images"):
        pp.preprocess_gemma4([])
    with pytest.raises(TypeError, match="unsupported image type"):
        pp.preprocess_gemma4("cat.png")
    with pytest.raises(ValueError, match="resample"):
        pp.Gemma4ImageProcessor(resample="lanczos")
    with pytest.raises(ValueError, match="backend"):
        pp.Gemma4ImageProcessor(backend="cv2")
    with pytest.raises(ValueError, match="patch_size"):
        pp.Gemma4ImageProcessor(patch_size=0)


# ------------------------------------------------------------------------------------------------
# demo image
# ------------------------------------------------------------------------------------------------
def test_demo_image_asset():
    img = pp.demo_image()
    assert img.mode == "RGB" and img.size == (640, 480)
    path = ROOT / "python" / "vitops" / "assets" / "demo_640x480.png"
    assert path.stat().st_size <= 100_000
    gen = runpy.run_path(str(ROOT / "tools" / "make_demo_image.py"))
    assert np.array_equal(np.asarray(img), gen["render"]())  # the PNG is what the script draws
    # "natural-looking": plenty of distinct colours and smooth regions, not noise or flat fill
    a = np.asarray(img).astype(np.int64)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 5000
    assert math.isfinite(float(np.abs(np.diff(a, axis=1)).mean())) and np.abs(np.diff(a, axis=1)).mean() < 10


def test_vitops_attribute():
    import vitops

    assert vitops.preprocess.Gemma4ImageProcessor is pp.Gemma4ImageProcessor

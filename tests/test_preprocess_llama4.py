"""vitops.preprocess.Llama4ImageProcessor against HF's Llama4ImageProcessor (transformers 5.18):
bitwise for PIL, numpy and uint8 tensor inputs, a stated bound for float inputs."""

import numpy as np
import pytest
import torch

from vitops.preprocess import Llama4ImageProcessor, demo_image
from vitops.preprocess import llama4 as pp

hf_mod = pytest.importorskip("transformers.models.llama4.image_processing_llama4")
Image = pytest.importorskip("PIL.Image")


def _hf(**kw):
    return hf_mod.Llama4ImageProcessor(**kw)


def _random_sizes(n, seed):
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (336, 336), (10, 10), (1000, 300), (200, 1500), (337, 1008), (50, 3000), (672, 335)]
    sizes += [tuple(int(v) for v in rng.integers(5, 1400, 2)) for _ in range(n)]
    return sizes


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor"])
def test_matches_hf_bitwise(kind):
    rng = np.random.default_rng(0)
    hf, ours = _hf(), Llama4ImageProcessor()
    for h, w in _random_sizes(6, seed=1):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = {"pil": Image.fromarray(a), "numpy": a, "tensor": torch.from_numpy(a).permute(2, 0, 1)}[kind]
        want = hf(im, return_tensors="pt")
        got = ours(im)
        assert got.pixel_values.dtype == torch.bfloat16
        assert torch.equal(got.pixel_values, want["pixel_values"]), (h, w)
        assert torch.equal(got.aspect_ratios, want["aspect_ratios"]), (h, w)
        rows, cols = got.aspect_ratios[0].tolist()
        assert got.tiles_per_image == [rows * cols + (rows * cols > 1)]


@pytest.mark.parametrize("options", [dict(max_patches=4), dict(max_patches=1), dict(resize_to_max_canvas=True),
                                     dict(max_patches=9, resize_to_max_canvas=True)])
def test_options_match_hf(options):
    rng = np.random.default_rng(2)
    hf, ours = _hf(**options), Llama4ImageProcessor(**options)
    for h, w in _random_sizes(3, seed=3):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want, got = hf(a, return_tensors="pt"), ours(a)
        assert torch.equal(got.pixel_values, want["pixel_values"]) and torch.equal(got.aspect_ratios,
                                                                                  want["aspect_ratios"]), (h, w)


def test_batch_of_mixed_images_gray_and_rgba():
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (800, 200), dtype=np.uint8), mode="L"),
              Image.fromarray(rng.integers(0, 256, (336, 700, 4), dtype=np.uint8), mode="RGBA"),
              demo_image()]
    want = _hf()(images, return_tensors="pt")
    got = Llama4ImageProcessor()(images)
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert torch.equal(got.aspect_ratios, want["aspect_ratios"])
    assert sum(got.tiles_per_image) == got.pixel_values.shape[0]
    # arrays: a grayscale [H, W] and an RGBA [H, W, 4] take the PIL conversions' meaning
    gray = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    assert torch.equal(Llama4ImageProcessor()(gray).pixel_values,
                       _hf()(Image.fromarray(gray, mode="L"), return_tensors="pt")["pixel_values"])


def test_float_inputs_within_bound():
    """Float images in [0, 1] skip HF's uint8 rounding of the resize: within two uint8 levels of HF's
    values (4/255 in normalized [-1, 1] units, bfloat16 rounding included); measured max 0.0117
    (1.5 levels) over 5 sizes."""
    rng = np.random.default_rng(5)
    for h, w in [(480, 640), (1000, 300), (37, 53), (336, 336)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = _hf()(a, return_tensors="pt")["pixel_values"].float()
        for im in (torch.from_numpy(a).permute(2, 0, 1).float() / 255, a.astype(np.float32) / 255):
            got = Llama4ImageProcessor()(im).pixel_values.float()
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 4 / 255


def test_best_fit_and_resolutions_follow_hf():
    for chunks in (1, 4, 16):
        want = hf_mod.find_supported_resolutions.__wrapped__(chunks, hf_mod.SizeDict(height=336, width=336))
        assert list(pp.supported_resolutions(chunks, 336)) == [tuple(r) for r in want]
    res = torch.tensor(pp.supported_resolutions(16, 336))
    for hw in _random_sizes(20, seed=6):
        assert torch.equal(pp.get_best_fit(hw, pp.supported_resolutions(16, 336)), hf_mod.get_best_fit(hw, res))


def test_bad_input():
    with pytest.raises(ValueError, match="`max_patches` must be a positive int"):
        Llama4ImageProcessor(max_patches=0)
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
        Llama4ImageProcessor()(torch.full((3, 20, 20), 2.0))
    with pytest.raises(TypeError, match="uint8"):
        Llama4ImageProcessor()(torch.zeros(3, 20, 20, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty image"):
        Llama4ImageProcessor()(torch.zeros(3, 0, 20, dtype=torch.uint8))


def test_tiles_feed_the_model():
    from vitops.models.llama4 import Llama4VisionConfig, Llama4VisionModel

    config = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_layers=1, num_heads=2, image_size=336,
                                patch_size=28, projector_input_dim=16, projector_output_dim=16, vision_output_dim=16)
    out = Llama4ImageProcessor()(demo_image())
    with torch.no_grad():
        feats = Llama4VisionModel(config).eval()(out.pixel_values)
    assert feats.shape == (out.pixel_values.shape[0], config.tokens_per_tile, 16) and feats.dtype == torch.float32

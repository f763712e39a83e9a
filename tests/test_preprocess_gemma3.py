"""vitops.preprocess.gemma3 against transformers 5.18's Gemma3ImageProcessorPil (released settings:
bilinear, mean = std = 0.5), with and without pan-and-scan."""

import numpy as np
import pytest
import torch

from vitops.preprocess.gemma3 import Gemma3ImageProcessor, pan_and_scan_boxes

PIL = pytest.importorskip("PIL.Image")
hf_mod = pytest.importorskip("transformers.models.gemma3.image_processing_pil_gemma3")


def hf_processor(size, **pas):
    return hf_mod.Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3, resample=2, **pas)


def random_image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * 0.5 + np.linspace(0, 255, h)[:, None, None] * 0.3
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = PIL.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=64, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)
# (h, w): square, landscape 2:1 and 3.3:1, portrait, just under / over the ratio, tiny, one-pixel
SIZES = [(120, 120), (100, 200), (90, 300), (310, 95), (100, 119), (100, 121), (7, 60), (1, 1), (640, 480)]


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("size", [224, 896])
def test_pil_and_uint8_inputs_match_hf_bitwise(pan_and_scan, size):
    pas = PAS if pan_and_scan else {}
    ours = Gemma3ImageProcessor(size=size, **{k: v for k, v in pas.items()})
    hf = hf_processor(size, **pas)
    sizes = SIZES if size == 224 else SIZES[:4]
    images = [random_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    want = hf(images, return_tensors="pt")
    for inputs in (images, [np.array(im) for im in images]):
        got = ours(inputs, channels_last=True)  # HWC arrays (a 1x1x3 image is ambiguous otherwise)
        assert got.pixel_values.dtype == torch.float32 and got.pixel_values.shape == want["pixel_values"].shape
        assert torch.equal(got.pixel_values, want["pixel_values"])
        assert got.num_crops == list(want["num_crops"].tolist())
    if pan_and_scan:
        assert sum(got.num_crops) > 0


def test_other_modes_and_crop_boxes():
    images = [random_image(100, 250, 1, "L"), random_image(260, 100, 2, "RGBA"), random_image(80, 200, 3, "P")]
    want = hf_processor(224, **PAS)(images, return_tensors="pt")
    got = Gemma3ImageProcessor(size=224, **PAS)(images)
    assert torch.equal(got.pixel_values, want["pixel_values"]) and got.num_crops == want["num_crops"].tolist()
    # ceil-sized crops, the last clipped at the border: 1000 wide, 3 crops of 334 (the last 332)
    assert pan_and_scan_boxes(300, 1000, 64, 4, 1.2) == [(0, 0, 300, 334), (0, 334, 300, 334), (0, 668, 300, 332)]
    assert pan_and_scan_boxes(300, 330, 64, 4, 1.2) == []  # ratio 1.1 < 1.2
    assert pan_and_scan_boxes(300, 700, 400, 4, 1.2) == []  # crops narrower than the minimum


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_tensor_path_close_to_pil_path(pan_and_scan):
    pas = PAS if pan_and_scan else {}
    images = [random_image(h, w, i) for i, (h, w) in enumerate(SIZES[:6])]
    ref = Gemma3ImageProcessor(size=224, **pas)(images)
    u8 = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    for inputs, bound in ((u8, 1.01), ([t.float() / 255 for t in u8], 1.01)):  # measured: 1.0
        got = Gemma3ImageProcessor(size=224, **pas)(inputs, channels_last=False)
        assert got.num_crops == ref.num_crops
        # in uint8 levels: pixel_values span [-1, 1] = 2 / 255 per level
        assert (got.pixel_values - ref.pixel_values).abs().max().item() * 255 / 2 <= bound
    exact = Gemma3ImageProcessor(size=224, backend="pil", **pas)(u8, channels_last=False)
    assert torch.equal(exact.pixel_values, ref.pixel_values)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`size` must be a positive int"):
        Gemma3ImageProcessor(size=0)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        Gemma3ImageProcessor(backend="cv2")
    with pytest.raises(ValueError, match="`pan_and_scan_min_ratio_to_activate` must be a positive number"):
        Gemma3ImageProcessor(pan_and_scan_min_ratio_to_activate=0)
    with pytest.raises(ValueError, match="empty image"):
        Gemma3ImageProcessor()(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        Gemma3ImageProcessor()(torch.full((3, 8, 8), 2.0))  # floats must hold [0, 1]


def test_pan_and_scan_boxes_match_hf_on_random_sizes():
    """Seeded random image sizes and settings: the crops HF cuts (shape and pixels) equal our boxes."""
    import random

    rng = random.Random("pan-and-scan")
    hf = hf_processor(224)
    for _ in range(300):
        h, w = rng.randint(1, 1500), rng.randint(1, 1500)
        if rng.random() < 0.5:
            h, w = h, max(1, int(h * rng.uniform(1.0, 6.0)))  # elongated
        if rng.random() < 0.5:
            h, w = w, h
        settings = dict(pan_and_scan_min_crop_size=rng.choice([1, 32, 256, 600]),
                        pan_and_scan_max_num_crops=rng.randint(1, 8),
                        pan_and_scan_min_ratio_to_activate=rng.choice([1.0, 1.2, 2.0, 3.5]))
        image = np.arange(h * w, dtype=np.int64).reshape(1, h, w)  # CHW, unique values
        crops = hf.pan_and_scan(image, **settings)
        boxes = pan_and_scan_boxes(h, w, settings["pan_and_scan_min_crop_size"],
                                   settings["pan_and_scan_max_num_crops"],
                                   settings["pan_and_scan_min_ratio_to_activate"])
        assert len(crops) == len(boxes), (h, w, settings)
        for crop, (top, left, ch, cw) in zip(crops, boxes):
            assert crop.shape == (1, ch, cw) and np.array_equal(crop, image[:, top:top + ch, left:left + cw])

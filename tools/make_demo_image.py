#!/usr/bin/env python
"""Renders the bundled demo picture python/vitops/assets/demo_640x480.png.

A deterministic, natural-looking synthetic landscape (sky gradient, sun, hills, a lake with a
reflection, a house and a tree) drawn with numpy only, so the asset can be regenerated bit for bit
on any machine and no third-party photo (with its licence) has to ship in the wheel.

    python tools/make_demo_image.py            # rewrites the PNG
    python tools/make_demo_image.py --check    # exits 1 if the PNG's pixels differ from render()

The test-suite compares render() with the decoded PNG, so edit both together.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

WIDTH, HEIGHT = 640, 480
ASSET = pathlib.Path(__file__).resolve().parents[1] / "python" / "vitops" / "assets" / "demo_640x480.png"


def _blend(canvas: np.ndarray, mask: np.ndarray, color) -> None:
    """Alpha-blends a constant colour into canvas (float HxWx3) with a soft mask in [0, 1]."""
    m = np.clip(mask, 0.0, 1.0)[..., None]
    canvas *= 1.0 - m
    canvas += m * np.asarray(color, dtype=np.float64)


def render() -> np.ndarray:
    """Returns the demo picture as uint8 [HEIGHT, WIDTH, 3] (RGB)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    horizon = 0.55 * HEIGHT

    # Sky: vertical blue-to-peach gradient so resizing has smooth content to work on.
    t = np.clip(y / horizon, 0.0, 1.0)[..., None]
    img = (1 - t) * np.array([70.0, 120.0, 200.0]) + t * np.array([250.0, 200.0, 160.0])

    # Sun with a soft halo (radial falloff) for round edges at every scale.
    r = np.hypot(x - 470, y - 110)
    _blend(img, np.exp(-((r / 90.0) ** 2)) * 0.6, (255, 230, 170))
    _blend(img, (48.0 - r) / 1.5, (255, 245, 200))

    # Two layers of hills: sums of sines give a non-periodic-looking ridge line.
    far = horizon - 40 - 25 * np.sin(x / 70.0) - 12 * np.sin(x / 23.0 + 1.0)
    _blend(img, (y - far) / 1.5, (110, 130, 150))
    near = horizon + 10 - 30 * np.sin(x / 110.0 + 2.0) - 8 * np.sin(x / 31.0)
    shade = 0.75 + 0.25 * np.sin(x / 45.0) * np.cos(y / 37.0)
    grass = np.stack([70 * shade, 140 * shade, 60 * shade], axis=-1)
    m = np.clip((y - near) / 1.5, 0.0, 1.0)[..., None]
    img = img * (1 - m) + grass * m

    # Lake: an ellipse whose colour mirrors the sky row above the horizon (cheap reflection).
    lake = 1.0 - np.hypot((x - 200) / 150.0, (y - 400) / 45.0)
    mirror_row = np.clip(2 * horizon - y, 0, HEIGHT - 1).astype(np.int64)
    water = 0.6 * img[mirror_row, x.astype(np.int64)] + 0.4 * np.array([40.0, 80.0, 140.0])
    m = np.clip(lake * 60.0, 0.0, 1.0)[..., None]
    img = img * (1 - m) + water * m

    # House: hard-edged rectangles and a triangular roof (aliasing-prone straight edges).
    _blend(img, ((x >= 420) & (x < 540) & (y >= 300) & (y < 390)).astype(np.float64), (200, 180, 150))
    roof = (y >= 250) & (y < 300) & (np.abs(x - 480) <= (y - 250) * 1.4)
    _blend(img, roof.astype(np.float64), (150, 50, 40))
    _blend(img, ((x >= 465) & (x < 495) & (y >= 340) & (y < 390)).astype(np.float64), (90, 60, 40))
    for wx in (435, 510):
        _blend(img, ((x >= wx) & (x < wx + 18) & (y >= 315) & (y < 333)).astype(np.float64), (170, 210, 240))

    # Tree: trunk plus a fuzzy crown (high-frequency texture from a fixed-seed noise field).
    _blend(img, ((x >= 92) & (x < 104) & (y >= 250) & (y < 330)).astype(np.float64), (90, 60, 35))
    rng = np.random.default_rng(20260101)
    crown = 1.0 - np.hypot((x - 98) / 45.0, (y - 220) / 55.0)
    leaves = np.stack([40 + 30 * rng.random((HEIGHT, WIDTH)), 100 + 40 * rng.random((HEIGHT, WIDTH)),
                       30 + 20 * rng.random((HEIGHT, WIDTH))], axis=-1)
    m = np.clip(crown * 8.0, 0.0, 1.0)[..., None]
    img = img * (1 - m) + leaves * m

    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main() -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed PNG instead of writing it")
    args = ap.parse_args()
    pixels = render()
    if args.check:
        same = np.array_equal(np.asarray(Image.open(ASSET).convert("RGB")), pixels)
        print("up to date" if same else f"{ASSET} differs from render()")
        return 0 if same else 1
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(ASSET, optimize=True)
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

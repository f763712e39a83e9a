"""`python -m vitops encode --images ... --out ...`: batch encoding in packed calls, resumable, sharded
over torchrun processes (2 CPU processes under gloo), outputs equal to encoding each image alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

SIZES = [(100, 150), (60, 60), (200, 90), (48, 300), (120, 120), (75, 40), (33, 97)]
COMMON = ["--num-layers", "1", "--max-soft-tokens", "70", "--no-progress"]


def vitops_cli(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "vitops", "encode", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        sub = "nested/" if i % 3 == 1 else ""
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{sub}img{i}.png")
    (root / "README.txt").write_text("not an image")
    return root


def _ids(root) -> list[str]:
    return sorted(f"{'nested/' if i % 3 == 1 else ''}img{i}.png" for i in range(len(SIZES)))


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["vitops"])


@pytest.fixture(scope="module")
def expected(image_dir):
    """Each image encoded alone with the model the CLI builds (seed 0, E2B preset, 1 layer)."""
    from PIL import Image

    from vitops.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector
    from vitops.preprocess import Gemma4ImageProcessor

    config = Gemma4VisionConfig.preset("e2b").replace(num_layers=1)
    torch.manual_seed(0)
    tower = Gemma4VisionEncoderLayer(config).eval()
    projector = Gemma4VisionProjector(config).eval()
    proc = Gemma4ImageProcessor(max_soft_tokens=70)
    out = {}
    with torch.inference_mode():
        for image_id in _ids(image_dir):
            pre = proc(Image.open(image_dir / image_id))
            tokens, mask = tower(pre.pixel_values, image_position_ids=pre.pixel_position_ids)
            out[image_id] = projector(tokens)[mask]
    return out


def _check(path, expected, image_dir):
    tensors, meta = _read(path)
    assert sorted(tensors) == _ids(image_dir)
    for image_id, ref in expected.items():
        torch.testing.assert_close(tensors[image_id], ref, rtol=1e-5, atol=1e-5)
        h, w, n = meta["images"][image_id]
        assert (h, w) == SIZES[int(image_id.split("img")[1].split(".")[0])] and n == ref.shape[0]
    assert meta["settings"]["model"] == "gemma4" and meta["settings"]["max_soft_tokens"] == 70
    assert meta["images_per_second"] >= 0
    return tensors, meta


def test_batch_encode_equals_each_image_alone_and_resumes(tmp_path, image_dir, expected):
    out = tmp_path / "emb.safetensors"
    first = vitops_cli("--images", str(image_dir), "--out", str(out), "--pack-size", "3", "--max-packs", "1", *COMMON)
    assert first.returncode == 0, first.stderr
    assert "7 images in this shard, 0 already done, 7 to encode" in first.stdout
    assert "stopped before the end" in first.stdout and not out.exists()
    second = vitops_cli("--images", str(image_dir), "--out", str(out), "--pack-size", "3", *COMMON)
    assert second.returncode == 0, second.stderr
    assert "3 already done, 4 to encode" in second.stdout and "images/s" in second.stdout
    _check(out, expected, image_dir)
    assert not (tmp_path / "emb.safetensors.parts").exists()
    third = vitops_cli("--images", str(image_dir), "--out", str(out), *COMMON)  # finished: nothing to redo
    assert third.returncode == 0 and "7 already done, 0 to encode" in third.stdout
    _check(out, expected, image_dir)
    other = vitops_cli("--images", str(image_dir), "--out", str(out), "--num-layers", "1", "--max-soft-tokens", "140",
                       "--no-progress")
    assert other.returncode == 2 and "other settings" in other.stderr and "--restart" in other.stderr


def test_batch_encode_resumes_after_being_killed(tmp_path, image_dir, expected):
    out = tmp_path / "emb.safetensors"
    parts = tmp_path / "emb.safetensors.parts"
    proc = subprocess.Popen([sys.executable, "-m", "vitops", "encode", "--images", str(image_dir), "--out", str(out),
                             "--pack-size", "1", *COMMON], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and any(p.suffix == ".safetensors" for p in parts.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    done = len([p for p in parts.iterdir() if p.suffix == ".safetensors"])
    assert 1 <= done < len(SIZES) and not out.exists()
    again = vitops_cli("--images", str(image_dir), "--out", str(out), "--pack-size", "4", *COMMON)
    assert again.returncode == 0, again.stderr
    assert f"{done} already done, {len(SIZES) - done} to encode" in again.stdout
    _check(out, expected, image_dir)


def test_batch_encode_sharded_over_two_torchrun_processes(tmp_path, image_dir, expected):
    out = tmp_path / "emb.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vitops", "encode", "--images", str(image_dir), "--out", str(out), "--pack-size", "2",
                           "--keep-shards", *COMMON], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0/2: 4 images in this shard" in proc.stdout and "rank 1/2: 3 images in this shard" in proc.stdout
    shards = [_read(tmp_path / f"emb.rank{r}-of-2.safetensors")[0] for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and sorted({*shards[0], *shards[1]}) == _ids(image_dir)
    assert sorted(shards[0]) == _ids(image_dir)[0::2]
    _, meta = _check(out, expected, image_dir)
    assert len(meta["images_per_second_per_rank"]) == 2


def test_batch_encode_skips_unreadable_images_and_retries_them(tmp_path, image_dir, expected):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(image_dir, root)
    (root / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "emb.safetensors"
    proc = vitops_cli("--images", str(root / "**" / "*.png"), "--out", str(out), *COMMON)
    assert proc.returncode == 1 and "skipped broken.png: not an image PIL can read" in proc.stderr
    tensors, meta = _read(out)
    assert meta["failed"] == ["broken.png"] and "broken.png" not in tensors
    torch.testing.assert_close(tensors["nested/img1.png"], expected["nested/img1.png"], rtol=1e-5, atol=1e-5)
    (root / "broken.png").unlink()
    again = vitops_cli("--images", str(root / "**" / "*.png"), "--out", str(out), *COMMON)
    assert again.returncode == 0 and "7 already done, 0 to encode" in again.stdout


@pytest.mark.parametrize("model, extra", [("gemma3", ["--no-projector"]), ("llama4", ["--max-tiles", "1"])])
def test_batch_encode_other_towers(tmp_path, image_dir, model, extra):
    from PIL import Image

    out = tmp_path / "emb.safetensors"
    small = tmp_path / "small"
    small.mkdir()
    for name in ("img1.png", "img5.png"):
        Image.open(image_dir / ("nested" if name == "img1.png" else "") / name).save(small / name)
    proc = vitops_cli("--model", model, "--images", str(small), "--out", str(out), "--num-layers", "1",
                      "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    tensors, meta = _read(out)
    per_image = 256 if model == "gemma3" else 144
    assert sorted(tensors) == ["img1.png", "img5.png"]
    assert all(t.shape[0] == per_image for t in tensors.values()) and meta["settings"]["model"] == model


@pytest.mark.parametrize("args, says", [
    (["--images", "{d}"], "--images needs --out"),
    (["--images", "{d}", "--out", "x.pt"], "must end in .safetensors"),
    (["--images", "{d}", "--out", "/nonexistent/dir/x.safetensors"], "does not exist"),
    (["--images", "{d}/*.nothing", "--out", "{t}/x.safetensors"], "no images found"),
    (["--images", "{d}", "--out", "{t}/x.safetensors", "--pack-size", "0"], "--pack-size 0: must be at least 1"),
    (["--images", "{d}", "--image", "{d}/img0.png", "--out", "{t}/x.safetensors"], "not both"),
    (["--out", "{t}/x.safetensors"], "give --images too"),
])
def test_batch_encode_bad_arguments(tmp_path, image_dir, args, says):
    proc = vitops_cli(*[a.format(d=image_dir, t=tmp_path) for a in args])
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

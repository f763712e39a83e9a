"""`python -m vitops`: bad arguments end in one line saying what is wrong and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vitops", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, says", [
    (["--image", "missing.jpg"], "--image missing.jpg: no such file"),
    (["--image", __file__], "not an image PIL can read"),
    (["--checkpoint", "/nonexistent/gemma"], "--checkpoint /nonexistent/gemma: no such file or directory"),
    (["--device", "tpu"], "--device tpu: not a torch device"),
    (["--device", "cuda:x"], "not a torch device"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_arguments_give_one_line(args, says):
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m vitops: error: ") and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_that_does_not_match(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")  # an empty (unreadable) safetensors file
    proc = run("--checkpoint", str(tmp_path / "model.safetensors"), "--preset", "e2b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("python -m vitops: error: --checkpoint")


def test_llama4_main_job_reports_tiles_and_checksum():
    proc = run("--model", "llama4", "--num-layers", "1", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "vitops Llama 4 vision model: random weights (seed 3), 1 layers" in out
    assert "2 x 2 tiles of 336² + a global tile (5 tiles, 144 soft tokens each)" in out
    assert "soft tokens (after the projector): shape (720, 5120)" in out and "sha256[:16]" in out
    again = run("--model", "llama4", "--num-layers", "1", "--seed", "3")
    checksum = [line for line in out.splitlines() if line.startswith("checksum")]
    assert checksum == [line for line in again.stdout.splitlines() if line.startswith("checksum")]


@pytest.mark.parametrize("args, says", [
    (["--model", "llama4", "--max-tiles", "0"], "--max-tiles 0: must be at least 1"),
    (["--model", "qwen"], "invalid choice: 'qwen'"),
])
def test_llama4_bad_arguments(args, says):
    proc = run(*args)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_gemma3_main_job_reports_crops_and_checksum():
    proc = run("--model", "gemma3", "--num-layers", "1", "--seed", "2", "--pan-and-scan")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "vitops Gemma 3 vision tower: random weights (seed 2), 1 layers" in out
    # the bundled 640 x 480 picture: ratio 1.33 >= 1.2, two crops of 320 x 480
    assert "H x W 480 x 640 -> 896² + 2 pan-and-scan crops, 256 soft tokens each" in out
    assert "soft tokens (after the projector): shape (768, 2560)" in out and "sha256[:16]" in out
    plain = run("--model", "gemma3", "--num-layers", "1", "--seed", "2", "--no-projector")
    assert plain.returncode == 0 and "vision tower output: shape (256, 1152)" in plain.stdout

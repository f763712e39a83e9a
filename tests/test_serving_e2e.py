"""End to end (examples/serve_gemma4.py): a tiny random Gemma 4 conditional-generation model, two
requests sharing an image (the second a cache hit) and a video, soft tokens from one packed call per
request, merged with the op; the embeddings HF's language model receives and the generated tokens
equal HF's own path for the same inputs."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "serve_gemma4.py"


def _example():
    spec = importlib.util.spec_from_file_location("serve_gemma4", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _hf_language_model_inputs(hf_model, call):
    """The ``inputs_embeds`` HF's language model receives on the first (prefill) call of ``call()``."""
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = hf_model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


def test_two_requests_share_an_image_and_generate_like_hf():
    ex = _example()
    hf_model = ex.tiny_model(seed=1)
    path = ex.VisionPath(hf_model)
    r1, r2 = ex.demo_inputs(seed=1)
    generated = {}
    for req in (r1, r2):
        ids, ours = path.generate(req, max_new_tokens=6)
        theirs_embeds = _hf_language_model_inputs(hf_model, lambda: ex.hf_generate(hf_model, path, req, ids, 1))
        ids_again, image_rows, video_rows = path.soft_tokens(req)  # a second look: every image a hit now
        assert torch.equal(ids_again, ids)
        embeds, _ = path.embed(ids, image_rows, video_rows)
        torch.testing.assert_close(embeds, theirs_embeds, rtol=1e-5, atol=1e-5)
        multimodal = (ids == ex.IMAGE) | (ids == ex.VIDEO)
        assert torch.equal(embeds[~multimodal], theirs_embeds[~multimodal])  # text rows untouched, bitwise
        theirs = ex.hf_generate(hf_model, path, req, ids, max_new_tokens=6)
        assert torch.equal(ours, theirs), (req.request_id, ours, theirs)
        generated[req.request_id] = ours
        path.release(req)
    stats = path.cache.stats()
    # r1: 2 misses (+2 hits on its second look); r2: 1 hit on the shared image (+1 on its second look)
    assert (stats.misses, stats.hits) == (2, 4)
    assert path.encoded_images == 2  # three images shown, the shared one encoded once
    assert stats.requests == 0 and stats.entries == 2
    assert r2.video is not None and (generated["r2"] != generated["r1"][:, :6]).any()


def test_video_soft_tokens_equal_hf_video_features():
    ex = _example()
    hf_model = ex.tiny_model(seed=2)
    path = ex.VisionPath(hf_model)
    _, r2 = ex.demo_inputs(seed=2)
    _, _, video_rows = path.soft_tokens(r2)
    video = path.videos(r2.video)
    with torch.no_grad():
        hf = torch.cat(list(hf_model.model.get_video_features(video.pixel_values_videos,
                                                              video.video_position_ids).pooler_output))
    torch.testing.assert_close(video_rows, hf, rtol=1e-5, atol=1e-5)
    path.release(r2)


def test_example_runs_as_a_script():
    import subprocess

    out = subprocess.run([sys.executable, str(_EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(", equal;") == 2 and "DIFFERENT" not in out.stdout
    assert "encoded 2 images for 3 shown" in out.stdout

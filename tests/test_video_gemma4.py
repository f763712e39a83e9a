"""Gemma 4 video inputs (issue 14, "Video"): vitops.preprocess.Gemma4VideoProcessor against HF's
Gemma4VideoProcessor (bitwise), the prompt expansion against HF's Gemma4Processor, and
vitops.models.gemma4_vision.encode_videos against HF's Gemma4Model.get_video_features
(transformers 5.18, tiny random models built from configs; no downloads)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from vitops import preprocess as pp
from vitops.models.gemma4_vision import encode_videos, strip_padding
from vitops.preprocess._images import resize_torchvision

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from _hf_tiny import _randomize  # noqa: E402

# torchvision is the oracle's (HF's video processor resizes with it); vitops never imports it.
try:
    import torchvision.transforms.v2.functional as tvF
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor as HFVideoProcessor
except ImportError:
    tvF = HFVideoProcessor = None
needs_torchvision = pytest.mark.skipif(tvF is None, reason="HF's video processor needs torchvision")


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def hf_video(videos, hf_kwargs=None, **call):
    """HF's processor output (tensors) for ``videos``."""
    ctx = _quiet()
    try:
        out = HFVideoProcessor(**(hf_kwargs or {}))(videos, return_metadata=True, **call)
    finally:
        ctx.__exit__(None, None, None)
    return out


def assert_same(ours: pp.Gemma4VideoPreprocessed, ref) -> None:
    assert ours.pixel_values_videos.dtype == torch.float32 and ours.video_position_ids.dtype == torch.int64
    assert ours.num_soft_tokens_per_video == [int(n) for n in ref["num_soft_tokens_per_video"]]
    assert torch.equal(ours.video_position_ids, ref["video_position_ids"])
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])  # bitwise
    for m, r in zip(ours.video_metadata, ref["video_metadata"]):
        assert m.frames_indices == [int(i) for i in r.frames_indices]
        assert m.total_num_frames == r.total_num_frames and m.fps == r.fps


def random_video(g: torch.Generator, frames: int, h: int, w: int, channels_last: bool, channels: int = 3):
    shape = (frames, h, w, channels) if channels_last else (frames, channels, h, w)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# torchvision's resize, with torch ops
# ---------------------------------------------------------------------------------------------
@needs_torchvision
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_resize_matches_torchvision(resample):
    mode = {"bicubic": tvF.InterpolationMode.BICUBIC, "bilinear": tvF.InterpolationMode.BILINEAR}[resample]
    g = torch.Generator().manual_seed(0)
    for case in range(6):
        f, h, w = (int(v) for v in torch.randint(1, 90, (3,), generator=g))
        th, tw = (int(v) for v in torch.randint(1, 120, (2,), generator=g))
        u8 = torch.randint(0, 256, (f % 4 + 1, 3, h, w), generator=g, dtype=torch.uint8)
        for x in (u8, u8.float() / 255, u8.double() / 255, (u8.float() / 255).half(), (u8.float() / 255).bfloat16()):
            ref = tvF.resize(x, [th, tw], interpolation=mode, antialias=True)
            ours = resize_torchvision(x, th, tw, resample)
            assert ours.dtype == ref.dtype and torch.equal(ours, ref), (case, x.dtype, (h, w), (th, tw))
    x = torch.rand(2, 3, 5, 7)
    assert resize_torchvision(x, 5, 7, "bicubic") is x  # same size: untouched, as torchvision


def test_torchvision_is_not_needed():
    """vitops's video path imports no torchvision (torch 2.13 environments lack it)."""
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import torch\nfrom vitops.preprocess import Gemma4VideoProcessor\n"
            "out = Gemma4VideoProcessor(num_frames=2)(torch.randint(0, 256, (3, 20, 30, 3), dtype=torch.uint8))\n"
            "assert out.pixel_values_videos.shape == (1, 2, 630, 768)\n"
            "assert 'torchvision' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# processor == HF's Gemma4VideoProcessor, bitwise
# ---------------------------------------------------------------------------------------------
@needs_torchvision
@pytest.mark.parametrize("budget", [70, 140, 280, 560, 1120])
def test_processor_random_videos_match_hf(budget):
    """Seeded random uint8 videos of odd sizes, frame counts at and above num_frames, both layouts,
    torch and numpy, one or several videos per call."""
    g = torch.Generator().manual_seed(budget)
    num_frames = 3
    for case in range(3):
        h, w = (int(v) for v in torch.randint(5, 140, (2,), generator=g))
        total = num_frames + int(torch.randint(0, 7, (1,), generator=g))
        cl = bool(case % 2)
        videos = [random_video(g, total, h, w, cl) for _ in range(1 + case % 2)]
        if case == 2:
            videos = [v.numpy() for v in videos]
        ours = pp.Gemma4VideoProcessor(max_soft_tokens=budget, num_frames=num_frames)(videos)
        ref = hf_video(videos, dict(max_soft_tokens=budget, num_frames=num_frames))
        assert ours.pixel_values_videos.shape == (len(videos), num_frames, budget * 9, 768)
        assert_same(ours, ref)


@needs_torchvision
def test_processor_default_32_frames_at_70_tokens():
    g = torch.Generator().manual_seed(1)
    video = random_video(g, 45, 27, 61, True)
    ours = pp.Gemma4VideoProcessor()(video)
    ref = hf_video(video)
    assert ours.pixel_values_videos.shape == (1, 32, 630, 768)
    assert_same(ours, ref)
    assert ours.video_metadata[0].frames_indices == [i * 45 // 32 for i in range(32)]


@needs_torchvision
def test_processor_input_forms_match_hf():
    g = torch.Generator().manual_seed(2)
    v = random_video(g, 6, 33, 47, True)
    kw = dict(num_frames=4)
    # a 5-D batch, a list of PIL frames, a list of frame tensors, a list of lists of PIL frames
    batch = torch.stack([v, random_video(g, 6, 33, 47, True)])
    assert_same(pp.Gemma4VideoProcessor(**kw)(batch), hf_video(batch, kw))
    pil = [Image.fromarray(f.numpy()) for f in v]
    assert_same(pp.Gemma4VideoProcessor(**kw)(pil), hf_video(pil, kw))
    assert_same(pp.Gemma4VideoProcessor(**kw)(list(v)), hf_video(list(v), kw))
    assert_same(pp.Gemma4VideoProcessor(**kw)([pil, pil]), hf_video([pil, pil], kw))
    # one image is a one-frame video
    one = dict(do_sample_frames=False)
    assert_same(pp.Gemma4VideoProcessor(**one)(v[0]), hf_video(v[0].numpy(), one))
    # the same video as numpy, channels first, non-contiguous: the same output
    ref = pp.Gemma4VideoProcessor(**kw)(v)
    for alt in (v.numpy(), v.permute(0, 3, 1, 2), v.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)):
        assert torch.equal(pp.Gemma4VideoProcessor(**kw)(alt).pixel_values_videos, ref.pixel_values_videos)


@needs_torchvision
def test_processor_grayscale_and_alpha_match_hf():
    """One channel repeated; alpha dropped when opaque, else composited over white (HF's video rule,
    unlike its image processors). HF cannot infer a 4-channel layout, so it is told."""
    g = torch.Generator().manual_seed(3)
    kw = dict(num_frames=2)
    gray = random_video(g, 3, 20, 35, True, channels=1)
    assert_same(pp.Gemma4VideoProcessor(**kw)(gray), hf_video(gray, kw))
    rgba = random_video(g, 3, 20, 35, True, channels=4)
    opaque = rgba.clone()
    opaque[..., 3] = 255
    for video in (rgba, opaque):
        ours = pp.Gemma4VideoProcessor(**kw)(video)
        assert_same(ours, hf_video(video, kw, input_data_format="channels_last"))
    rgb = pp.Gemma4VideoProcessor(**kw)(opaque[..., :3]).pixel_values_videos
    assert torch.equal(pp.Gemma4VideoProcessor(**kw)(opaque).pixel_values_videos, rgb)
    assert not torch.equal(pp.Gemma4VideoProcessor(**kw)(rgba).pixel_values_videos, rgb)
    # PIL frames with alpha, and of other modes (converted to RGB by PIL)
    frames = [Image.fromarray(f.numpy(), "RGBA") for f in rgba]
    assert torch.equal(pp.Gemma4VideoProcessor(**kw)(frames).pixel_values_videos,
                       pp.Gemma4VideoProcessor(**kw)(rgba).pixel_values_videos)
    lum = [Image.fromarray(f[..., 0].numpy(), "L") for f in gray]
    want = pp.Gemma4VideoProcessor(**kw)(gray).pixel_values_videos
    assert torch.equal(pp.Gemma4VideoProcessor(**kw)(lum).pixel_values_videos, want)
    # 2-D frames, wherever channels_last puts their channel axis
    for cl in (None, True, False):
        frames = [f[..., 0] for f in gray]
        assert torch.equal(pp.Gemma4VideoProcessor(**kw)(frames, channels_last=cl).pixel_values_videos, want)


@needs_torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_processor_float_videos_match_hf(dtype):
    """Floating videos hold [0, 1] (vitops's convention, not rescaled again): HF's output for the same
    values with do_rescale=False, bitwise (HF resizes float16 / bfloat16 in float32 and rounds back)."""
    g = torch.Generator().manual_seed(4)
    video = torch.rand(5, 3, 29, 41, generator=g).to(dtype)
    kw = dict(num_frames=3)
    ours = pp.Gemma4VideoProcessor(**kw)(video)
    assert_same(ours, hf_video(video, kw, do_rescale=False))
    # values outside [0, 1] after the resize are HF's too (bicubic overshoot, not clamped)
    assert ours.pixel_values_videos.min() < 0 or ours.pixel_values_videos.max() > 1


def test_float_rgba_composites_in_unit_range():
    g = torch.Generator().manual_seed(5)
    rgba = torch.rand(2, 12, 18, 4, generator=g)
    kw = dict(do_sample_frames=False, max_soft_tokens=70)
    want = (1 - rgba[..., 3:]) + rgba[..., 3:] * rgba[..., :3]
    assert torch.equal(pp.Gemma4VideoProcessor(**kw)(rgba).pixel_values_videos,
                       pp.Gemma4VideoProcessor(**kw)(want).pixel_values_videos)


@needs_torchvision
def test_frame_sampling_matches_hf():
    g = torch.Generator().manual_seed(6)
    video = random_video(g, 40, 16, 24, True)
    meta = {"total_num_frames": 40, "fps": 10.0}
    # fps sampling: HF honours it only when the processor's num_frames is None
    ours = pp.Gemma4VideoProcessor()(video, fps=2, video_metadata=meta)
    ref = hf_video(video, dict(num_frames=None), fps=2, video_metadata=meta)
    assert ours.num_frames == 8
    assert_same(ours, ref)
    ours = pp.Gemma4VideoProcessor(num_frames=None, fps=2)(video, video_metadata=meta)
    assert_same(ours, ref)
    # num_frames from the call; no sampling; all frames when neither is set
    for proc_kw, call_kw in ((dict(), dict(num_frames=7)), (dict(), dict(do_sample_frames=False)),
                             (dict(num_frames=None), dict())):
        ours = pp.Gemma4VideoProcessor(**proc_kw)(video, **call_kw)
        assert_same(ours, hf_video(video, proc_kw, **call_kw))
    # the indices rule on many sizes
    proc = pp.Gemma4VideoProcessor()
    for total in range(32, 200, 7):
        for n in (1, 5, 32):
            want = HFVideoProcessor().sample_frames(transformers.video_utils.VideoMetadata(total), num_frames=n)
            assert proc.sample_frames({"total_num_frames": total}, num_frames=n) == want.tolist()


@needs_torchvision
def test_fewer_frames_than_num_frames_is_an_error_as_in_hf():
    video = torch.randint(0, 256, (10, 16, 24, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="exceeds total_num_frames=10"):
        hf_video(video)
    with pytest.raises(ValueError, match=r"cannot sample num_frames=32 frames from a video of 10 frames"):
        pp.Gemma4VideoProcessor()(video)
    assert pp.Gemma4VideoProcessor()(video, do_sample_frames=False).num_frames == 10
    assert pp.Gemma4VideoProcessor()(video, num_frames=10).num_frames == 10


def test_processor_on_another_device_default_and_outputs():
    video = torch.randint(0, 256, (4, 16, 24, 3), dtype=torch.uint8)
    out = pp.Gemma4VideoProcessor(num_frames=2)(video, device="cpu")
    assert set(out.keys()) >= {"pixel_values_videos", "video_position_ids", "num_soft_tokens_per_video"}
    assert out["pixel_values_videos"] is out.pixel_values_videos
    n = out.num_soft_tokens_per_video[0]
    assert out.num_video_tokens == [2 * n]
    (th, tw), grid = out.resized_hw[0], out.patch_grid_hw[0]
    assert th % 48 == 0 and tw % 48 == 0 and grid == (th // 16, tw // 16)
    assert (out.video_position_ids[0, :, : n * 9] >= 0).all() and (out.video_position_ids[0, :, n * 9:] == -1).all()
    assert not out.pixel_values_videos[0, :, n * 9:].any()
    moved = out.to("cpu")
    assert torch.equal(moved.pixel_values_videos, out.pixel_values_videos)
    assert pp.Gemma4VideoProcessor().num_soft_tokens(16, 24) == n


@pytest.mark.parametrize("bad,kwargs,error,match", [
    (torch.zeros(4, 8, 8, 3, dtype=torch.int32), {}, TypeError, "uint8"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.bool), {}, TypeError, "uint8"),
    (torch.full((4, 8, 8, 3), 2.0), {}, ValueError, r"\[0, 1\]"),
    (torch.full((4, 8, 8, 3), float("nan")), {}, ValueError, r"\[0, 1\]"),
    (torch.zeros(4, 8, 8, 2, dtype=torch.uint8), {}, ValueError, "cannot infer the channel axis"),
    (torch.zeros(4, 3, 8, 3, dtype=torch.uint8), {}, ValueError, "pass channels_last"),
    (torch.zeros(4, 8, 8, 5, dtype=torch.uint8), {"channels_last": True}, ValueError, "5 channels"),
    (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), {"do_sample_frames": False}, ValueError, "empty video"),
    (torch.zeros(4, 0, 8, 3, dtype=torch.uint8), {"do_sample_frames": False}, ValueError, "empty video"),
    (torch.zeros(2, 2, 2, 2, 2, 2, dtype=torch.uint8), {}, ValueError, "got an array of shape"),
    ([], {}, ValueError, "no video given"),
    ([[]], {}, ValueError, "empty list"),
    ("video.mp4", {}, TypeError, "unsupported type str"),
    ([torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(8, 8, 3, dtype=torch.uint8)], {}, ValueError,
     "a list holds either the frames"),
    ([torch.zeros(8, 8, 3, dtype=torch.uint8), torch.zeros(8, 9, 3, dtype=torch.uint8)],
     {"do_sample_frames": False}, ValueError, "all have one shape"),
    ([torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(5, 8, 8, 3, dtype=torch.uint8)],
     {"do_sample_frames": False}, ValueError, r"same number of frames after sampling, got \[4, 5\]"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "fps": 1.0}, ValueError, "mutually exclusive"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 0}, ValueError, "num_frames must be a positive int"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2.0}, ValueError, "num_frames must be a positive int"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"fps": -1}, ValueError, "fps must be a positive number"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"fps": 2.0}, ValueError, "needs the video's own fps"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"fps": 0.1, "video_metadata": {"total_num_frames": 4, "fps": 30}},
     ValueError, "keeps no frame"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "video_metadata": {"total_num_frames": 9}},
     ValueError, "its video_metadata says total_num_frames=9"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "video_metadata": [{"total_num_frames": 4}] * 2},
     ValueError, "2 entries for 1 videos"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "video_metadata": {"total_num_frames": 4, "fsp": 2}},
     ValueError, r"unknown keys \['fsp'\]"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "video_metadata": {"total_num_frames": 4, "fps": 0}},
     ValueError, "fps must be a positive finite number"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"num_frames": 2, "video_metadata": 30}, TypeError,
     "video_metadata must be"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8),
     {"do_sample_frames": False, "video_metadata": {"total_num_frames": 9, "frames_indices": [0, 3]}},
     ValueError, "frames_indices has 2"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), {"max_soft_tokens": 100}, ValueError,
     "max_soft_tokens must be one of"),
])
def test_bad_inputs_raise_clear_errors(bad, kwargs, error, match):
    with pytest.raises(error, match=match):
        pp.Gemma4VideoProcessor(num_frames=None)(bad, **kwargs)


def test_bad_constructor_arguments():
    for kw, match in ((dict(max_soft_tokens=71), "max_soft_tokens"), (dict(num_frames=-1), "num_frames"),
                      (dict(num_frames=4, fps=2), "mutually exclusive"), (dict(resample="lanczos"), "resample"),
                      (dict(patch_size=0), "patch_size")):
        with pytest.raises(ValueError, match=match):
            pp.Gemma4VideoProcessor(**kw)


# ---------------------------------------------------------------------------------------------
# prompt side == HF's Gemma4Processor
# ---------------------------------------------------------------------------------------------
def _hf_gemma4_processor():
    """HF's Gemma4Processor around a tiny character-level tokenizer (no hub files)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    specials = {"image_token": "<|image|>", "boi_token": pp.gemma4.BOI_TOKEN, "eoi_token": pp.gemma4.EOI_TOKEN,
                "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    vocab = {"[UNK]": 0, "<pad>": 1, **{tok: 2 + i for i, tok in enumerate(specials.values())}}
    for ch in "0123456789: abcdefghijklmnopqrstuvwxyz.":
        vocab[ch] = len(vocab)
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="<pad>",
                                  extra_special_tokens=specials)
    return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessorPil(),
                           tokenizer=tok, video_processor=HFVideoProcessor()), tok


@needs_torchvision
def test_prompt_expansion_matches_hf_processor():
    proc, tok = _hf_gemma4_processor()
    g = torch.Generator().manual_seed(7)
    # a long video (timestamps past a minute), a short one without fps (HF assumes 24 fps, with a warning)
    videos = [random_video(g, 400, 20, 30, True), random_video(g, 40, 26, 20, True)]
    texts = ["describe <|video|> and <|video|>.", "then <|video|> again"]
    metas = [{"total_num_frames": 400, "fps": 3.0}, {"total_num_frames": 40}]
    videos3 = videos + [videos[1]]
    metas3 = metas + [{"total_num_frames": 40, "fps": 0.5}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = proc(text=texts, videos=videos3, videos_kwargs=dict(num_frames=6, video_metadata=metas3),
                   return_tensors="pt")
    ours = pp.Gemma4VideoProcessor(num_frames=6)(videos3, video_metadata=metas3)
    with pytest.warns(UserWarning, match="assume 24 fps"):
        expanded = ours.expand_prompt(texts)
    assert "01:51 <|image>" in expanded[0]  # frame 400 * 5 // 6 = 333 at 3 fps: 111 s
    ids = tok(expanded, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])
    # the counts the merge needs: HF's own count of <|video|> tokens per video
    video_id = tok.convert_tokens_to_ids(pp.gemma4.VIDEO_TOKEN)
    assert sum(ours.num_video_tokens) == int((ref["input_ids"] == video_id).sum())
    sizes = [(6, *v.shape[1:3]) for v in videos3]
    assert ours.num_video_tokens == proc._get_num_multimodal_tokens(video_sizes=sizes)["num_video_tokens"]


def test_prompt_helpers():
    meta = pp.VideoMetadata(total_num_frames=100, fps=2.0, frames_indices=[0, 61, 150])
    assert pp.gemma4.video_frame_timestamps(meta) == ["00:00", "00:30", "01:15"]
    text = pp.gemma4.video_placeholder(2, meta, video_token="V")
    assert text == "00:00 <|image>VV<image|> 00:30 <|image>VV<image|> 01:15 <|image>VV<image|>"
    assert pp.gemma4.expand_video_tokens("a <|video|> b", ["X"]) == "a X b"
    assert pp.gemma4.expand_video_tokens(["<|video|>", "c <|video|>"], ["<|video|>1", "2"]) == ["<|video|>1", "c 2"]
    with pytest.raises(ValueError, match="has 1 <|video|> placeholders for 2 videos"):
        pp.gemma4.expand_video_tokens("a <|video|>", ["X", "Y"])
    with pytest.raises(ValueError, match="frames_indices is unknown"):
        pp.gemma4.video_frame_timestamps({"total_num_frames": 3, "fps": 1.0})
    with pytest.raises(ValueError, match="num_soft_tokens must be"):
        pp.gemma4.video_placeholder(-1, meta)
    # HF's VideoMetadata is read too
    hf_meta = transformers.video_utils.VideoMetadata(total_num_frames=100, fps=2.0, frames_indices=np.array([0, 61]))
    assert pp.gemma4.video_frame_timestamps(hf_meta) == ["00:00", "00:30"]


# ---------------------------------------------------------------------------------------------
# the vision path == HF's Gemma4Model.get_video_features
# ---------------------------------------------------------------------------------------------
def tiny_gemma4(patch_size=4, pooling=2, seed=0, position_embedding_size=64):
    """A tiny random HF Gemma4Model (vision tower + embedder + a one-layer text model) and vitops's
    tower + projector loaded from it."""
    from vitops.hf import from_hf

    t = transformers
    vc = t.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, patch_size=patch_size,
                              position_embedding_size=position_embedding_size, pooling_kernel_size=pooling,
                              standardize=True, use_clipped_linears=True)
    tc = t.Gemma4TextConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=64, sliding_window=8,
                            layer_types=["full_attention"])
    cfg = t.Gemma4Config(text_config=tc, vision_config=vc, audio_config=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = t.Gemma4Model(cfg).eval()
    _randomize(model, seed)
    with torch.no_grad():  # clip bounds that clip now and then
        for name, b in model.named_buffers():
            if name.endswith(("input_max", "output_max")):
                b.fill_(2.5)
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-2.5)
    tower, proj = from_hf(cfg, model.state_dict())
    return model, tower, proj


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def hf_video_features(model, pv, pos) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.get_video_features(pv, pos).pooler_output)


def test_encode_videos_matches_hf_float32():
    model, tower, proj = tiny_gemma4()
    g = torch.Generator().manual_seed(8)
    videos = [random_video(g, 9, 37, 53, False), random_video(g, 7, 61, 30, True), random_video(g, 5, 20, 20, True)]
    for budget in (70, 140):
        inputs = pp.Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=budget,
                                         num_frames=4)(videos)
        ref = hf_video_features(model, inputs.pixel_values_videos, inputs.video_position_ids)
        with torch.no_grad():
            ours = encode_videos(tower, proj, inputs.pixel_values_videos, inputs.video_position_ids)
        assert [o.shape for o in ours] == [r.shape for r in ref]
        assert [o.shape[0] for o in ours] == inputs.num_video_tokens
        for o, r in zip(ours, ref):
            assert o.dtype == torch.float32
            assert rel(o, r) <= 1e-5
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    # without the projector: the tower's rows (HF's last_hidden_state), per video
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=inputs.pixel_values_videos.flatten(0, 1),
                                    pixel_position_ids=inputs.video_position_ids.flatten(0, 1)).last_hidden_state
        rows = torch.cat(encode_videos(tower, None, inputs.pixel_values_videos, inputs.video_position_ids))
    assert rel(rows, hidden) <= 1e-5


@needs_torchvision
def test_encode_videos_default_32_frames_at_70_tokens():
    """HF's defaults end to end (patch 16, pooling 3, 32 frames of 630 patches) on a tiny tower."""
    model, tower, proj = tiny_gemma4(patch_size=16, pooling=3, position_embedding_size=128)
    g = torch.Generator().manual_seed(9)
    video = random_video(g, 50, 36, 64, True)
    inputs = pp.Gemma4VideoProcessor()(video)
    assert_same(inputs, hf_video(video))
    ref = hf_video_features(model, inputs.pixel_values_videos, inputs.video_position_ids)
    with torch.no_grad():
        (ours,) = encode_videos(tower, proj, inputs.pixel_values_videos, inputs.video_position_ids)
    assert ours.shape == ref[0].shape == (32 * inputs.num_soft_tokens_per_video[0], 24)
    assert rel(ours, ref[0]) <= 1e-5


def test_encode_videos_packed_equals_padded_tower_and_counts_on_host():
    """The one packed call equals the padded tower + projector on every frame (rows in HF's order),
    whether the per-frame counts come from the processor (host ints) or from the positions."""
    model, tower, proj = tiny_gemma4()
    g = torch.Generator().manual_seed(10)
    inputs = pp.Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, num_frames=3, max_soft_tokens=140)(
        [random_video(g, 5, 30, 50, True), random_video(g, 3, 45, 20, False)])
    pv, pos = inputs.pixel_values_videos, inputs.video_position_ids
    with torch.no_grad():
        derived = encode_videos(tower, proj, pv, pos)
        given = encode_videos(tower, proj, pv, pos, inputs.num_soft_tokens_per_video)
        out, mask = tower(pv.flatten(0, 1), image_position_ids=pos.flatten(0, 1))
        padded = proj(strip_padding(out, mask))
    assert [d.shape[0] for d in derived] == [d.shape[0] for d in given] == inputs.num_video_tokens
    for d, h in zip(derived, given):
        assert torch.equal(d, h)
    torch.testing.assert_close(torch.cat(given), padded, rtol=1e-5, atol=1e-5)
    # encode_packed takes the processor's output as it is (every frame an image), alone or with images
    from vitops.serving import encode_packed

    images = pp.Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=2)(random_video(g, 1, 40, 40, True)[0],
                                                                           max_soft_tokens=70)
    with torch.no_grad():
        direct = encode_packed(tower, inputs, embedder=proj)
        mixed = encode_packed(tower, [images, inputs], embedder=proj)
        image_rows = proj(strip_padding(*tower(images.pixel_values, image_position_ids=images.pixel_position_ids)))
    assert torch.equal(direct.soft_tokens, torch.cat(given))
    assert direct.tokens_per_image == tuple(n for n in inputs.num_soft_tokens_per_video for _ in range(3))
    torch.testing.assert_close(mixed.soft_tokens, torch.cat([image_rows, *given]), rtol=1e-5, atol=1e-5)


def test_encode_videos_bfloat16_no_worse_than_hf():
    """bfloat16 tower + projector against a float64 HF run of the same (bf16-representable) weights:
    ours no further than HF's own bfloat16 run (mean over seeds; each seed within 1.5x)."""
    pairs = []
    for seed in range(4):
        model, _, _ = tiny_gemma4(seed=seed)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.to(torch.bfloat16).to(t.dtype))
        from vitops.hf import from_hf

        g = torch.Generator().manual_seed(100 + seed)
        inputs = pp.Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, num_frames=3)(
            [random_video(g, 4, 25, 40, True), random_video(g, 3, 40, 25, False)])
        pv, pos = inputs.pixel_values_videos, inputs.video_position_ids
        tower, proj = from_hf(model.config, model.state_dict(), dtype=torch.bfloat16)
        ref = torch.cat(hf_video_features(model.double(), pv.double(), pos))
        hf_low = torch.cat(hf_video_features(model.to(torch.bfloat16), pv, pos))
        with torch.no_grad():
            ours = torch.cat(encode_videos(tower, proj, pv, pos))
        assert ours.dtype == hf_low.dtype == torch.bfloat16 and torch.isfinite(ours).all()
        pairs.append((rel(hf_low, ref), rel(ours, ref)))
    hf_mean = sum(p[0] for p in pairs) / len(pairs)
    ours_mean = sum(p[1] for p in pairs) / len(pairs)
    print(f"PARITY gemma4 video bfloat16 vs HF float64, mean of {len(pairs)} seeds (HF: {hf_mean:.3e}): "
          f"{ours_mean:.3e}")
    assert ours_mean <= 1.1 * hf_mean, pairs
    assert all(o <= 1.5 * h for h, o in pairs), pairs


def test_encode_videos_bad_shapes():
    _, tower, proj = tiny_gemma4()
    pv = torch.rand(1, 2, 16, 48)
    with pytest.raises(ValueError, match=r"pixel_values_videos must be \[V, F, L, 3p\^2\]"):
        encode_videos(tower, proj, pv[0], torch.zeros(2, 16, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"video_position_ids must be \[V, F, L, 2\]"):
        encode_videos(tower, proj, pv, torch.zeros(1, 2, 15, 2, dtype=torch.long))
    pos = torch.zeros(1, 2, 16, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="has 2 counts for 1 videos"):
        encode_videos(tower, proj, pv, pos, [4, 4])
    with pytest.raises(ValueError, match="must be positive and fit"):
        encode_videos(tower, proj, pv, pos, [5])


# ---------------------------------------------------------------------------------------------
# CUDA: HF processes CUDA tensors on the GPU (torchvision's float32 route for uint8), so do we
# ---------------------------------------------------------------------------------------------
@needs_torchvision
@pytest.mark.cuda
def test_processor_and_encoder_cuda_match_hf():
    g = torch.Generator().manual_seed(11)
    videos = [random_video(g, 6, 37, 53, True).cuda(), random_video(g, 6, 30, 70, False).cuda()]
    kw = dict(num_frames=4, max_soft_tokens=140)
    ours = pp.Gemma4VideoProcessor(**kw)(videos)
    ref = hf_video(videos, kw)
    assert ours.pixel_values_videos.is_cuda
    assert_same(ours, ref)
    cpu = pp.Gemma4VideoProcessor(**kw)([v.cpu() for v in videos])
    diff = (cpu.pixel_values_videos - ours.pixel_values_videos.cpu()).abs().max().item()
    print(f"PARITY gemma4 video CPU vs CUDA resize route, max |diff| = {diff * 255:.1f} / 255")
    model, tower, proj = tiny_gemma4()
    small = pp.Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, num_frames=4)(videos)
    ref_feats = hf_video_features(model.cuda(), small.pixel_values_videos, small.video_position_ids)
    tower, proj = tower.cuda(), proj.cuda()
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the processor's counts keep the packing on the host
        try:
            feats = encode_videos(tower, proj, small.pixel_values_videos, small.video_position_ids,
                                  small.num_soft_tokens_per_video)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for o, r in zip(feats, ref_feats):
        assert o.is_cuda and rel(o, r) <= 1e-4

"""Packed mixed-resolution encoding (vitops.serving.encode_packed, Gemma4VisionEncoderLayer.forward_packed,
vitops.layers.packed_attention): every image's rows equal the image encoded alone and HF's
get_image_features, on seeded random mixes of sizes and budgets, for the three towers."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitops  # noqa: F401
from vitops.layers import PackedSegments, packed_attention
from vitops.serving import PackedImages, encode_packed
from vitops.serving.packed import pack_gemma4

BUDGETS = (70, 140, 280)


def _hf_gemma4(seed: int = 0, *, kv_heads: int = 1, standardize: bool = True):
    """A tiny random HF Gemma4ForConditionalGeneration (patch 4, k = 3, room for 64 x 64 patch grids)."""
    import transformers as t

    from _hf_tiny import _randomize

    vc = t.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=kv_heads, head_dim=16, patch_size=4, position_embedding_size=160,
                              pooling_kernel_size=3, standardize=standardize)
    tc = t.Gemma4TextConfig(vocab_size=320, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=12, global_head_dim=12,
                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=320,
                            layer_types=["full_attention"])
    cfg = t.Gemma4Config(text_config=tc, vision_config=vc, audio_config=None, image_token_id=300,
                         boi_token_id=301, eoi_token_id=302)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = t.Gemma4ForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    return model


def _vitops_gemma4(model, dtype=torch.float32):
    from vitops.hf import from_hf

    return from_hf(model.config, model.state_dict(), dtype=dtype)


def _random_images(rng: random.Random, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """uint8 HWC images of random sizes and aspect ratios (1:3 to 3:1)."""
    out = []
    for _ in range(n):
        h = rng.randint(24, 160)
        w = max(8, min(480, int(h * rng.uniform(1 / 3, 3))))
        out.append(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g))
    return out


def _processor():
    from vitops.preprocess import Gemma4ImageProcessor

    return Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=3)


def _hf_features(model, pre) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=pre.pixel_values, image_position_ids=pre.pixel_position_ids)
    feats = out.pooler_output
    return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats


@pytest.mark.parametrize("seed", range(4))
def test_gemma4_packed_equals_each_image_alone_and_hf(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    model = _hf_gemma4(seed, kv_heads=rng.choice((1, 2)), standardize=bool(seed % 2))
    tower, embedder = _vitops_gemma4(model)
    proc = _processor()
    images = _random_images(rng, rng.randint(1, 6), g)
    budgets = [rng.choice(BUDGETS) for _ in images]
    with torch.no_grad():
        enc = encode_packed(tower, images, embedder=embedder, max_soft_tokens=budgets, processor=proc)
        assert enc.soft_tokens.shape[0] == sum(enc.tokens_per_image)
        for image, budget, got in zip(images, budgets, enc.split()):
            pre = proc(image, max_soft_tokens=budget)
            assert got.shape[0] == pre.num_soft_tokens_per_image[0]
            alone, mask = tower(pre.pixel_values, image_position_ids=pre.pixel_position_ids)
            alone = embedder(alone)[mask]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
            hf = _hf_features(model, pre)
            torch.testing.assert_close(got, hf, rtol=1e-5, atol=1e-5)


def test_gemma4_packed_preprocessed_forms_and_video_frames():
    """A Gemma4Preprocessed batch, a list of them and PackedImages pack alike; a video's [V, F, L, P]
    frames pack as one run of equal segments."""
    model = _hf_gemma4(1)
    tower, embedder = _vitops_gemma4(model)
    proc = _processor()
    g = torch.Generator().manual_seed(3)
    images = _random_images(random.Random(3), 4, g)
    pre_a, pre_b = proc(images[:2], max_soft_tokens=70), proc(images[2:], max_soft_tokens=140)
    with torch.no_grad():
        from_raw = encode_packed(tower, images, embedder=embedder, max_soft_tokens=[70, 70, 140, 140], processor=proc)
        from_list = encode_packed(tower, [pre_a, pre_b], embedder=embedder)
        packed = pack_gemma4([pre_a, pre_b], processor=proc)
        from_packed = encode_packed(tower, packed, embedder=embedder)
    assert from_raw.tokens_per_image == from_list.tokens_per_image == from_packed.tokens_per_image
    torch.testing.assert_close(from_list.soft_tokens, from_raw.soft_tokens, rtol=0, atol=0)
    torch.testing.assert_close(from_packed.soft_tokens, from_raw.soft_tokens, rtol=0, atol=0)

    frames = proc(_random_images(random.Random(4), 1, g) * 5, max_soft_tokens=70)  # 5 equal frames
    video = PackedImages.from_padded(frames.pixel_values[None], frames.pixel_position_ids[None],
                                     frames.num_soft_tokens_per_image, 3)
    assert len(video.segments.runs) == 1
    with torch.no_grad():
        enc = encode_packed(tower, video)
        alone, mask = tower(frames.pixel_values, image_position_ids=frames.pixel_position_ids)
    torch.testing.assert_close(enc.soft_tokens, alone[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemma4_packed_low_precision_no_worse_than_alone(dtype):
    """Against float64, the packed rows are as accurate as the image encoded alone (the same math,
    GEMMs over more rows)."""
    model = _hf_gemma4(2)
    tower64, emb64 = _vitops_gemma4(model, torch.float64)
    tower, emb = _vitops_gemma4(model, dtype)
    proc = _processor()
    images = _random_images(random.Random(5), 3, torch.Generator().manual_seed(5))
    budgets = [70, 280, 140]
    with torch.no_grad():
        packed = encode_packed(tower, images, embedder=emb, max_soft_tokens=budgets, processor=proc)
        exact = encode_packed(tower64, images, embedder=emb64, max_soft_tokens=budgets, processor=proc)
        for image, budget, got, ref in zip(images, budgets, packed.split(), exact.split()):
            pre = proc(image, max_soft_tokens=budget)
            out, mask = tower(pre.pixel_values, image_position_ids=pre.pixel_position_ids)
            alone = emb(out)[mask]
            err_packed = (got.double() - ref).abs().max().item()
            err_alone = (alone.double() - ref).abs().max().item()
            assert err_packed <= 1.5 * err_alone + 1e-3, (budget, err_packed, err_alone)


def test_gemma4_packed_gradients_equal_each_image_alone():
    """Fine-tuning through a packed call: parameter gradients equal the sum over images alone."""
    model = _hf_gemma4(3)
    tower, emb = _vitops_gemma4(model)
    proc = _processor()
    images = _random_images(random.Random(6), 3, torch.Generator().manual_seed(6))
    budgets = [70, 140, 70]
    weights = [torch.randn(1, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def grads(loss):
        params = [p for p in list(tower.parameters()) + list(emb.parameters())]
        return torch.autograd.grad(loss, params)

    enc = encode_packed(tower, images, embedder=emb, max_soft_tokens=budgets, processor=proc)
    packed = grads(sum((t * w).sum() for t, w in zip(enc.split(), weights)))
    loss = 0
    for image, budget, w in zip(images, budgets, weights):
        pre = proc(image, max_soft_tokens=budget)
        out, mask = tower(pre.pixel_values, image_position_ids=pre.pixel_position_ids)
        loss = loss + (emb(out)[mask] * w).sum()
    alone = grads(loss)
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's values on the host or sizes an output by them."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "item", "_assert_async")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.FORBIDDEN:
            raise AssertionError(f"host read inside the packed encoder: {func}")
        return func(*args, **(kwargs or {}))


def test_gemma4_forward_packed_reads_nothing_from_the_device():
    tower, emb = _vitops_gemma4(_hf_gemma4(4))
    images = _random_images(random.Random(7), 4, torch.Generator().manual_seed(7))
    packed = pack_gemma4(images, max_soft_tokens=[70, 280, 70, 140], processor=_processor())
    with torch.no_grad(), _NoHostReads():
        tokens, token_segments = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments)
        emb(tokens)
    assert token_segments.lengths == packed.num_soft_tokens_per_image


def test_gemma4_forward_packed_compiles_without_graph_breaks():
    tower, _ = _vitops_gemma4(_hf_gemma4(5))
    images = _random_images(random.Random(8), 3, torch.Generator().manual_seed(8))
    packed = pack_gemma4(images, max_soft_tokens=[70, 70, 140], processor=_processor())
    with torch.no_grad():
        eager, _ = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments)
        compiled = torch.compile(tower.forward_packed, fullgraph=True, backend="eager")
        got, _ = compiled(packed.patches, packed.positions_xy, packed.segments)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


def test_gemma4_packed_bad_inputs():
    tower, _ = _vitops_gemma4(_hf_gemma4(6))
    proc = _processor()
    images = _random_images(random.Random(9), 2, torch.Generator().manual_seed(9))
    packed = pack_gemma4(images, max_soft_tokens=70, processor=proc)
    with pytest.raises(ValueError, match="patches must be"):
        tower.forward_packed(packed.patches[:-9], packed.positions_xy, packed.segments)
    with pytest.raises(ValueError, match="positions_xy must be"):
        tower.forward_packed(packed.patches, packed.positions_xy[:, :1], packed.segments)
    with pytest.raises(ValueError, match="multiples of 9"):
        tower.forward_packed(packed.patches[:-1], packed.positions_xy[:-1],
                             PackedSegments((packed.segments.lengths[0], packed.segments.lengths[1] - 1)))
    with pytest.raises(ValueError, match="positive int"):
        PackedSegments((4, 0))
    with pytest.raises(ValueError, match="2 budgets"):
        encode_packed(tower, images + images[:1], max_soft_tokens=[70, 70], processor=proc)
    with pytest.raises(TypeError, match="Gemma4VisionEncoderLayer"):
        encode_packed(torch.nn.Linear(2, 2), images)
    with pytest.raises(TypeError, match="Gemma4VisionEncoderLayer"):
        encode_packed(torch.nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="positive size"):
        encode_packed(tower, [torch.zeros(0, 5, 3, dtype=torch.uint8)], processor=proc)
    pre = proc(images, max_soft_tokens=70)
    with pytest.raises(ValueError, match="valid patches first"):
        PackedImages.from_padded(pre.pixel_values, pre.pixel_position_ids,
                                 [pre.num_soft_tokens_per_image[0] - 1, pre.num_soft_tokens_per_image[1]], 3)
    with pytest.raises(ValueError, match="same images"):
        PackedImages.from_padded(pre.pixel_values, pre.pixel_position_ids, [5], 3)


@pytest.mark.parametrize("seed", range(3))
def test_packed_attention_is_block_diagonal_sdpa(seed):
    """Property: packed attention equals SDPA with a block-diagonal mask, for random runs of lengths,
    GQA and float64 gradients."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = tuple(rng.choice((1, 3, 7, 7, 16)) for _ in range(rng.randint(1, 7)))
    seg = PackedSegments(lengths)
    heads, kv, hd = 4, rng.choice((1, 2, 4)), 8
    q = torch.randn(1, heads, seg.total, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv, seg.total, hd, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv, seg.total, hd, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (ids[:, None] == ids[None, :])[None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != heads)
    ref = ref.transpose(1, 2).reshape(1, seg.total, heads * hd)
    got = packed_attention(q, k, v, seg)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(lambda q, k, v: packed_attention(q, k, v, seg), (q, k, v))
    assert [n for _, c, n in seg.runs for _ in range(c)] == list(lengths)


def test_packed_segments_helpers():
    seg = PackedSegments((9, 9, 36, 9))
    assert seg.total == 63 and seg.offsets == (0, 9, 18, 54, 63)
    assert seg.runs == ((0, 2, 9), (18, 1, 36), (54, 1, 9))
    assert seg.scaled_down(9).lengths == (1, 1, 4, 1)
    assert seg.cu_seqlens().tolist() == [0, 9, 18, 54, 63]
    assert [t.shape[0] for t in seg.split(torch.zeros(63, 2))] == [9, 9, 36, 9]
    with pytest.raises(ValueError, match="not all multiples"):
        seg.scaled_down(4)
    with pytest.raises(ValueError, match="packed length"):
        seg.split(torch.zeros(62))
    with pytest.raises(ValueError, match="varlen"):
        packed_attention(torch.zeros(1, 1, 63, 8), torch.zeros(1, 1, 63, 8), torch.zeros(1, 1, 63, 8), seg,
                         backend="varlen")


def test_no_images_give_an_empty_encoding():
    """A text-only request: [0, H] rows in the model's dtype, for every tower, with or without the embedder."""
    from _hf_tiny import build

    from vitops.hf import gemma3 as hf_gemma3
    from vitops.hf import llama4 as hf_llama4

    g4 = _vitops_gemma4(_hf_gemma4(8))
    g3 = hf_gemma3.from_hf(build("gemma3")[0].config, None)
    l4 = hf_llama4.from_hf(build("llama4")[0].config, None)
    for tower, emb in (g4, g3, l4):
        for embedder in (emb, None):
            enc = encode_packed(tower, [], embedder=embedder)
            with torch.no_grad():  # the width a real image gives
                probe = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8)
                processor = _processor() if tower is g4[0] else None
                real = encode_packed(tower, [probe], embedder=embedder, processor=processor)
            assert enc.soft_tokens.shape == (0, real.soft_tokens.shape[1]) and enc.tokens_per_image == ()
            assert enc.soft_tokens.dtype == real.soft_tokens.dtype and enc.split() == ()


def test_gemma3_and_llama4_packed_equal_each_image_alone():
    """Fixed-size units: every image's 896²-style unit + pan-and-scan crops (Gemma 3) or tiles
    (Llama 4) in one batch, split back per image, equal to encoding each image alone."""
    from _hf_tiny import build

    from vitops.hf import gemma3 as hf_gemma3
    from vitops.hf import llama4 as hf_llama4
    from vitops.preprocess import Gemma3ImageProcessor, Llama4ImageProcessor

    g = torch.Generator().manual_seed(11)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in ((40, 130), (50, 50),
                                                                                            (90, 31))]
    model, _ = build("gemma3")
    tower, emb = hf_gemma3.from_hf(model.config, model.state_dict())
    proc = Gemma3ImageProcessor(size=32, do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    model4, _ = build("llama4")
    vmodel, proj = hf_llama4.from_hf(model4.config, model4.state_dict())
    proc4 = Llama4ImageProcessor(max_patches=4, size=32)
    with torch.no_grad():
        for tw, em, pr, hf_model in ((tower, emb, proc, model), (vmodel, proj, proc4, model4)):
            enc = encode_packed(tw, images, embedder=em, processor=pr)
            parts = enc.split()
            assert len(parts) == len(images)
            for image, got in zip(images, parts):
                alone = encode_packed(tw, [image], embedder=em, processor=pr).soft_tokens
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
                pre = pr(image)
                if hf_model is model:
                    hf = hf_model.model.get_image_features(pixel_values=pre.pixel_values).pooler_output
                else:
                    hidden = hf_model.vision_model(pre.pixel_values.float()).last_hidden_state
                    hf = hf_model.multi_modal_projector(hidden)
                torch.testing.assert_close(got, hf.reshape(-1, hf.shape[-1]), rtol=1e-5, atol=1e-5)
            assert sum(enc.tokens_per_image) == enc.soft_tokens.shape[0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_packed_varlen_equals_sdpa_runs_and_never_syncs(dtype):
    """On CUDA: torch's varlen flash attention equals the batched-SDPA runs, a packed call of mixed
    budgets equals each image alone, and neither backend synchronises with the host."""
    model = _hf_gemma4(7)
    tower, emb = _vitops_gemma4(model, dtype)
    tower, emb = tower.cuda(), emb.cuda()
    images = _random_images(random.Random(12), 5, torch.Generator().manual_seed(12))
    budgets = [280, 70, 140, 70, 70]
    packed = pack_gemma4(images, max_soft_tokens=budgets, processor=_processor(), device="cuda")
    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments)[0]
            varlen = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments,
                                          attention_backend="varlen")[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(varlen, runs, rtol=2e-2, atol=2e-2)
        proc = _processor()
        for image, budget, got in zip(images, budgets, torch.split(runs, list(packed.num_soft_tokens_per_image))):
            pre = proc(image, max_soft_tokens=budget).to("cuda")
            out, mask = tower(pre.pixel_values, image_position_ids=pre.pixel_position_ids)
            torch.testing.assert_close(got, out[mask], rtol=2e-2, atol=2e-2)

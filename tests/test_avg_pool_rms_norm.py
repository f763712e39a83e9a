"""vitops.avg_pool_rms_norm (Gemma 3's exit before its GEMM): reference, HF, gradients, opcheck,
compile, bad input, devices."""

import pytest
import torch

from vitops import reference
from vitops.ops import avg_pool_rms_norm

from _utils import DEVICES, randn, tol

SHAPES = [(2, 64, 16, 48), (1, 36, 9, 32), (3, 16, 1, 8), (2, 16, 16, 8), (0, 16, 4, 8), (2, 4096, 256, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["scale_plus_one", "scale", "rms", "none"])
def test_forward_matches_reference(dtype, shape, norm):
    b, seq, length, d = shape
    x = randn(b, seq, d, dtype=dtype)
    w = (0.5 * torch.randn(d)).to(dtype) if norm in ("scale", "scale_plus_one") else None
    out = avg_pool_rms_norm(x, length, w, norm=norm)
    ref = reference.avg_pool_rms_norm(x, length, w, norm=norm)
    assert out.shape == (b, length, d) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_matches_hf_gemma3_projector_norm_and_pool():
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    vis = dict(hidden_size=48, image_size=112, patch_size=14, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, vision_use_head=False)
    proj = Gemma3MultiModalProjector(Gemma3Config(vision_config=vis, text_config=dict(hidden_size=40),
                                                  mm_tokens_per_image=16))
    torch.nn.init.normal_(proj.mm_soft_emb_norm.weight, std=0.5)
    x = randn(3, 64, 48)
    with torch.no_grad():
        grid = x.transpose(1, 2).reshape(3, 48, 8, 8).contiguous()
        want = proj.mm_soft_emb_norm(proj.avg_pool(grid).flatten(2).transpose(1, 2))
        got = avg_pool_rms_norm(x, 16, proj.mm_soft_emb_norm.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["scale_plus_one", "scale", "rms", "none"])
def test_gradcheck_float64(norm):
    x = torch.randn(2, 16, 6, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(6, dtype=torch.float64)).requires_grad_() if norm in ("scale", "scale_plus_one") else None
    args = (x,) if w is None else (x, w)
    assert torch.autograd.gradcheck(lambda x, *w: avg_pool_rms_norm(x, 4, w[0] if w else None, norm=norm), args)


def test_backward_matches_reference_float32():
    x = randn(2, 64, 24, requires_grad=True)
    w = (0.5 * torch.randn(24)).requires_grad_()
    g = randn(2, 16, 24)
    got = torch.autograd.grad((avg_pool_rms_norm(x, 16, w) * g).sum(), (x, w))
    want = torch.autograd.grad((reference.avg_pool_rms_norm(x, 16, w) * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck():
    x = randn(2, 16, 8, requires_grad=True)
    w = (0.5 * torch.randn(8)).requires_grad_()
    torch.library.opcheck(torch.ops.vitops.avg_pool_rms_norm.default, (x, 4, w, 1e-6, "scale_plus_one"))
    torch.library.opcheck(torch.ops.vitops.avg_pool_rms_norm.default, (x, 1, None, 1e-6, "rms"))
    torch.library.opcheck(torch.ops.vitops._avg_pool_rms_norm_backward.default,
                          (randn(2, 4, 8), x.detach(), 4, w.detach(), 1e-6, "scale_plus_one"))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    w = 0.5 * torch.randn(8)
    f = torch.compile(lambda x: avg_pool_rms_norm(x, 4, w), fullgraph=True, dynamic=dynamic)
    for b in (2, 3):
        x = randn(b, 16, 8)
        torch.testing.assert_close(f(x), reference.avg_pool_rms_norm(x, 4, w))


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.randn(2, 15, 8)), r"must be a square grid"),
    (dict(length=8), r"`length` \(8\) must be a square whose side divides the grid side 4"),
    (dict(length=9), r"`length` \(9\) must be a square whose side divides the grid side 4"),
    (dict(length=0), r"`length` must be a positive int"),
    (dict(weight=None), r'`weight` must be given with norm="scale_plus_one"'),
    (dict(weight=torch.ones(7)), r"`weight` must have shape \[D\] = \[8\]"),
    (dict(x=torch.ones(2, 16, 8, dtype=torch.int64)), r"`x` must be"),
    (dict(weight=torch.ones(8).to(torch.float8_e4m3fn)), r"`weight` must be a float32, bfloat16 or float16 or float64"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), r"`weight` must be a float32, bfloat16 or float16"),
    (dict(eps=float("nan")), r"`eps` must be a finite number"),
])
def test_bad_input_real_and_fake(kwargs, match):
    args = dict(x=torch.randn(2, 16, 8), length=4, weight=torch.ones(8), eps=1e-6)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        avg_pool_rms_norm(args["x"], args["length"], args["weight"], eps=args["eps"])
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        avg_pool_rms_norm(meta["x"], meta["length"], meta["weight"], eps=meta["eps"])


@pytest.mark.parametrize("device", DEVICES)
def test_device_forward_backward(device):
    """Forward and backward against the reference on each device (the CUDA variant runs in
    tools/gpu_check.sh, also under compute-sanitizer), a strided x included."""
    for dtype in (torch.float32, torch.bfloat16):
        wide = randn(2, 64, 50, dtype=dtype, device=device)
        for x in (wide[..., :48].contiguous(), wide[..., :48]):  # contiguous rows, then rows with a stride of 50
            x = x.detach().requires_grad_()
            w = (0.5 * torch.randn(48, device=device)).requires_grad_()
            g = randn(2, 16, 48, dtype=dtype, device=device)
            out = avg_pool_rms_norm(x, 16, w)
            ref = reference.avg_pool_rms_norm(x, 16, w)
            torch.testing.assert_close(out, ref, **tol(dtype))
            got = torch.autograd.grad((out * g).sum(), (x, w))
            want = torch.autograd.grad((ref * g).sum(), (x, w))
            for a, b in zip(got, want):
                scale = b.abs().max().item() + 1e-6
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                           atol=(2e-2 if dtype != torch.float32 else 1e-6) * scale)


def test_exported_and_equal_to_the_projector_path_at_the_released_size():
    """vitops.avg_pool_rms_norm at Gemma 3's size: [2, 4096, 1152] -> [2, 256, 1152], against
    HF's AvgPool2d + Gemma3RMSNorm."""
    import vitops
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    vis = dict(hidden_size=1152, image_size=896, patch_size=14, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, vision_use_head=False)
    proj = Gemma3MultiModalProjector(Gemma3Config(vision_config=vis, text_config=dict(hidden_size=40),
                                                  mm_tokens_per_image=256))
    torch.nn.init.normal_(proj.mm_soft_emb_norm.weight, std=0.5)
    x = randn(2, 4096, 1152)
    with torch.no_grad():
        grid = x.transpose(1, 2).reshape(2, 1152, 64, 64).contiguous()
        want = proj.mm_soft_emb_norm(proj.avg_pool(grid).flatten(2).transpose(1, 2))
        got = vitops.avg_pool_rms_norm(x, 256, proj.mm_soft_emb_norm.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

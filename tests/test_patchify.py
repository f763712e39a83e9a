import pytest
import torch

import vitops
from vitops import reference

from _utils import DEVICES, device_dtypes, noncontiguous, randn, tol

SHAPES = [
    ((2, 32, 48, 3), 16),  # batch, rectangular grid
    ((3, 1, 12, 12, 3), 4),  # two leading dims (B, I)
    ((6, 10, 5), 2),  # no batch dim, odd channel count
    ((1, 9, 15, 3), 3),  # odd patch size
    ((0, 8, 8, 3), 4),  # empty batch
    ((2, 0, 8, 3), 4),  # zero height
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape,p", SHAPES)
def test_forward_matches_reference(device, dtype, shape, p):
    images = randn(*shape, dtype=dtype, device=device)
    patches, pos = vitops.patchify(images, p)
    ref_patches, ref_pos = reference.patchify(images, p)
    assert patches.is_contiguous() and pos.dtype == torch.int64
    torch.testing.assert_close(patches, ref_patches, rtol=0, atol=0)
    torch.testing.assert_close(pos, ref_pos, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_noncontiguous_and_backward(device, dtype):
    images = noncontiguous(randn(2, 8, 12, 3, dtype=dtype, device=device), dim=-2).requires_grad_()
    ref_images = images.detach().clone().requires_grad_()
    patches, _ = vitops.patchify(images, 4)
    ref_patches, _ = reference.patchify(ref_images, 4)
    torch.testing.assert_close(patches, ref_patches, rtol=0, atol=0)
    grad = randn(*patches.shape, dtype=dtype, device=device)
    patches.backward(grad)
    ref_patches.backward(grad)
    torch.testing.assert_close(images.grad, ref_images.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_matches_hf_processor_layout(backend):
    """Same (row, col, channel) order and (x, y) positions as HF's Gemma 4 image processors (the
    PIL/numpy one and the torch one, which imports torchvision)."""
    import os

    module = {"pil": "image_processing_pil_gemma4", "torchvision": "image_processing_gemma4"}[backend]
    try:
        import importlib

        hf = importlib.import_module(f"transformers.models.gemma4.{module}")
    except ImportError as e:
        if os.environ.get("CI") == "true":
            raise  # CI installs what this needs (tools/setup.sh): a skip would hide the check
        pytest.skip(f"transformers.models.gemma4.{module} is not importable: {e}")
    img_chw = torch.rand(3, 32, 48)
    hf_patches = hf.convert_image_to_patches(img_chw if backend == "torchvision" else img_chw.numpy(), 16)
    patches, pos = vitops.patchify(img_chw.permute(1, 2, 0).unsqueeze(0), 16)
    torch.testing.assert_close(patches[0], torch.as_tensor(hf_patches).to(patches.dtype), rtol=0, atol=0)
    assert pos[0, :4].tolist() == [[0, 0], [1, 0], [2, 0], [0, 1]]


def test_gradcheck_float64():
    images = randn(2, 4, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vitops.patchify(t, 2)[0], (images,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for requires_grad in (False, True):
        images = randn(2, 8, 12, 3, device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.vitops.patchify.default, (images, 4))
    grad = randn(2, 6, 48, device=device)
    torch.library.opcheck(torch.ops.vitops._patchify_backward.default, (grad, 8, 12, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    def f(images):
        patches, pos = vitops.patchify(images, 4)
        return patches * 2, pos

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for shape in [(2, 8, 12, 3), (3, 16, 8, 3)]:
        images = randn(*shape, device=device, requires_grad=True)
        out, pos = compiled(images)
        ref_images = images.detach().clone().requires_grad_()
        ref, ref_pos = reference.patchify(ref_images, 4)  # the oracle, not vitops eager
        torch.testing.assert_close(out, ref * 2, rtol=0, atol=0)
        torch.testing.assert_close(pos, ref_pos, rtol=0, atol=0)
        grad = torch.randn_like(out)
        out.backward(grad)
        (ref * 2).backward(grad)
        torch.testing.assert_close(images.grad, ref_images.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(8, 8), 4), "at least 3 dims"),
        ((torch.randn(1, 10, 8, 3), 4), "divisible by `patch_size`"),
        ((torch.randn(1, 8, 8, 3), 0), "`patch_size` must be a positive"),
        ((torch.ones(1, 8, 8, 3, dtype=torch.int64), 4), "`images` must be float32"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        vitops.patchify(*args)


@pytest.mark.parametrize("patch_size", [2**32, 3037000500, 2**62, 2**63 - 1])
def test_patch_sizes_whose_square_overflows_are_rejected(patch_size):
    """patch_size**2 used to wrap (to 0 for 2^32: SIGFPE in the backward, reachable from autograd)."""
    x = torch.zeros(0, 0, 1, requires_grad=True)
    with pytest.raises(RuntimeError, match="`patch_size` .* is too large"):
        vitops.patchify(x, patch_size)
    with pytest.raises(RuntimeError, match="`patch_size` .* is too large"):
        torch.ops.vitops._patchify_backward(torch.zeros(0, 0), 0, 0, patch_size)


@pytest.mark.parametrize("height,width,match", [
    (-4, 4, "`height` must be a non-negative int"),
    (4, -4, "`width` must be a non-negative int"),
    (2**62, 2**62, r"patch count .* does not fit in int64"),
])
def test_backward_size_arguments_are_checked(height, width, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vitops._patchify_backward(torch.zeros(1, 4, 12), height, width, 2)
    with pytest.raises(RuntimeError, match=match):  # the fake kernel validates the same way
        torch.ops.vitops._patchify_backward(torch.zeros(1, 4, 12, device="meta"), height, width, 2)


def test_patch_width_overflow_is_rejected():
    """p*p*C is the patches' last dim: a product past int64 is an error, not a wrapped size."""
    images = torch.empty(0, 0, 0, 1).expand(0, 0, 0, 2**40)  # no storage: sizes only
    with pytest.raises(RuntimeError, match="patch width .* does not fit in int64"):
        vitops.patchify(images, 2**12)


# --------------------------------------------------------------------------------------------
# channels_first: Llama 4's unfold patch extraction (NCHW tiles, (channel, row, col) patches)
# --------------------------------------------------------------------------------------------
CHANNELS_FIRST_SHAPES = [
    ((2, 3, 28, 42), 14),  # NCHW tiles, Llama 4's patch size
    ((2, 2, 3, 12, 8), 4),  # two leading dims [b, t, C, H, W]
    ((5, 9, 6), 3),  # no batch dim, odd channel count
    ((1, 4, 8, 8), 1),  # patch 1: runs of one element
    ((0, 3, 8, 8), 4),  # empty batch
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape,p", CHANNELS_FIRST_SHAPES)
def test_channels_first_matches_unfold(device, dtype, shape, p):
    images = randn(*shape, dtype=dtype, device=device)
    patches, pos = vitops.patchify(images, p, channels_first=True)
    ref_patches, ref_pos = reference.patchify(images, p, channels_first=True)
    torch.testing.assert_close(patches, ref_patches, rtol=0, atol=0)
    # the positions do not depend on the layout
    assert torch.equal(pos, reference.patchify(images.movedim(-3, -1), p)[1]) and torch.equal(pos, ref_pos)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_first_equals_hf_llama4_unfold_and_backward(device):
    """HF's Llama4UnfoldConvolution is torch.nn.Unfold + transpose + a linear: our patches are its
    unfold bit for bit, and the gradient is the inverse permutation."""
    images = randn(2, 3, 56, 42, device=device).requires_grad_()
    unfold = torch.nn.Unfold(kernel_size=14, stride=14)
    want = unfold(images).permute(0, 2, 1)
    got, _ = vitops.patchify(images, 14, channels_first=True)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    (g,) = torch.autograd.grad(got, images, grad)
    (w,) = torch.autograd.grad(want, images, grad)
    assert torch.equal(g, w)
    # strided (channels-last memory) input: same result
    strided = images.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(vitops.patchify(strided, 14, channels_first=True)[0], want)


def test_channels_first_gradcheck_opcheck_compile():
    x = torch.randn(2, 3, 8, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vitops.patchify(t, 2, channels_first=True)[0], (x,))
    torch.library.opcheck(torch.ops.vitops.patchify.default, (x.float().detach().requires_grad_(), 2, True))
    torch.library.opcheck(torch.ops.vitops._patchify_backward.default, (torch.randn(2, 8, 12), 8, 4, 2, True))
    for dynamic in (False, True):
        f = torch.compile(lambda t: vitops.patchify(t, 2, channels_first=True)[0], fullgraph=True, dynamic=dynamic)
        for b in (2, 3):
            t = torch.randn(b, 3, 8, 6)
            assert torch.equal(f(t), reference.patchify(t, 2, channels_first=True)[0])


def test_channels_first_bad_input_names_the_layout():
    with pytest.raises(RuntimeError, match=r"`images` must have shape \[\.\.\., C, H, W\]"):
        vitops.patchify(torch.randn(4, 4), 2, channels_first=True)
    with pytest.raises(RuntimeError, match=r"image height and width \(5, 8\) must be divisible"):
        vitops.patchify(torch.randn(3, 5, 8), 2, channels_first=True)
    with pytest.raises(RuntimeError, match=r"image height and width \(5, 8\) must be divisible"):
        vitops.patchify(torch.randn(3, 5, 8, device="meta"), 2, channels_first=True)

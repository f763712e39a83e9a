"""pixel_shuffle (Llama 4's vision adapter): HF parity, ratios, grids, bad input, autograd.

The op-agnostic checks (every dtype and device against the reference, opcheck, compile, gradcheck,
strided and empty inputs, emulated CUDA) run from the op manifest in test_ops_common.py; the fuzzer
draws random grids, ratios and leading dims.
"""

import pytest
import torch

import vitops
from vitops import reference

from _utils import DEVICES, device_dtypes, noncontiguous, randn


def _hf():
    return pytest.importorskip("transformers.models.llama4.modeling_llama4").pixel_shuffle


# (B, side, C, ratio): the released adapter (24 x 24, 0.5), 0.25, odd channel counts, 1/3, ratio 1
CASES = [(2, 24, 16, 0.5), (3, 8, 5, 0.25), (1, 6, 7, 1 / 3), (2, 4, 3, 1.0), (1, 2, 1, 0.5)]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("b,side,c,ratio", CASES)
def test_matches_hf_bitwise(device, dtype, b, side, c, ratio):
    x = randn(b, side * side, c, dtype=dtype, device=device)
    out = vitops.pixel_shuffle(x, ratio)
    n = round(1 / ratio)
    assert out.shape == (b, (side // n) ** 2, c * n * n) and out.is_contiguous()
    assert torch.equal(out, _hf()(x, ratio))
    assert torch.equal(out, reference.pixel_shuffle(x, ratio))


def test_closed_form_and_not_pixel_unshuffle():
    """out[b, h' * (side/n) + w', (dh * n + dw) * C + c] = in[b, (n h' + dh) * side + (n w' + dw), c]."""
    side, c, n = 6, 4, 2
    x = torch.arange(side * side * c, dtype=torch.float32).view(1, side * side, c)
    out = vitops.pixel_shuffle(x, 1 / n)
    for hp in range(side // n):
        for wp in range(side // n):
            for dh in range(n):
                for dw in range(n):
                    got = out[0, hp * (side // n) + wp, (dh * n + dw) * c:(dh * n + dw + 1) * c]
                    assert torch.equal(got, x[0, (n * hp + dh) * side + (n * wp + dw)])
    torch_order = torch.nn.functional.pixel_unshuffle(x.view(1, side, side, c).permute(0, 3, 1, 2), n)
    assert not torch.equal(out, torch_order.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_strided_and_backward(device):
    x = noncontiguous(randn(2, 3, 64, 6, device=device), dim=-1).requires_grad_()
    out = vitops.pixel_shuffle(x, 0.25)
    ref = reference.pixel_shuffle(x.detach(), 0.25)
    assert torch.equal(out, ref) and out.shape == (2, 3, 4, 96)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, grad)
    x2 = x.detach().clone().requires_grad_()
    (w,) = torch.autograd.grad(_hf()(x2.view(6, 64, 6), 0.25).view(2, 3, 4, 96), x2, grad)
    assert torch.equal(g, w)


def test_double_backward():
    x = torch.randn(2, 16, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: vitops.pixel_shuffle(t, 0.5), (x,))


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_compile_dynamic_no_recompile_for_another_batch(ratio):
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    f = torch.compile(lambda t: vitops.pixel_shuffle(t, ratio), backend=backend, fullgraph=True, dynamic=True)
    for b in (2, 3, 5):
        x = torch.randn(b, 64, 8)
        assert torch.equal(f(x), reference.pixel_shuffle(x, ratio))
    assert counts["n"] == 1


@pytest.mark.parametrize(
    "shape,ratio,match",
    [
        ((2, 10, 4), 0.5, r"L = 10 tokens, which is not a square grid"),
        ((2, 36, 4), 0.25, r"`shuffle_ratio` 1/4 needs the grid side to be a multiple of 4, got side 6"),
        ((2, 16, 4), 0.3, r"`shuffle_ratio` must be 1/n for a whole n >= 1 \(0.5, 0.25, ...\), got 0.3"),
        ((2, 16, 4), 2.0, r"`shuffle_ratio` must be 1/n"),
        ((2, 16, 4), 0.5000001, r"`shuffle_ratio` must be 1/n"),
        ((2, 36, 4), float(torch.tensor(1 / 3, dtype=torch.float32)), r"`shuffle_ratio` must be 1/n"),
        ((2, 16, 4), 0.0, r"`shuffle_ratio` must be 1/n"),
        ((2, 16, 4), float("nan"), r"`shuffle_ratio` must be 1/n"),
        ((16,), 0.5, r"`input_tensor` must have shape \[\.\.\., L, C\] \(at least 2 dims\)"),
    ],
)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input(shape, ratio, match, device):
    with pytest.raises(RuntimeError, match=match):
        vitops.pixel_shuffle(torch.zeros(shape, device=device), ratio)


def test_bad_dtype_and_backward_shapes():
    with pytest.raises(RuntimeError, match=r"`input_tensor` must be float32, bfloat16, float16 or float64, got int64"):
        vitops.pixel_shuffle(torch.zeros(2, 16, 4, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match=r"`grad_output` shape \[2, 4, 6\] is not a pixel_shuffle output"):
        torch.ops.vitops._pixel_shuffle_backward(torch.zeros(2, 4, 6), 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_views_read_in_place_or_copied(device):
    """Llama 4 shuffles the CLS-dropped view x[:, :-1]: read in place; views whose grids are not
    contiguous or whose leading dims do not flatten are copied first; all give the reference."""
    full = randn(3, 2, 17, 8, device=device)
    views = [full[:, 0, :-1], full[:, :, :-1], full.transpose(0, 1)[:, :, 1:],
             full[:1, 0, :16].expand(4, 16, 8), full[:, 0, :16, :].transpose(-1, -2).contiguous().transpose(-1, -2)]
    for x in views:
        assert torch.equal(vitops.pixel_shuffle(x, 0.5), reference.pixel_shuffle(x.contiguous(), 0.5))

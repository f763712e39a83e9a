import math

import pytest
import torch

import vitops
from vitops import reference
from vitops.ops import avg_pool_scale_standardize

from _utils import DEVICES, HUGE_POSITIONS, device_dtypes, noncontiguous, randn, tol


def grid_positions(width, height, seq_len, device="cpu", dtype=torch.int64):
    """Row-major (x, y) positions of a width x height patch grid, padded with (-1, -1) to seq_len."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    pad = torch.full((seq_len - pos.shape[0], 2), -1, dtype=pos.dtype)
    return torch.cat([pos, pad]).to(device=device, dtype=dtype)


def mixed_batch(k, length, grids, device="cpu", dtype=torch.int64):
    """[B, k*k*length, 2]: one image per (width, height) grid (multiples of k), padded."""
    seq_len = k * k * length
    return torch.stack([grid_positions(w, h, seq_len, device, dtype) for w, h in grids])


def std_buffers(d, device="cpu", dtype=torch.float32):
    # large biases like the released checkpoints (cancellation must happen in float32)
    return (300 * torch.randn(d, device=device)).to(dtype), (0.5 + torch.rand(d, device=device)).to(dtype)


# (k, length, grids, D)
CASES = [
    (3, 8, [(6, 6), (3, 12), (9, 3)], 24),  # Gemma 4 k = 3, mixed resolutions with padding
    (2, 6, [(4, 6), (6, 2)], 17),  # odd D
    (1, 5, [(5, 1), (2, 2)], 8),  # k = 1
    (2, 4, [], 8),  # empty batch
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("k,length,grids,d", CASES)
@pytest.mark.parametrize("standardize", [False, True])
def test_forward_matches_reference(device, dtype, k, length, grids, d, standardize):
    pos = mixed_batch(k, length, grids, device) if grids else torch.zeros(0, k * k * length, 2, dtype=torch.int64)
    pos = pos.to(device)
    x = randn(len(grids), k * k * length, d, dtype=dtype, device=device)
    std = std_buffers(d, device) if standardize else (None, None)
    scale = math.sqrt(d)
    out, mask = avg_pool_scale_standardize(x, pos, length, scale, *std)
    ref, ref_mask = reference.avg_pool_scale_standardize(x, pos, length, scale, *std)
    assert out.shape == (len(grids), length, d) and out.dtype == dtype and mask.dtype == torch.bool
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_strided_inputs_and_buffer_dtypes(device, pos_dtype):
    pos = noncontiguous(mixed_batch(3, 4, [(6, 6), (3, 6)], device, pos_dtype), dim=-1)
    x = noncontiguous(randn(2, 36, 16, device=device), dim=-1)
    bias, scale = std_buffers(16, device, torch.bfloat16)
    out, mask = avg_pool_scale_standardize(x, pos, 4, 4.0, bias, scale)
    ref, ref_mask = reference.avg_pool_scale_standardize(x, pos, 4, 4.0, bias, scale)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    assert torch.equal(mask, ref_mask)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("standardize", [False, True])
def test_backward_matches_reference_autograd(device, dtype, standardize):
    pos = mixed_batch(3, 8, [(6, 6), (3, 12), (9, 3)], device)
    x = randn(3, 72, 24, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    std = std_buffers(24, device) if standardize else (None, None)
    out, _ = avg_pool_scale_standardize(x, pos, 8, 5.0, *std)
    ref, _ = reference.avg_pool_scale_standardize(x_ref, pos, 8, 5.0, *std)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
    # padding patches get no gradient
    assert (x.grad[(pos == -1).all(-1)] == 0).all()


def test_std_buffers_get_no_gradient():
    pos = mixed_batch(2, 4, [(4, 4)])
    x = randn(1, 16, 8, requires_grad=True)
    bias, scale = (t.requires_grad_() for t in std_buffers(8))
    out, _ = avg_pool_scale_standardize(x, pos, 4, 2.0, bias, scale)
    out.sum().backward()
    assert x.grad is not None and bias.grad is None and scale.grad is None


@pytest.mark.parametrize("standardize", [False, True])
def test_gradcheck_float64(standardize):
    pos = mixed_batch(2, 4, [(4, 4), (2, 4)])
    x = randn(2, 16, 5, dtype=torch.float64, requires_grad=True)
    std = std_buffers(5, dtype=torch.float64) if standardize else (None, None)
    assert torch.autograd.gradcheck(lambda t: avg_pool_scale_standardize(t, pos, 4, 3.0, *std)[0], (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pos = mixed_batch(3, 4, [(6, 6), (3, 6)], device)
    bias, scale = std_buffers(16, device)
    for requires_grad in (False, True):
        x = randn(2, 36, 16, device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.vitops.avg_pool_scale_standardize.default, (x, pos, 4, 4.0, bias, scale))
        torch.library.opcheck(torch.ops.vitops.avg_pool_scale_standardize.default, (x, pos, 4, 4.0, None, None))
    grad = randn(2, 4, 16, device=device)
    torch.library.opcheck(torch.ops.vitops._avg_pool_scale_standardize_backward.default, (grad, pos, 4, 36, 4.0, scale))
    torch.library.opcheck(torch.ops.vitops._avg_pool_scale_standardize_backward.default, (grad, pos, 4, 36, 4.0, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    def f(x, pos, bias, scale):
        out, mask = avg_pool_scale_standardize(x, pos, 4, math.sqrt(x.shape[-1]), bias, scale)
        return out * 2, mask

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for grids, d in [([(6, 6), (3, 6)], 16), ([(6, 3), (3, 3), (6, 6)], 8)]:
        pos = mixed_batch(3, 4, grids, device)
        bias, scale = std_buffers(d, device)
        x = randn(len(grids), 36, d, device=device, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, mask = compiled(x, pos, bias, scale)
        ref, ref_mask = reference.avg_pool_scale_standardize(x_ref, pos, 4, math.sqrt(d), bias, scale)
        ref = ref * 2  # the oracle, not vitops eager
        torch.testing.assert_close(out, ref)
        assert torch.equal(mask, ref_mask)
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_deterministic(device, dtype):
    pos = mixed_batch(3, 30, [(15, 18), (9, 30), (30, 9)], device)
    x = randn(3, 270, 200, dtype=dtype, device=device, requires_grad=True)
    bias, scale = std_buffers(200, device)
    grad = None
    results = []
    for _ in range(2):
        out, mask = avg_pool_scale_standardize(x, pos, 30, 14.0, bias, scale)
        grad = torch.randn_like(out) if grad is None else grad
        (gx,) = torch.autograd.grad(out, x, grad)
        results.append((out.detach(), mask, gx))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 16), torch.zeros(2, 16, 2, dtype=torch.int64), 4), r"`x` must have shape \[B, L, D\]"),
        ((torch.randn(1, 16, 4), torch.zeros(1, 16, 3, dtype=torch.int64), 4), r"`positions_xy` must have shape"),
        ((torch.randn(1, 16, 4), torch.zeros(1, 16, 2), 4), r"`positions_xy` must be an int64 or int32"),
        ((torch.randn(1, 16, 4), torch.zeros(1, 16, 2, dtype=torch.int64), 5), r"`length` \(5\) must be L/k² for an integer k"),
        ((torch.randn(1, 16, 4), torch.zeros(1, 16, 2, dtype=torch.int64), 0), r"`length` must be a positive int"),
        ((torch.ones(1, 16, 4, dtype=torch.int64), torch.zeros(1, 16, 2, dtype=torch.int64), 4), r"`x` must be float32"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        avg_pool_scale_standardize(*args, 1.0)


def test_bad_positions_name_positions_xy():
    x = randn(1, 16, 4)
    pos = mixed_batch(2, 4, [(4, 4)])
    bad = pos.clone()
    bad[0, 3] = torch.tensor([-1, 2])
    with pytest.raises(RuntimeError, match=r"`positions_xy`\[0, 3\] = \(-1, 2\) has a negative coordinate but is not "
                       r"the padding marker"):
        avg_pool_scale_standardize(x, bad, 4, 1.0)
    bad = pos.clone()
    bad[0, 3] = torch.tensor([2, 9])
    with pytest.raises(RuntimeError, match=r"`positions_xy`\[0, 3\] = \(2, 9\) maps to a slot >= length \(4\)"):
        avg_pool_scale_standardize(x, bad, 4, 1.0)


@pytest.mark.parametrize("op", ["avg_pool_scale_standardize", "avg_pool_by_positions"])
@pytest.mark.parametrize("case", list(HUGE_POSITIONS))
def test_huge_coordinates_are_past_length(op, case):
    coords, length, _ = HUGE_POSITIONS[case]
    pos = torch.tensor([coords], dtype=torch.int64)
    x = randn(1, len(coords), 2)
    with pytest.raises(RuntimeError, match=r"maps to a slot >= length"):
        if op == "avg_pool_by_positions":
            vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
        else:
            avg_pool_scale_standardize(x, pos, length, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(HUGE_POSITIONS))
def test_cuda_skips_huge_coordinates(case):
    """CUDA skips the patches no slot can hold (as padding), the rest pool as without them."""
    coords, length, bad = HUGE_POSITIONS[case]
    pos = torch.tensor([coords], dtype=torch.int64, device="cuda")
    x = randn(1, len(coords), 2, device="cuda")
    out, mask = avg_pool_scale_standardize(x, pos, length, 1.0)
    good = pos.clone()
    good[0, bad] = -1
    ref, ref_mask = reference.avg_pool_scale_standardize(x, good, length, 1.0)
    torch.testing.assert_close(out, ref)
    assert torch.equal(mask, ref_mask)


def test_bad_std_buffers():
    x, pos = randn(1, 16, 4), mixed_batch(2, 4, [(4, 4)])
    with pytest.raises(RuntimeError, match=r"`std_bias` and `std_scale` must be given together"):
        avg_pool_scale_standardize(x, pos, 4, 1.0, torch.zeros(4), None)
    with pytest.raises(RuntimeError, match=r"`std_scale` must have shape \[D\]"):
        avg_pool_scale_standardize(x, pos, 4, 1.0, torch.zeros(4), torch.ones(5))
    with pytest.raises(RuntimeError, match=r"`std_bias` must be a float32"):
        avg_pool_scale_standardize(x, pos, 4, 1.0, torch.zeros(4, dtype=torch.int64), torch.ones(4))


@pytest.mark.cuda
def test_cuda_skips_bad_positions():
    """CUDA cannot raise without a host sync: bad patches are ignored (no slot, no gradient)."""
    x = randn(1, 16, 4, device="cuda", requires_grad=True)
    pos = mixed_batch(2, 4, [(4, 4)], "cuda")
    pos[0, 3] = torch.tensor([-1, 2])
    out, mask = avg_pool_scale_standardize(x, pos, 4, 1.0)
    good = pos.clone()
    good[0, 3] = -1
    ref, ref_mask = reference.avg_pool_scale_standardize(x.detach(), good, 4, 1.0)
    torch.testing.assert_close(out, ref)
    assert torch.equal(mask, ref_mask)
    out.sum().backward()
    assert (x.grad[0, 3] == 0).all()


# --------------------------------------------------------------------------------------------
# parity with the installed transformers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_matches_hf_pooler_and_standardize(device, dtype):
    gemma4 = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config_mod = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    d, k, length = 32, 3, 12
    config = config_mod.Gemma4VisionConfig(hidden_size=d, pooling_kernel_size=k, standardize=True)
    pooler = gemma4.Gemma4VisionPooler(config)
    grids = [(6, 6), (3, 12), (12, 3)]
    pos = mixed_batch(k, length, grids, device)
    padding = (pos == -1).all(-1)
    hidden = randn(len(grids), k * k * length, d, dtype=dtype, device=device)
    hidden = hidden.masked_fill(padding.unsqueeze(-1), 0.0)  # HF's encoder output at padding is garbage; the pooler zeroes it
    std_bias, std_scale = std_buffers(d, device, dtype)
    with torch.no_grad():
        hf, hf_mask = pooler(hidden, pos, padding, output_length=length)
        hf = hf[hf_mask]  # Gemma4VisionModel.forward: strip, standardize in float32, cast
        hf = ((hf - std_bias.float()) * std_scale.float()).to(dtype)
    out, mask = avg_pool_scale_standardize(hidden, pos, length, pooler.root_hidden_size, std_bias, std_scale)
    assert torch.equal(mask, hf_mask)
    acc = dict(rtol=1e-6, atol=1e-4) if dtype in (torch.float32, torch.float64) else tol(dtype)
    torch.testing.assert_close(out[mask], hf.to(dtype), **acc)

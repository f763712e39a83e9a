import math

import pytest
import torch

import vitops
from vitops import reference

from _utils import DEVICES, device_dtypes, noncontiguous, randn, tol


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    """(x, y) of a rows x cols patch grid in row-major patch order, as vitops.patchify returns them."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def padded_batch(grids, seq_len: int, dtype=torch.int64, device="cpu", shuffle=False) -> torch.Tensor:
    """positions_xy [B, seq_len, 2]: one (rows, cols) grid per image, padded with (-1, -1) rows.
    shuffle=True scatters each image's patches and padding over the sequence in a random order."""
    out = torch.full((len(grids), seq_len, 2), -1, dtype=torch.int64)
    for b, (rows, cols) in enumerate(grids):
        pos = grid_positions(rows, cols)
        assert pos.shape[0] <= seq_len
        out[b, : pos.shape[0]] = pos
        if shuffle:
            out[b] = out[b, torch.randperm(seq_len)]
    return out.to(device=device, dtype=dtype)


# (grids as (rows, cols) per image, k, length): every slot count fits `length`.
CASES = [
    ([(6, 9), (9, 6), (3, 3)], 3, 8),  # mixed resolutions, padded to L = 72 (Gemma 4 uses k = 3)
    ([(4, 6), (2, 2)], 2, 6),  # k = 2, L = 24
    ([(3, 5), (5, 3), (1, 1)], 1, 15),  # k = 1: pooling is a scatter by position
    ([(6, 6), (0, 0)], 3, 4),  # an all-padding image
]


def run_both(x, pos, length):
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
    ref_out, ref_mask = reference.avg_pool_by_positions(x, pos, length)
    return out, mask, ref_out, ref_mask


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("grids,k,length", CASES)
@pytest.mark.parametrize("dim", [7, 768])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shuffle", [False, True])
def test_forward_matches_reference(device, dtype, grids, k, length, dim, index_dtype, shuffle):
    seq_len = k * k * length
    pos = padded_batch(grids, seq_len, index_dtype, device, shuffle=shuffle)
    x = randn(len(grids), seq_len, dim, dtype=dtype, device=device)
    out, mask, ref_out, ref_mask = run_both(x, pos, length)
    assert out.dtype == dtype and out.shape == (len(grids), length, dim) and out.is_contiguous()
    assert mask.dtype == torch.bool
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    assert torch.equal(mask, ref_mask)
    # Slots nothing landed in are exactly zero (the all-padding image included).
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_noncontiguous_and_backward(device, dtype):
    k, length = 3, 8
    seq_len = k * k * length
    pos = padded_batch([(6, 9), (9, 6), (3, 3)], seq_len, device=device)
    pos = noncontiguous(pos, dim=-1)  # strided positions too
    for x_dim in (-2, -1):  # strided rows, then a strided feature axis
        x = noncontiguous(randn(3, seq_len, 16, dtype=dtype, device=device), dim=x_dim).requires_grad_()
        ref_x = x.detach().clone().requires_grad_()
        out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
        ref_out, ref_mask = reference.avg_pool_by_positions(ref_x, pos, length)
        torch.testing.assert_close(out, ref_out, **tol(dtype))
        assert torch.equal(mask, ref_mask)
        grad = noncontiguous(randn(*out.shape, dtype=dtype, device=device), dim=x_dim)
        out.backward(grad)
        ref_out.backward(grad)
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_backward_op_directly(device, dtype):
    k, length = 2, 6
    seq_len = k * k * length
    pos = padded_batch([(4, 6), (2, 2)], seq_len, torch.int32, device, shuffle=True)
    grad = randn(2, length, 9, dtype=dtype, device=device)
    grad_x = torch.ops.vitops._avg_pool_by_positions_backward(grad, pos, length, seq_len)
    assert grad_x.shape == (2, seq_len, 9) and grad_x.is_contiguous() and grad_x.dtype == dtype
    slot, pad = reference.pool_slots(pos, k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.gather(grad.to(acc), 1, slot.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, 9)) / (k * k)
    expected = torch.where(pad.unsqueeze(-1), 0.0, expected).to(dtype)
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 36, 5), (2, 36, 0)])
def test_empty(device, shape):
    pos = padded_batch([(6, 6)] * shape[0], 36, device=device)
    x = randn(*shape, device=device, requires_grad=True)
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=4)
    assert out.shape == (shape[0], 4, shape[2]) and mask.shape == (shape[0], 4)
    _, ref_mask = reference.avg_pool_by_positions(x.detach(), pos, 4)
    assert torch.equal(mask, ref_mask)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_gradcheck_float64():
    pos = padded_batch([(6, 3), (3, 3)], 36, shuffle=True)
    x = randn(2, 36, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vitops.avg_pool_by_positions(t, positions_xy=pos, length=4)[0], (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pos = padded_batch([(6, 9), (9, 6), (3, 3)], 72, device=device)
    for requires_grad in (False, True):
        x = randn(3, 72, 8, device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.vitops.avg_pool_by_positions.default, (x, pos, 8))
    grad = randn(3, 8, 8, device=device)
    torch.library.opcheck(torch.ops.vitops._avg_pool_by_positions_backward.default, (grad, pos, 8, 72))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    def f(x, pos, length):
        out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
        return out * 2, mask

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for grids, seq_len, length in [([(6, 9), (9, 6), (3, 3)], 72, 8), ([(6, 6), (3, 6)], 36, 4)]:
        pos = padded_batch(grids, seq_len, device=device)
        x = randn(len(grids), seq_len, 16, device=device, requires_grad=True)
        ref_x = x.detach().clone().requires_grad_()
        out, mask = compiled(x, pos, length)
        ref_out, ref_mask = reference.avg_pool_by_positions(ref_x, pos, length)  # the oracle, not vitops eager
        torch.testing.assert_close(out, ref_out * 2)
        assert torch.equal(mask, ref_mask)
        grad = torch.randn_like(out)
        out.backward(grad)
        (ref_out * 2).backward(grad)
        torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_deterministic(device, dtype):
    k, length = 3, 280  # Gemma 4's default: 2520 patches pooled to 280 soft tokens
    seq_len = k * k * length
    pos = padded_batch([(48, 51), (27, 93), (9, 9), (0, 0)], seq_len, device=device, shuffle=True)
    x = randn(4, seq_len, 768, dtype=dtype, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
        out.backward(torch.ones_like(out))
        runs.append((out.detach(), mask, x.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    """Same patch order and float32 products/sums on both devices: equal up to rounding."""
    pos = padded_batch([(6, 9), (9, 6), (3, 3)], 72, shuffle=True)
    x = randn(3, 72, 768, dtype=dtype)
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=8)
    cuda_out, cuda_mask = vitops.avg_pool_by_positions(x.cuda(), positions_xy=pos.cuda(), length=8)
    torch.testing.assert_close(cuda_out.cpu(), out, **tol(dtype))
    assert torch.equal(cuda_mask.cpu(), mask)


@pytest.mark.cuda
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cuda_skips_out_of_range_patches(index_dtype):
    """CUDA cannot raise without a host sync: bad patches are skipped, as if they were padding.
    The bad patches chosen here have x <= 0, so they do not change the image's grid width."""
    k, length = 3, 4
    pos = padded_batch([(6, 6), (3, 3)], 36)
    bad = pos.clone()
    bad[1, 9] = torch.tensor([-3, 2])  # negative coordinate, not the padding pair
    bad[1, 10] = torch.tensor([0, 1000])  # slot far past `length`
    bad[1, 11] = torch.tensor([0, -1])  # only one coordinate is -1
    x = randn(2, 36, 24, device="cuda", requires_grad=True)
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=bad.to("cuda", index_dtype), length=length)
    ref_out, ref_mask = reference.avg_pool_by_positions(x.detach().cpu(), pos, length)
    torch.testing.assert_close(out.detach().cpu(), ref_out)
    assert torch.equal(mask.cpu(), ref_mask)
    out.sum().backward()
    assert torch.equal(x.grad[1, 9:12], torch.zeros_like(x.grad[1, 9:12]))


def _hf_pooler(dim):
    cfg_mod = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config = cfg_mod.Gemma4VisionConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=dim // 2)
    return modeling.Gemma4VisionPooler(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grids,length", [([(6, 9), (9, 6), (3, 3)], 8), ([(12, 6), (6, 12), (3, 6), (9, 9)], 9)])
def test_matches_hf_pooler(dtype, grids, length):
    dim, k = 64, 3
    seq_len = k * k * length
    pooler = _hf_pooler(dim)
    pos = padded_batch(grids, seq_len)
    padding = (pos == -1).all(dim=-1)
    x = randn(len(grids), seq_len, dim, dtype=dtype)
    with torch.no_grad():
        hf_out, hf_mask = pooler(x, pos, padding, output_length=length)
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
    assert hf_out.dtype == torch.float32
    # HF rounds its float32 matmul to the hidden dtype, as we do, then scales in float32.
    torch.testing.assert_close(out.float() * math.sqrt(dim), hf_out, **tol(dtype))
    assert torch.equal(mask, hf_mask)


def test_all_padding_image_differs_from_hf_mask():
    """HF clamps padding to (0, 0), so slot 0 of an all-padding image is marked valid (its value is
    zero because HF zeroes padding first). We mark no slot valid for such an image; values agree."""
    dim, k, length = 16, 3, 4
    pooler = _hf_pooler(dim)
    pos = padded_batch([(6, 6), (0, 0)], k * k * length)
    padding = (pos == -1).all(dim=-1)
    x = randn(2, k * k * length, dim)
    with torch.no_grad():
        hf_out, hf_mask = pooler(x, pos, padding, output_length=length)
    out, mask = vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)
    torch.testing.assert_close(out * math.sqrt(dim), hf_out)
    assert hf_mask[1].tolist() == [True, False, False, False]
    assert mask[1].tolist() == [False, False, False, False]
    assert torch.equal(mask[0], hf_mask[0])


def _pos(b=1, seq_len=36):
    return padded_batch([(6, 6)] * b, seq_len)


@pytest.mark.parametrize(
    "x,pos,length,match",
    [
        (torch.randn(36, 8), _pos(), 4, r"`x` must have shape \[B, L, D\]"),
        (torch.ones(1, 36, 8, dtype=torch.int64), _pos(), 4, "`x` must be float32"),
        (torch.randn(1, 36, 8), _pos().float(), 4, "`positions_xy` must be an int64 or int32"),
        (torch.randn(1, 36, 8), _pos()[:, :35], 4, r"`positions_xy` must have shape \[B, L, 2\]"),
        (torch.randn(1, 36, 8), _pos(2), 4, r"`positions_xy` must have shape \[B, L, 2\]"),
        (torch.randn(1, 36, 8), _pos()[..., :1], 4, r"`positions_xy` must have shape \[B, L, 2\]"),
        (torch.randn(1, 36, 8), _pos(), 5, r"`length` \(5\) must be L/k² for an integer k"),
        (torch.randn(1, 36, 8), _pos(), 0, "`length` must be a positive"),
        (torch.randn(1, 36, 8), _pos(), 37, r"`length` \(37\) must be L/k²"),
        (
            torch.randn(1, 36, 8),
            _pos().index_put((torch.tensor([0]), torch.tensor([35])), torch.tensor([[0, 6]])),
            4,
            r"`positions_xy`\[0, 35\] = \(0, 6\) maps to a slot >= length \(4\)",
        ),
        (
            torch.randn(1, 36, 8),
            _pos().index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor([[-1, 0]])),
            4,
            r"`positions_xy`\[0, 3\] = \(-1, 0\) has a negative coordinate",
        ),
    ],
)
def test_bad_input(x, pos, length, match):
    with pytest.raises(RuntimeError, match=match):
        vitops.avg_pool_by_positions(x, positions_xy=pos, length=length)


def test_bad_backward_input():
    pos = _pos()
    with pytest.raises(RuntimeError, match=r"`grad_output` must have shape \[B, length, D\]"):
        torch.ops.vitops._avg_pool_by_positions_backward(torch.randn(1, 5, 8), pos, 4, 36)
    with pytest.raises(RuntimeError, match=r"`positions_xy` must have shape"):
        torch.ops.vitops._avg_pool_by_positions_backward(torch.randn(1, 4, 8), pos, 4, 72)
    # A 3x3 grid with one patch moved to x = 3: width 4, so that patch lands in slot 1 of 1.
    wide = padded_batch([(3, 3)], 9)
    wide[0, 8] = torch.tensor([3, 0])
    with pytest.raises(RuntimeError, match="maps to a slot >= length"):
        torch.ops.vitops._avg_pool_by_positions_backward(torch.randn(1, 1, 8), wide, 1, 9)


@pytest.mark.parametrize("op", ["avg_pool_by_positions", "avg_pool_scale_standardize"])
@pytest.mark.parametrize("seq_len,valid", [(2**63 - 1, False), (3037000499**2, True), (2**62, True), (2**62 + 1, False)])
def test_sequence_lengths_near_int64_limits(op, seq_len, valid):
    """The kernel size k = sqrt(L / length) used to come from a loop whose (k+1)^2 overflowed: L = 2^63 - 1
    never returned and L = 3037000499^2 spun for seconds, then was rejected. Now an exact integer
    square root: a valid L (k^2 * length) returns at once, the others raise."""
    x = torch.empty(0, 1, 3).expand(0, seq_len, 3)
    pos = torch.empty(0, 1, 2, dtype=torch.long).expand(0, seq_len, 2)
    fn = getattr(torch.ops.vitops, op)
    args = (x, pos, 1) if op == "avg_pool_by_positions" else (x, pos, 1, 1.0, None, None)
    if valid:
        out, mask = fn(*args)
        assert out.shape == (0, 1, 3) and mask.shape == (0, 1)
        # its gradient [0, L, 3] has no contiguous layout (L * 3 overflows int64): a clear error, not
        # torch's "Stride calculation overflowed"; with D = 1 it exists
        backward = getattr(torch.ops.vitops, f"_{op}_backward")
        extra = () if op == "avg_pool_by_positions" else (1.0, None)
        with pytest.raises(RuntimeError, match=r"the gradient of x would have shape \[0, \d+, 3\]"):
            backward(torch.zeros(0, 1, 3), pos, 1, seq_len, *extra)
        assert backward(torch.zeros(0, 1, 1), pos, 1, seq_len, *extra).shape == (0, seq_len, 1)
    else:
        with pytest.raises(RuntimeError, match=r"`length` \(1\) must be L/k"):
            fn(*args)


@pytest.mark.parametrize("op", ["avg_pool_by_positions", "avg_pool_scale_standardize"])
def test_mixed_devices_are_rejected(op):
    """positions on meta with x on the CPU used to return uninitialised memory (the meta kernel ran)."""
    x = torch.randn(1, 4, 3)
    pos = torch.zeros(1, 4, 2, dtype=torch.long, device="meta")
    args = (x, pos, 1) if op == "avg_pool_by_positions" else (x, pos, 1, 1.0, None, None)
    with pytest.raises(RuntimeError, match="`x` and `positions_xy` must be on the same device, got cpu and meta"):
        getattr(torch.ops.vitops, op)(*args)

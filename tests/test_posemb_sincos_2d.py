"""vitops.posemb_sincos_2d: MaxText's MoCo v3 2-D sin-cos table (posemb_type_for_vit="sincos2d"), a
factory op. The shared op tests (test_ops_common.py) run it through the reference, opcheck,
torch.compile and the CUDA emulator; this file tests what is particular to it."""

import math

import pytest
import torch

import vitops
from vitops import reference
from vitops.ops.posemb_sincos_2d import posemb_sincos_2d

from _utils import DEVICES


def closed_form(h, w, width, temperature):
    """The table from its definition in float64 (MaxText's formula, not its float32 rounding)."""
    q = width // 4
    out = torch.empty(h * w, width, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for k in range(q):
                f = 1.0 / temperature ** (k / max(q - 1, 1))
                out[y * w + x, [k, q + k, 2 * q + k, 3 * q + k]] = torch.tensor(
                    [math.sin(x * f), math.cos(x * f), math.sin(y * f), math.cos(y * f)], dtype=torch.float64)
    return out[None]


@pytest.mark.parametrize("seed", range(8))
def test_random_grids_match_the_reference_and_the_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(0, 12, (2,), generator=gen))
    width = 4 * int(torch.randint(1, 20, (1,), generator=gen))
    temperature = (10000.0, 100.0, 1.0, 3.5)[seed % 4]
    got = posemb_sincos_2d(h, w, width, temperature)
    assert got.shape == (1, h * w, width) and got.dtype == torch.float32 and got.is_contiguous()
    want = reference.posemb_sincos_2d(torch.empty(0), h, w, width, temperature)
    # float32 math on both sides: libm's and torch's sin/cos/pow differ in the last bit at most
    torch.testing.assert_close(got, want, rtol=0, atol=2.4e-7)
    # float32 angles up to 11 rad: within a few float32 ulps of the exact table
    torch.testing.assert_close(got.double(), closed_form(h, w, width, temperature), rtol=0, atol=4e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_the_float32_table_rounded_once(dtype):
    got = posemb_sincos_2d(9, 7, 48, dtype=dtype)
    table32 = posemb_sincos_2d(9, 7, 48)
    assert got.dtype == dtype
    assert torch.equal(got, table32.to(dtype))


def test_rows_are_row_major_and_blocks_sin_cos_x_then_y():
    h, w, width = 3, 5, 8
    t = posemb_sincos_2d(h, w, width, temperature=10.0)[0]
    q = width // 4
    f = 1.0 / torch.tensor(10.0) ** (torch.arange(q, dtype=torch.float32) / (q - 1))
    for y in range(h):
        for x in range(w):
            row = t[y * w + x]
            torch.testing.assert_close(row[:q], torch.sin(x * f))
            torch.testing.assert_close(row[q:2 * q], torch.cos(x * f))
            torch.testing.assert_close(row[2 * q:3 * q], torch.sin(y * f))
            torch.testing.assert_close(row[3 * q:], torch.cos(y * f))


def test_width_four_is_finite_where_maxtext_divides_by_zero():
    t = posemb_sincos_2d(2, 3, 4)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t[0, 5], torch.tensor([math.sin(2), math.cos(2), math.sin(1), math.cos(1)]))


def test_empty_tables_and_meta():
    assert posemb_sincos_2d(0, 5, 8).shape == (1, 0, 8)
    assert posemb_sincos_2d(3, 5, 0).shape == (1, 15, 0)
    m = torch.ops.vitops.posemb_sincos_2d(torch.empty(0, device="meta"), 4, 6, 12, 10000.0, torch.bfloat16)
    assert m.device.type == "meta" and m.shape == (1, 24, 12) and m.dtype == torch.bfloat16


def test_like_gives_the_device_and_default_dtype_only():
    like = torch.randn(3, 4, dtype=torch.float16)[:, ::2]  # strided; values and shape unread
    a = torch.ops.vitops.posemb_sincos_2d(like, 4, 4, 8)
    b = torch.ops.vitops.posemb_sincos_2d(torch.empty(0, dtype=torch.int64), 4, 4, 8, 10000.0, torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a, b)
    like.requires_grad_(False)
    x = torch.randn(2, dtype=torch.float32, requires_grad=True)
    out = torch.ops.vitops.posemb_sincos_2d(x, 2, 2, 4)
    assert not out.requires_grad  # a constant: nothing flows back to `like`


@pytest.mark.parametrize("kwargs, match", [
    (dict(h=-1, w=2, width=4), r"`h` must be a non-negative int, got -1"),
    (dict(h=2, w=-3, width=4), r"`w` must be a non-negative int, got -3"),
    (dict(h=2, w=2, width=6), r"`width` must be a non-negative multiple of 4"),
    (dict(h=2, w=2, width=8, temperature=0.0), r"`temperature` must be a positive number finite in float32"),
    (dict(h=2, w=2, width=8, temperature=float("nan")), r"`temperature` must be a positive number"),
    (dict(h=2, w=2, width=8, temperature=1e39), r"`temperature` must be a positive number finite in float32"),
    (dict(h=2, w=2, width=8, dtype=torch.int32), r"`dtype` must be float32, bfloat16, float16 or float64"),
    (dict(h=2**32, w=2**32, width=8), r"the table rows h \* w .* does not fit in int64"),
    (dict(h=2**31, w=2**31, width=8), r"the output would have shape \[1, 4611686018427387904, 8\]"),
])
@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
def test_bad_arguments_get_clear_errors(kwargs, match, fake):
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(), pytest.raises(RuntimeError, match=match):
            posemb_sincos_2d(**kwargs)
    else:
        with pytest.raises(RuntimeError, match=match):
            posemb_sincos_2d(**kwargs)


def test_compile_dynamic_grid_one_graph():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()

    def add_table(x, w):
        return x + posemb_sincos_2d(x.shape[1] // w, w, x.shape[2], dtype=x.dtype, device=x.device)

    compiled = torch.compile(add_table, fullgraph=True, dynamic=True, backend=counter)
    for b, rows in ((2, 3), (3, 5), (4, 7)):
        x = torch.randn(b, rows * 6, 20)
        torch.testing.assert_close(compiled(x, 6), add_table(x, 6), rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_device_table(device):
    """The table on each device against the reference there (the CUDA variant runs in tools/gpu_check.sh)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = vitops.posemb_sincos_2d(64, 64, 1152, dtype=dtype, device=device)
        assert got.device.type == device and got.dtype == dtype
        want = reference.posemb_sincos_2d(torch.empty(0, device=device), 64, 64, 1152, 10000.0, dtype)
        atol = 2.4e-7 if dtype == torch.float32 else {torch.bfloat16: 7.9e-3, torch.float16: 9.8e-4}[dtype]
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=atol)
        assert torch.equal(got, vitops.posemb_sincos_2d(64, 64, 1152, dtype=dtype, device=device))

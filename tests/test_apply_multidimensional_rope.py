import pytest
import torch

import vitops
from vitops import reference

from _utils import DEVICES, device_dtypes, randn, tol

BASE = 100.0  # Gemma 4 vision rope theta


def make_positions(lead, length, axes, device, dtype=torch.int64, padded=True):
    """Positions [*lead, length] (axes=None, 1-D) or [*lead, length, axes]; -1 marks padding like HF."""
    shape = (*lead, length) if axes is None else (*lead, length, axes)
    low = -1 if padded else 0
    if dtype.is_floating_point:
        return (torch.rand(shape, device=device, dtype=torch.float64) * 60 - 1).to(dtype)
    return torch.randint(low, 50, shape, device=device, dtype=dtype)


# (inputs shape [..., L, H, hd], position axes (None = 1-D), rotary_fraction)
CASES = [
    ((2, 10, 4, 64), 2, None),  # Gemma 4 vision, hd 64
    ((2, 10, 4, 72), 2, None),  # Gemma 4 vision, hd 72 (chunk halves of 18)
    ((3, 5, 2, 8), 2, None),
    ((2, 7, 3, 6), 2, None),  # hd % 4 != 0: chunks [2, 4], the last takes the remainder
    ((2, 7, 3, 12), 3, None),
    ((2, 7, 3, 16), 3, None),  # chunks [4, 4, 8]
    ((2, 7, 3, 64), 2, 0.5),  # chunks [16, 16], 32 channels pass through
    ((2, 7, 3, 72), 3, 0.75),  # chunks [18, 18, 18], 18 pass through
    ((2, 9, 3, 64), None, None),  # 1-D over the whole head
    ((2, 9, 3, 72), None, 0.5),  # 1-D over the first 36 channels
    ((2, 9, 3, 12), None, 0.5),  # 1-D over 6 channels (odd half width)
    ((9, 3, 8), None, None),  # no batch dim
    ((2, 2, 5, 3, 8), 2, None),  # two leading dims
]


def case_id(case):
    shape, axes, fraction = case
    return f"{'x'.join(map(str, shape))}-{'1d' if axes is None else f'{axes}d'}-f{fraction}"


def run_both(x, pos, **kw):
    return (
        vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE, **kw),
        reference.apply_multidimensional_rope(x, pos, base_frequency=BASE, **kw),
    )


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_match_reference(device, dtype, case):
    shape, axes, fraction = case
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    pos = make_positions(shape[:-2][:-1], shape[-3], axes, device)
    out = vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE, rotary_fraction=fraction)
    ref = reference.apply_multidimensional_rope(x_ref, pos, base_frequency=BASE, rotary_fraction=fraction)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **tol(dtype))
    grad = randn(*shape, dtype=dtype, device=device)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("axes", [None, 2])
def test_position_dtypes(device, dtype, pos_dtype, axes):
    x = randn(2, 6, 3, 16, dtype=dtype, device=device)
    pos = make_positions((2,), 6, axes, device, dtype=pos_dtype)
    out, ref = run_both(x, pos)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("scale_factor", [0.5, 2.0, -1.25])
def test_scale_factor(device, dtype, scale_factor):
    x = randn(2, 8, 3, 72, dtype=dtype, device=device)
    pos = make_positions((2,), 8, 2, device)
    out, ref = run_both(x, pos, scale_factor=scale_factor)
    torch.testing.assert_close(out, ref, **tol(dtype))
    unscaled = vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE)
    assert not torch.equal(out, unscaled)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("hd", [64, 72, 6])
def test_strided_qkv_views(device, dtype, hd):
    """Q/K/V slices of a fused QKV projection are read in place through their strides."""
    b, length, heads = 2, 9, 3
    fused = randn(b, length, 3 * heads * hd, dtype=dtype, device=device)
    qkv = fused.view(b, length, 3, heads, hd)
    pos = make_positions((b,), length, 2, device)
    for i in range(3):
        view = qkv[:, :, i]
        assert not view.is_contiguous()
        out, ref = run_both(view, pos)
        torch.testing.assert_close(out, ref, **tol(dtype))
        torch.testing.assert_close(out, vitops.apply_multidimensional_rope(view.contiguous(), pos, base_frequency=BASE),
                                   rtol=0, atol=0)
    # [L, B, H, hd] transposed to [B, L, H, hd]: the rows do not collapse into one stride.
    lbhd = randn(length, b, heads, hd, dtype=dtype, device=device).transpose(0, 1)
    out, ref = run_both(lbhd, pos)
    torch.testing.assert_close(out, ref, **tol(dtype))
    # Head stride != hd (heads padded in memory), then a start misaligned by one element.
    padded_heads = randn(b, length, heads, hd + 2, dtype=dtype, device=device)[..., :hd]
    out, ref = run_both(padded_heads, pos)
    torch.testing.assert_close(out, ref, **tol(dtype))
    buf = randn(b * length * heads * hd + 1, dtype=dtype, device=device)
    offset_view = buf[1:].view(b, length, heads, hd)
    out, ref = run_both(offset_view, pos)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_channels_and_many_row_dims(device):
    """Channel stride != 1 and more strided row dims than the kernels address directly: copied first."""
    x = randn(2, 5, 3, 32, device=device)[..., ::2]
    pos = make_positions((2,), 5, 2, device)
    out, ref = run_both(x, pos)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    many = randn(4, 4, 4, 4, 4, 6, 2, 8, device=device)[::2, ::2, ::2, ::2, ::2]
    pos = make_positions((2, 2, 2, 2, 2), 6, 2, device)
    out, ref = run_both(many, pos)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    # An expanded (stride-0) gradient, as autograd produces for out.sum().
    x = randn(2, 5, 3, 16, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    pos = make_positions((2,), 5, None, device)
    vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE).sum().backward()
    reference.apply_multidimensional_rope(x_ref, pos, base_frequency=BASE).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape,axes", [((0, 5, 3, 8), 2), ((2, 0, 3, 8), 2), ((2, 0, 3, 8), None), ((2, 5, 0, 8), 2)])
def test_empty(device, dtype, shape, axes):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    pos = make_positions(shape[:-3], shape[-3], axes, device)
    out = vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_rotated_is_a_copy(device):
    """1-D with int(fraction * hd) == 0 leaves the input unchanged, as the reference does."""
    x = randn(2, 4, 3, 8, device=device)
    pos = make_positions((2,), 4, None, device)
    out, ref = run_both(x, pos, rotary_fraction=0.1)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(ref, x, rtol=0, atol=0)


@pytest.mark.parametrize("axes,fraction", [(2, None), (3, None), (None, 0.5), (2, 0.5)])
def test_gradcheck_float64(axes, fraction):
    x = randn(2, 4, 2, 12, dtype=torch.float64, requires_grad=True)
    pos = make_positions((2,), 4, axes, "cpu")
    fn = lambda t: vitops.apply_multidimensional_rope(t, pos, base_frequency=BASE, rotary_fraction=fraction)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axes,fraction", [(2, None), (None, 0.5)])
def test_opcheck(device, axes, fraction):
    pos = make_positions((2,), 6, axes, device)
    for requires_grad in (False, True):
        x = randn(2, 6, 3, 16, device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.vitops.apply_multidimensional_rope.default, (x, pos, BASE, fraction, 1.0))
    grad = randn(2, 6, 3, 16, device=device)
    torch.library.opcheck(torch.ops.vitops._apply_multidimensional_rope_backward.default, (grad, pos, BASE, fraction, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    def f(x, pos):
        return vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE) * 2

    def f_ref(x, pos):
        return reference.apply_multidimensional_rope(x, pos, base_frequency=BASE) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for b, length in [(2, 8), (3, 12)]:
        x = randn(b, length, 4, 72, device=device, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        pos = make_positions((b,), length, 2, device)
        out = compiled(x, pos)
        ref = f_ref(x_ref, pos)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if p.values[1] in (torch.float32, torch.bfloat16)])
def test_matches_hf_gemma4_vision_rope(device, dtype, head_dim):
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config_mod = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    heads = 4
    config = config_mod.Gemma4VisionConfig(
        head_dim=head_dim, hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads
    )
    theta = config.rope_parameters["rope_theta"]
    rotary = modeling.Gemma4VisionRotaryEmbedding(config).to(device)
    b, length = 2, 200
    pos = make_positions((b,), length, 2, device)
    q = randn(b, length, heads, head_dim, dtype=dtype, device=device)
    cos, sin = rotary(q, pos)
    hf = modeling.apply_multidimensional_rope(q, cos, sin, pos)
    ours = vitops.apply_multidimensional_rope(q, pos, base_frequency=theta)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(ours, hf, **tol(dtype))
    # Against a float64 evaluation, rounding once (ours) is at least as accurate as HF's
    # per-operation rounding in the activation dtype.
    exact = reference.apply_multidimensional_rope(q.double(), pos, base_frequency=theta)
    ours_err = (ours.double() - exact).abs()
    hf_err = (hf.double() - exact).abs()
    assert ours_err.max() <= hf_err.max() * 1.05 + 1e-6
    assert ours_err.mean() <= hf_err.mean() * 1.02 + 1e-9


def _bad(shape=(2, 5, 3, 8), pos_shape=(2, 5, 2), dtype=torch.float32, pos_dtype=torch.int64):
    return torch.zeros(shape, dtype=dtype), torch.zeros(pos_shape, dtype=pos_dtype)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_bad(shape=(5, 8), pos_shape=(5,)), {}, "at least 3 dims"),
        (_bad(pos_shape=(2, 4, 2)), {}, "leading dims of `positions`"),
        (_bad(pos_shape=(3, 5)), {}, "leading dims of `positions`"),
        (_bad(pos_shape=(2, 5, 2, 1)), {}, r"must have shape \[..., L\] \(1-D\) or \[..., L, ndim\]"),
        (_bad(dtype=torch.int64), {}, "`inputs` must be float32"),
        (_bad(pos_dtype=torch.bool), {}, "`positions` must be int32, int64, float32 or float64"),
        (_bad(shape=(2, 5, 3, 7)), {}, "chunk width 5 for axis 1 .* must be even"),
        (_bad(shape=(2, 5, 3, 12), pos_shape=(2, 5)), {"rotary_fraction": 0.25}, "rotated width 3 .* must be even"),
        (_bad(shape=(2, 5, 3, 2)), {}, "leaves no channels to rotate"),
        (_bad(pos_shape=(2, 5, 0)), {}, "at least one position axis"),
        (_bad(), {"rotary_fraction": 1.5}, r"`rotary_fraction` must be in \[0, 1\]"),
        (_bad(), {"base_frequency": 0.0}, "`base_frequency` must be a positive"),
    ],
)
def test_bad_input(args, kwargs, match):
    kwargs = {"base_frequency": BASE, **kwargs}
    with pytest.raises(RuntimeError, match=match):
        vitops.apply_multidimensional_rope(*args, **kwargs)


def test_bad_input_backward():
    grad, pos = _bad(shape=(2, 5, 3, 7))
    with pytest.raises(RuntimeError, match="_apply_multidimensional_rope_backward: chunk width 5"):
        torch.ops.vitops._apply_multidimensional_rope_backward(grad, pos, BASE, None, 1.0)
    grad, pos = _bad(pos_shape=(2, 4, 2))
    with pytest.raises(RuntimeError, match="leading dims of `positions`"):
        torch.ops.vitops._apply_multidimensional_rope_backward(grad, pos, BASE, None, 1.0)


@pytest.mark.cuda
def test_cuda_rejects_float64_and_cpu_positions():
    x = torch.zeros(2, 5, 3, 8, dtype=torch.float64, device="cuda")
    pos = torch.zeros(2, 5, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="float64 is CPU only"):
        vitops.apply_multidimensional_rope(x, pos, base_frequency=BASE)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        vitops.apply_multidimensional_rope(x.float(), pos.cpu(), base_frequency=BASE)


@pytest.mark.cuda
def test_cuda_wide_rotation_computes_frequencies_on_device():
    """Rotations with more than 512 pairs per head take the on-device inverse-frequency path."""
    x = randn(2, 3, 2, 1280, device="cuda")
    pos = make_positions((2,), 3, 2, "cuda")
    out, ref = run_both(x, pos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    cpu = vitops.apply_multidimensional_rope(x.cpu(), pos.cpu(), base_frequency=BASE)
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=2e-5)


# Positions near the int64 limits: the CPU angle table used to compute its span hi - lo in int64,
# which overflowed (heap overflow reads/writes, or zeros for [-2^63, 0]). Every int64 position gives
# a finite float32 angle, so these are valid and must match the reference, forward and backward.
EXTREMES = [-(2**63), 2**63 - 1, -(2**62), 2**62, -4, 0, 1, 2**31 - 1, -(2**31), 3 * 2**40]


@pytest.mark.parametrize("seed", range(6))
def test_int64_limit_positions_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    axes = [None, 1, 2][seed % 3]
    length = 2 + seed
    shape = (length,) if axes is None else (length, axes)
    pos = torch.tensor(EXTREMES)[torch.randint(0, len(EXTREMES), shape, generator=g)]
    x = torch.randn(length, 2, 8, generator=g, requires_grad=True)
    out = vitops.apply_multidimensional_rope(x, pos, base_frequency=100.0)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference.apply_multidimensional_rope(x_ref, pos, base_frequency=100.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # the row at position 0 is rotated by angle 0: unchanged (it used to come out as zeros)
    at_zero = (pos == 0) if axes is None else (pos == 0).all(-1)
    torch.testing.assert_close(out[at_zero], x.detach()[at_zero])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("pos_dtype", [torch.float32, torch.float64])
def test_non_finite_positions_raise_on_cpu(bad, pos_dtype):
    pos = torch.tensor([[0.0, 1.0], [2.0, bad]], dtype=pos_dtype)
    with pytest.raises(RuntimeError, match=r"`positions` must be finite, got .* at flat index 3"):
        vitops.apply_multidimensional_rope(torch.randn(2, 1, 8), pos, base_frequency=100.0)


def test_overflowing_angles_raise_on_cpu():
    """Finite positions whose angle (p * inv_freq) * scale_factor overflows float32: a clear error
    (float64 inputs compute in float64, where the same angle is finite)."""
    pos = torch.tensor([2**63 - 1, 5])
    with pytest.raises(RuntimeError, match="must give finite rotation angles"):
        vitops.apply_multidimensional_rope(torch.randn(2, 1, 4), pos, base_frequency=100.0, scale_factor=1e30)
    out = vitops.apply_multidimensional_rope(torch.randn(2, 1, 4, dtype=torch.float64), pos, base_frequency=100.0,
                                             scale_factor=1e30)
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="`scale_factor` must be a finite number"):
        vitops.apply_multidimensional_rope(torch.randn(2, 1, 4), pos, base_frequency=100.0, scale_factor=float("inf"))

"""The CUDA kernels and their launchers, run by the CPU execution emulator (torch.ops.vitops_emu).

Every op runs under both emulator schedules (threads ascending / descending between barriers) and
the two results must be bitwise identical: a missing __syncthreads/__syncwarp usually breaks that.
The results are compared with vitops.reference (tolerances of the CUDA tests; bitwise where those
demand bitwise). Shapes are small (the emulator runs every GPU thread as a fiber) but chosen to
reach every kernel variant the launchers pick: 16-byte vector and scalar paths, int32/int64 index
paths, several blocks and tiles, strided inputs and storage offsets that defeat vectorisation.

Skipped only when vitops was configured without the emulator (VITOPS_CUDA_EMULATION=OFF) and CI is
not set; a build configured with it whose library is missing fails, as does CI=true without it.
"""

import os

import pytest
import torch

import vitops
from vitops import reference, testing

from _utils import CUDA_DTYPES, HUGE_POSITIONS, noncontiguous, randn, tol

if not testing.load_cuda_emulator():
    if os.environ.get("CI") == "true" or testing.cuda_emulator_built():
        raise RuntimeError(
            f"the CUDA emulator library ({testing.cuda_emulator_path()}) is missing although "
            + ("CI=true" if os.environ.get("CI") == "true" else "vitops was built with VITOPS_CUDA_EMULATION=ON")
            + ": build with VITOPS_CUDA_EMULATION=ON (tools/setup.sh does)"
        )
    pytest.skip("the CUDA emulator library was not built (VITOPS_CUDA_EMULATION=OFF)", allow_module_level=True)

emu_ops = torch.ops.vitops_emu
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in CUDA_DTYPES]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def emu(name, *args):
    """torch.ops.vitops_emu.<name>(*args) under both schedules; the results must agree bit for bit."""
    op = getattr(emu_ops, name)
    runs = []
    for schedule in (0, 1):
        with testing.emulator_schedule(schedule):
            runs.append(_flat(op(*args)))
    for i, (a, b) in enumerate(zip(*runs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name} output {i} depends on the emulator schedule: {m}")
    return runs[0] if len(runs[0]) > 1 else runs[0][0]


def offset_by_one(t):
    """Same values as t in a buffer that starts one element later (the 16-byte paths must fall back)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# The emulator itself
# ---------------------------------------------------------------------------------------------
def test_emulator_exposes_a_missing_syncthreads():
    x = torch.randn(200)
    runs = []
    for schedule in (0, 1):
        with testing.emulator_schedule(schedule):
            runs.append((emu_ops._selftest_race(x, True), emu_ops._selftest_race(x, False)))
    (good0, bad0), (good1, bad1) = runs
    expected = x.view(-1)[torch.tensor([(i // 64) * 64 + (i % 64 + 1) % 64 for i in range(200)]).clamp(max=199)]
    ok = torch.tensor([(i // 64) * 64 + (i % 64 + 1) % 64 < 200 for i in range(200)])
    exact(good0[ok], expected[ok])
    exact(good0, good1)
    assert not torch.equal(bad0, bad1), "the planted race gave the same result under both schedules"


def test_emulator_reports_a_shuffle_with_an_exited_lane():
    x = torch.randn(100)  # the last warp has lanes past n that return before the shuffles
    out = emu("_selftest_shuffle", x, False)  # the correct variant works
    sums = torch.nn.functional.pad(x, (0, 28)).view(-1, 32).sum(1)
    counts = torch.tensor([32, 32, 32, 4], dtype=torch.float32)
    torch.testing.assert_close(out, (sums + counts).repeat_interleave(32)[:100])
    with pytest.raises(RuntimeError, match=r"early_exit_shuffle_kernel.*returned while .* waits at a warp collective"):
        emu_ops._selftest_shuffle(x, True)
    emu("_selftest_shuffle", x, False)  # the emulator is usable after an error


def test_emulator_reports_divergent_barriers_and_bad_launches():
    with pytest.raises(RuntimeError, match="divergent barrier"):
        emu_ops._selftest_divergent_barrier(torch.zeros(1))
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emu_ops._selftest_bad_launch(torch.zeros(1))
    with pytest.raises(RuntimeError, match="schedule must be 0 or 1"):
        emu_ops._set_schedule(2)
    assert emu_ops._get_schedule() == 0


def test_import_vitops_does_not_load_the_emulator():
    import subprocess
    import sys

    code = (
        "import vitops, torch\n"
        "try:\n    torch.ops.vitops_emu.patchify\n    print('loaded')\n"
        "except (AttributeError, RuntimeError):\n    print('absent')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.stdout.strip() == "absent", out.stderr


# ---------------------------------------------------------------------------------------------
# patchify: VEC = 16 bytes when p*C and both pointers allow it, else 1; grid-stride loops.
# ---------------------------------------------------------------------------------------------
PATCHIFY_SHAPES = [
    ((2, 12, 16, 4), 4),  # p*C = 16: vector path (f32 and 16-bit), 2+ blocks
    ((1, 9, 15, 3), 3),  # odd patch size, p*C = 9: scalar path, 2 blocks
    ((2, 2, 8, 8, 2), 4),  # two leading dims, p*C = 8: vector for f32 only
    ((0, 8, 8, 3), 4),  # empty batch
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,p", PATCHIFY_SHAPES)
def test_patchify(dtype, shape, p):
    images = randn(*shape, dtype=dtype)
    for variant in (images, offset_by_one(images), noncontiguous(images, dim=-2)):
        patches, pos = emu("patchify", variant, p)
        ref_patches, ref_pos = reference.patchify(images, p)
        exact(patches, ref_patches)
        exact(pos, ref_pos)
    grad = randn(*ref_patches.shape, dtype=dtype)
    h, w = shape[-3], shape[-2]
    ref_images = images.detach().clone().requires_grad_()
    reference.patchify(ref_images, p)[0].backward(grad)
    for variant in (grad, offset_by_one(grad), noncontiguous(grad, dim=-1)):
        exact(emu("_patchify_backward", variant, h, w, p), ref_images.grad)


# channels_first (Llama 4's unfold): runs of p elements, vectorized when p * element size is 16 bytes
CHANNELS_FIRST_SHAPES = [((2, 3, 32, 16), 8), ((1, 3, 28, 14), 14), ((2, 2, 12, 8), 4), ((1, 3, 6, 9), 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,p", CHANNELS_FIRST_SHAPES)
def test_patchify_channels_first(dtype, shape, p):
    images = randn(*shape, dtype=dtype)
    ref_patches, ref_pos = reference.patchify(images, p, channels_first=True)
    for variant in (images, offset_by_one(images), noncontiguous(images, dim=-2)):
        patches, pos = emu("patchify", variant, p, True)
        exact(patches, ref_patches)
        exact(pos, ref_pos)
    grad = randn(*ref_patches.shape, dtype=dtype)
    cpu = torch.ops.vitops._patchify_backward(grad, shape[-2], shape[-1], p, True)
    for variant in (grad, offset_by_one(grad)):
        exact(emu("_patchify_backward", variant, shape[-2], shape[-1], p, True), cpu)


# ---------------------------------------------------------------------------------------------
# pixel_shuffle: the patch permutation over the token grid (vector path when n * C fills 16 bytes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,side,c,ratio", [(2, 24, 16, 0.5), (1, 8, 3, 0.25), (2, 6, 5, 1 / 3), (1, 4, 8, 1.0),
                                             (0, 4, 8, 0.5)])
def test_pixel_shuffle(dtype, b, side, c, ratio):
    x = randn(b, side * side, c, dtype=dtype)
    want = reference.pixel_shuffle(x, ratio)
    cls_dropped = torch.cat([x, randn(b, 1, c, dtype=dtype)], dim=1)[:, :-1]  # grids read in place, strided
    for variant in (x, offset_by_one(x), noncontiguous(x, dim=-1), cls_dropped):
        exact(emu("pixel_shuffle", variant, ratio), want)
    grad = randn(*want.shape, dtype=dtype)
    exact(emu("_pixel_shuffle_backward", grad, ratio), torch.ops.vitops._pixel_shuffle_backward(grad, ratio))


# ---------------------------------------------------------------------------------------------
# factorized_posemb: forward VEC/scalar, int32/int64 positions, both table layouts, padding and
# poisoned (out-of-range) rows; backward: keys kernel, radix sort, one block per table row.
# ---------------------------------------------------------------------------------------------
def _posemb_positions(lead, n_pos, dtype):
    pos = torch.randint(0, n_pos, (*lead, 2))
    if pos.numel():
        flat = pos.view(-1, 2)
        flat[torch.rand(flat.shape[0]) < 0.2] = -1
        flat[torch.rand(flat.shape[0]) < 0.1, 0] = -1
        flat[torch.rand(flat.shape[0]) < 0.1, 1] = -1
    return pos.to(dtype)


# (leading dims, N_pos, D)
POSEMB_SHAPES = [
    ((300,), 13, 16),  # vector path, 5 forward blocks (f32)
    ((2, 37), 11, 7),  # odd D: scalar path
    ((45,), 3, 263),  # backward: more columns than threads (thread loops), scalar
    ((0,), 5, 8),  # no patches: backward writes zero rows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["hf", "maxtext"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("lead,n_pos,d", POSEMB_SHAPES)
def test_factorized_posemb(dtype, layout, index_dtype, lead, n_pos, d):
    hf = randn(2, n_pos, d, dtype=dtype)
    table, table_dim = (hf, 0) if layout == "hf" else (hf.transpose(0, 1), 1)
    pos = _posemb_positions(lead, n_pos, index_dtype)
    ref = reference.factorized_posemb(table, pos, table_dim)
    for variant in (table, offset_by_one(table.contiguous()) if layout == "hf" else table):
        out = emu("factorized_posemb", variant, pos, table_dim)
        exact(out, ref)  # the CUDA tests demand identical bits
        exact(out, torch.ops.vitops.factorized_posemb(variant, pos, table_dim))
    grad = randn(*ref.shape, dtype=dtype)
    ref_table = table.detach().clone().requires_grad_()
    reference.factorized_posemb(ref_table, pos, table_dim).backward(grad)
    cpu_grad = torch.ops.vitops._factorized_posemb_backward(grad, pos, n_pos, table_dim)
    for g in (grad, offset_by_one(grad), noncontiguous(grad, dim=-1) if grad.dim() else grad):
        got = emu("_factorized_posemb_backward", g, pos, n_pos, table_dim)
        torch.testing.assert_close(got, ref_table.grad, **tol(dtype))
        exact(got, cpu_grad)  # same summation order as the CPU kernel: bitwise


def test_factorized_posemb_out_of_range_is_nan_and_skipped_in_backward():
    table = randn(2, 5, 8)
    pos = torch.tensor([[0, 1], [5, 0], [2, -3], [-1, -1], [4, 4]])
    bad = torch.tensor([False, True, True, False, False])
    out = emu("factorized_posemb", table, pos, 0)
    assert out[bad].isnan().all()
    clean = torch.where(bad.unsqueeze(-1), -1, pos)
    exact(out[~bad], reference.factorized_posemb(table, clean, 0)[~bad])
    grad = randn(5, 8)
    valid = (pos >= 0) & (pos < 5)
    exact(emu("_factorized_posemb_backward", grad, pos, 5, 0),
          torch.ops.vitops._factorized_posemb_backward(grad, torch.where(valid, pos, -1), 5, 0))


# ---------------------------------------------------------------------------------------------
# apply_multidimensional_rope: VEC 16 bytes / 2 / 1, 1-D and N-D positions of every dtype,
# passthrough channels, strided row views, frequencies in the arguments or on the device.
# ---------------------------------------------------------------------------------------------
BASE = 100.0

# (inputs shape [..., L, H, hd], position axes (None = 1-D), rotary_fraction, position dtype)
ROPE_CASES = [
    ((2, 10, 4, 64), 2, None, torch.int64),  # halves of 16: 16-byte vectors
    ((2, 10, 4, 72), 2, None, torch.int32),  # halves of 18: VEC 2
    ((2, 7, 3, 6), 2, None, torch.float32),  # halves 1 and 2: VEC 1
    ((2, 7, 3, 72), 3, 0.75, torch.float64),  # passthrough channels
    ((2, 9, 3, 12), None, 0.5, torch.int64),  # 1-D, odd half width
    ((2, 2, 40, 1, 8), 2, None, torch.int64),  # two leading dims, 160 rows: several tiles / blocks
    ((1, 3, 1, 1040), None, None, torch.int64),  # 520 frequencies: computed on the device
    ((0, 5, 2, 8), 2, None, torch.int64),  # empty
]


def _rope_positions(lead, length, axes, dtype):
    shape = (*lead, length) if axes is None else (*lead, length, axes)
    if dtype.is_floating_point:
        return (torch.rand(shape, dtype=torch.float64) * 60 - 1).to(dtype)
    return torch.randint(-1, 50, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}")
def test_apply_multidimensional_rope(dtype, case):
    shape, axes, fraction, pos_dtype = case
    x = randn(*shape, dtype=dtype)
    pos = _rope_positions(shape[:-3], shape[-3], axes, pos_dtype)
    # frequencies computed on the device (powf there): the tolerance of the CUDA test of that path
    tolerance = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 and shape[-1] > 512 else tol(dtype)
    ref = reference.apply_multidimensional_rope(x, pos, base_frequency=BASE, rotary_fraction=fraction)
    # strided view: heads of a fused buffer (row and head strides that are not the packed ones)
    fused = randn(*shape[:-2], 2 * shape[-2], shape[-1], dtype=dtype)[..., : shape[-2], :]
    fused.copy_(x)
    for variant in (x, offset_by_one(x), fused):
        out = emu("apply_multidimensional_rope", variant, pos, BASE, fraction, 1.0)
        assert out.is_contiguous() and out.shape == x.shape
        torch.testing.assert_close(out, ref, **tolerance)
    x_ref = x.detach().clone().requires_grad_()
    ref_out = reference.apply_multidimensional_rope(x_ref, pos, base_frequency=BASE, rotary_fraction=fraction)
    grad = randn(*shape, dtype=dtype)
    ref_out.backward(grad)
    for g in (grad, offset_by_one(grad)):
        got = emu("_apply_multidimensional_rope_backward", g, pos, BASE, fraction, 1.0)
        torch.testing.assert_close(got, x_ref.grad, **tolerance)


def test_apply_multidimensional_rope_scale_factor():
    x = randn(2, 6, 2, 16)
    pos = _rope_positions((2,), 6, 2, torch.int64)
    out = emu("apply_multidimensional_rope", x, pos, BASE, None, 0.5)
    ref = reference.apply_multidimensional_rope(x, pos, base_frequency=BASE, scale_factor=0.5)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# avg_pool_by_positions: forward VEC/scalar, int32/int64, 1 or more slots per tile, several column
# chunks, D = 0, strided x and positions, skipped bad patches; backward VEC/scalar.
# ---------------------------------------------------------------------------------------------
def _padded_batch(grids, seq_len, dtype=torch.int64, shuffle=True):
    out = torch.full((len(grids), seq_len, 2), -1, dtype=torch.int64)
    for b, (rows, cols) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
        out[b, : pos.shape[0]] = pos
        if shuffle:
            out[b] = out[b, torch.randperm(seq_len)]
    return out.to(dtype)


# (grids, k, length, D)
POOL_CASES = [
    ([(6, 9), (9, 6), (3, 3)], 3, 8, 16),  # vector path (f32: 4 columns a thread)
    ([(4, 6), (2, 2)], 2, 6, 7),  # odd D: scalar path
    ([(3, 5), (5, 3)], 1, 15, 300),  # scalar, 300 columns: two column chunks
    ([(20, 27)], 1, 541, 8),  # 541 slots: 2 slots per tile, last tile partial
    ([(6, 6), (0, 0)], 3, 4, 0),  # D = 0 still writes the mask; an all-padding image
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("grids,k,length,d", POOL_CASES)
def test_avg_pool_by_positions(dtype, index_dtype, grids, k, length, d):
    if length > 500 and (dtype, index_dtype) not in ((torch.float32, torch.int64), (torch.bfloat16, torch.int32)):
        pytest.skip("the 541-slot case is slow under emulation: two dtype/index combinations cover it")
    seq_len = k * k * length
    pos = _padded_batch(grids, seq_len, index_dtype)
    x = randn(len(grids), seq_len, d, dtype=dtype)
    ref_out, ref_mask = reference.avg_pool_by_positions(x, pos, length)
    variants = [(x, pos), (offset_by_one(x), pos), (noncontiguous(x, dim=-1), noncontiguous(pos, dim=-1))]
    for xv, pv in variants if d <= 16 or d == 300 else variants[:1]:
        out, mask = emu("avg_pool_by_positions", xv, pv, length)
        torch.testing.assert_close(out, ref_out, **tol(dtype))
        exact(mask, ref_mask)
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    grad = randn(len(grids), length, d, dtype=dtype)
    x_ref = x.detach().clone().requires_grad_()
    reference.avg_pool_by_positions(x_ref, pos, length)[0].backward(grad)
    expected = x_ref.grad  # one product per element, as in the kernel: the CUDA tests demand identical bits
    for g in (grad, offset_by_one(grad), noncontiguous(grad, dim=-1)):
        exact(emu("_avg_pool_by_positions_backward", g, pos, length, seq_len), expected)


def test_avg_pool_by_positions_empty_batch():
    pos = _padded_batch([], 36)
    out, mask = emu("avg_pool_by_positions", randn(0, 36, 5), pos, 4)
    assert out.shape == (0, 4, 5) and mask.shape == (0, 4)
    assert emu("_avg_pool_by_positions_backward", randn(0, 4, 5), pos, 4, 36).shape == (0, 36, 5)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_avg_pool_by_positions_skips_bad_patches(index_dtype):
    pos = _padded_batch([(6, 6), (3, 3)], 36, shuffle=False)
    bad = pos.clone()
    bad[1, 9] = torch.tensor([-3, 2])
    bad[1, 10] = torch.tensor([0, 1000])
    bad[1, 11] = torch.tensor([0, -1])
    x = randn(2, 36, 24)
    out, mask = emu("avg_pool_by_positions", x, bad.to(index_dtype), 4)
    ref_out, ref_mask = reference.avg_pool_by_positions(x, pos, 4)
    torch.testing.assert_close(out, ref_out)
    exact(mask, ref_mask)
    grad_x = emu("_avg_pool_by_positions_backward", randn(2, 4, 24), bad.to(index_dtype), 4, 36)
    assert torch.equal(grad_x[1, 9:12], torch.zeros_like(grad_x[1, 9:12]))


# ---------------------------------------------------------------------------------------------
# avg_pool_scale_standardize: several slot chunks and channel chunks, standardize with buffers
# of other dtypes and strides, int32/int64 positions, strided x; backward against autograd.
# ---------------------------------------------------------------------------------------------
def _grid_batch(k, length, grids, dtype=torch.int64):
    seq_len = k * k * length
    out = []
    for w, h in grids:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
        out.append(torch.cat([pos, torch.full((seq_len - pos.shape[0], 2), -1)]))
    return torch.stack(out).to(dtype) if out else torch.empty(0, seq_len, 2, dtype=dtype)


# (k, length, grids, D)
APSS_CASES = [
    (3, 8, [(6, 6), (3, 12), (9, 3)], 24),  # Gemma 4 k = 3, padding
    (2, 36, [(12, 12), (4, 6)], 130),  # 36 slots: two slot chunks; 130 channels: two channel chunks
    (1, 5, [(5, 1), (2, 2)], 17),  # k = 1, odd D
    (2, 4, [(4, 4)], 0),  # D = 0: mask only
    (2, 4, [], 8),  # empty batch
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("k,length,grids,d", APSS_CASES)
def test_avg_pool_scale_standardize(dtype, index_dtype, k, length, grids, d):
    pos = _grid_batch(k, length, grids, index_dtype)
    x = randn(len(grids), k * k * length, d, dtype=dtype)
    bias = 300 * torch.randn(2 * d)[::2]  # strided float32 buffers
    scale = (0.5 + torch.rand(d)).to(torch.bfloat16)
    for std in ((None, None), (bias, scale)):
        ref, ref_mask = reference.avg_pool_scale_standardize(x, pos, length, 5.0, *std)
        for xv, pv in ((x, pos), (noncontiguous(x, dim=-2), noncontiguous(pos, dim=-1))):
            out, mask = emu("avg_pool_scale_standardize", xv, pv, length, 5.0, *std)
            torch.testing.assert_close(out, ref, **tol(dtype))
            exact(mask, ref_mask)
        x_ref = x.detach().clone().requires_grad_()
        ref_out, _ = reference.avg_pool_scale_standardize(x_ref, pos, length, 5.0, *std)
        grad = randn(*ref_out.shape, dtype=dtype)
        ref_out.backward(grad)
        for g in (grad, noncontiguous(grad, dim=-1)):
            got = emu("_avg_pool_scale_standardize_backward", g, pos, length, x.shape[1], 5.0, std[1])
            torch.testing.assert_close(got, x_ref.grad, **tol(dtype))


def test_avg_pool_scale_standardize_skips_bad_positions():
    pos = _grid_batch(2, 4, [(4, 4)])
    bad = pos.clone()
    bad[0, 3] = torch.tensor([-5, 0])
    x = randn(1, 16, 8)
    out, mask = emu("avg_pool_scale_standardize", x, bad, 4, 2.0, None, None)
    x_clean = x.clone()
    x_clean[0, 3] = 0
    ref, ref_mask = reference.avg_pool_scale_standardize(x_clean, pos, 4, 2.0)
    torch.testing.assert_close(out, ref)
    exact(mask, ref_mask)
    grad_x = emu("_avg_pool_scale_standardize_backward", randn(1, 4, 8), bad, 4, 16, 2.0, None)
    assert (grad_x[0, 3] == 0).all()


@pytest.mark.parametrize("op", ["avg_pool_scale_standardize", "avg_pool_by_positions"])
@pytest.mark.parametrize("case", list(HUGE_POSITIONS))
def test_pooling_skips_int64_wrapping_coordinates(op, case):
    """The CUDA kernels skip patches whose slot would overflow int64; the rest pool as without them."""
    coords, length, bad = HUGE_POSITIONS[case]
    pos = torch.tensor([coords], dtype=torch.int64)
    x = randn(1, len(coords), 8)
    good = pos.clone()
    good[0, bad] = -1
    x_ref = x.clone().requires_grad_(True)
    grad = randn(1, length, 8)
    if op == "avg_pool_scale_standardize":
        out, mask = emu(op, x, pos, length, 2.0, None, None)
        grad_x = emu("_avg_pool_scale_standardize_backward", grad, pos, length, len(coords), 2.0, None)
        ref, ref_mask = reference.avg_pool_scale_standardize(x_ref, good, length, 2.0)
    else:
        out, mask = emu(op, x, pos, length)
        grad_x = emu("_avg_pool_by_positions_backward", grad, pos, length, len(coords))
        ref, ref_mask = reference.avg_pool_by_positions(x_ref, good, length)
    torch.testing.assert_close(out, ref.detach())
    exact(mask, ref_mask)
    ref.backward(grad)
    torch.testing.assert_close(grad_x, x_ref.grad)
    assert (grad_x[0, bad] == 0).all()


# ---------------------------------------------------------------------------------------------
# qkv_norm_rope: fused strided q/k/v views (vector loads) and contiguous/offset inputs (scalar),
# GQA, tiny head dims, several tiles; backward with the two-kernel weight-gradient reduction.
# ---------------------------------------------------------------------------------------------
def _fused_qkv(b, length, h, kv, hd, dtype):
    buf = (3 * torch.randn(b, length, (h + 2 * kv) * hd)).to(dtype)
    q = buf[..., : h * hd].unflatten(-1, (h, hd))
    k = buf[..., h * hd : (h + kv) * hd].unflatten(-1, (kv, hd))
    v = buf[..., (h + kv) * hd :].unflatten(-1, (kv, hd))
    return q, k, v


def _qkv_positions(b, length, dtype=torch.int64, ndim=2):
    pos = torch.randint(0, 40, (b, length, ndim))
    if b and length > 2:
        pos[-1, -2:] = -1
    return pos.to(dtype)


# (B, L, H, KV, hd)
QKV_SHAPES = [
    (2, 7, 4, 2, 72),  # Gemma 4 head dim, GQA, 7 tiles
    (2, 9, 2, 1, 8),  # 16-bit: one 16-byte vector per row
    (2, 4, 2, 2, 6),  # chunks 2 + 4, no vector path
    (2, 0, 2, 1, 8),  # empty sequence
]


def _qkv_reference_grads(q, k, v, qw, kw, pos, grads_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, qw, kw)]
    ref = reference.qkv_norm_rope(*leaves, pos)
    torch.autograd.backward(ref, [g.double() for g in grads_out])
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
def test_qkv_norm_rope(dtype, shape):
    b, length, h, kv, hd = shape
    q, k, v = _fused_qkv(*shape, dtype)
    qw, kw = (1 + 0.5 * torch.randn(hd)), (1 + 0.5 * torch.randn(hd)).to(torch.bfloat16)
    pos = _qkv_positions(b, length)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, pos)
    variants = [(q, k, v), tuple(offset_by_one(t) for t in (q, k, v)), tuple(t.contiguous() for t in (q, k, v))]
    for qv, kv_, vv in variants:
        outs = emu("qkv_norm_rope", qv, kv_, vv, qw, kw, pos, 1e-6, 100.0)
        for o, r in zip(outs, ref):  # the op returns [B, L, N, hd]; the wrapper transposes
            assert o.transpose(1, 2).shape == r.shape
            torch.testing.assert_close(o.transpose(1, 2), r, **tol(dtype))
    grads_out = [randn(*r.shape, dtype=dtype) for r in ref]
    want = _qkv_reference_grads(q, k, v, qw, kw, pos, grads_out)
    # gradients in the outputs' [B, L, N, hd] layout: contiguous, offset, and transposed views of
    # [B, N, L, hd] tensors (what autograd passes when attention's backward returns that layout)
    grads_rows = [g.transpose(1, 2).contiguous() for g in grads_out]
    grad_variants = (grads_rows, [offset_by_one(g) for g in grads_rows], [g.transpose(1, 2) for g in grads_out])
    for gq, gk, gv in grad_variants:
        got = emu("_qkv_norm_rope_backward", gq, gk, gv, q, k, v, qw, kw, pos, 1e-6, 100.0)
        assert got[3].dtype == torch.float32 and got[4].dtype == torch.bfloat16
        for g, w in zip(got, want):
            scale = w.abs().max().item() + 1e-6 if w.numel() else 1.0
            if dtype == torch.float32 and g.dtype == torch.float32:
                torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * scale)
            else:  # bf16/fp16 inputs or a bf16 weight: roundings to the dtype
                torch.testing.assert_close(g.double(), w.to(g.dtype).double(), rtol=4e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.float32])
def test_qkv_norm_rope_position_dtypes_and_three_axes(pos_dtype):
    q, k, v = randn(2, 5, 3, 12), randn(2, 5, 1, 12), randn(2, 5, 1, 12)
    qw, kw = 1 + 0.5 * torch.randn(12), 1 + 0.5 * torch.randn(12)
    pos = _qkv_positions(2, 5, pos_dtype, ndim=3)
    outs = emu("qkv_norm_rope", q, k, v, qw, kw, pos, 1e-5, 50.0)
    for o, r in zip(outs, reference.qkv_norm_rope(q, k, v, qw, kw, pos, eps=1e-5, base_frequency=50.0)):
        torch.testing.assert_close(o.transpose(1, 2), r, **tol(torch.float32))


# (norm, v_norm, pairing, with a frequency table, position axes): the other families' options
QKV_OPTIONS = [
    ("scale_plus_one", False, "half_split", False, 1),  # Gemma 3 text
    ("none", False, "interleaved", False, 2),  # Llama 4 vision
    ("rms", True, "interleaved", True, 1),
    ("scale", False, "interleaved", True, 3),
    ("none", True, "half_split", True, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", QKV_OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 72), (2, 9, 2, 1, 8), (1, 3, 2, 2, 6)])
def test_qkv_norm_rope_options(dtype, options, shape):
    norm, v_norm, pairing, with_table, ndim = options
    b, length, h, kv, hd = shape
    if 2 * (hd // 2 // ndim) == 0:
        pytest.skip("no channels per axis")
    q, k, v = _fused_qkv(*shape, dtype)
    weights = (1 + 0.5 * torch.randn(hd), (1 + 0.5 * torch.randn(hd)).to(torch.bfloat16))
    if norm in ("rms", "none"):
        weights = (None, None)
    freqs = torch.rand(hd // 2) + 0.01 if with_table else None
    pos = _qkv_positions(b, length, ndim=ndim)
    opts = dict(eps=1e-6, base_frequency=100.0, rope_dtype=None, norm=norm, v_norm=v_norm, pairing=pairing,
                rope_freqs=freqs)
    _check_emulated_qkv(q, k, v, weights, pos, opts, dtype)


def _check_emulated_qkv(q, k, v, weights, pos, opts, dtype):
    """The emulated kernels on these options: the forward against the reference (also from views
    that start one element later, off the 16-byte paths), the backward against the CPU kernel."""
    ref = reference.qkv_norm_rope(q, k, v, *weights, pos, **opts)
    args = (*weights, pos, *opts.values())
    for qv, kv_, vv in [(q, k, v), tuple(offset_by_one(t) for t in (q, k, v))]:
        outs = emu("qkv_norm_rope", qv, kv_, vv, *args)
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o.transpose(1, 2), r, **tol(dtype))
    grads = [randn(*r.transpose(1, 2).shape, dtype=dtype) for r in ref]
    got = emu("_qkv_norm_rope_backward", *grads, q, k, v, *args)
    cpu = torch.ops.vitops._qkv_norm_rope_backward(*grads, q, k, v, *args)
    for g, c in zip(got, cpu):
        assert g.shape == c.shape and g.dtype == c.dtype
        scale = c.abs().max().item() + 1e-6 if c.numel() else 1.0
        torch.testing.assert_close(g, c, rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [o for o in QKV_OPTIONS if not o[1]], ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 88), (2, 9, 2, 1, 8), (1, 0, 2, 2, 8)])
def test_qkv_norm_rope_without_v(dtype, options, shape):
    """v=None: the kernels see a v with no heads; q/k outputs and gradients equal the call with v."""
    norm, v_norm, pairing, with_table, ndim = options
    b, length, h, kv, hd = shape
    q, k, v = _fused_qkv(*shape, dtype)
    weights = (1 + 0.5 * torch.randn(hd), 1 + 0.5 * torch.randn(hd)) if norm in ("scale", "scale_plus_one") else (None, None)
    args = (*weights, _qkv_positions(b, length, ndim=ndim), 1e-6, 100.0, None, norm, False, pairing,
            torch.rand(hd // 2) + 0.01 if with_table else None)
    with_v = emu("qkv_norm_rope", q, k, v, *args)
    without = emu("qkv_norm_rope", q, k, None, *args)
    assert without[2].shape == (b, length, 0, hd)
    for o, w in zip(without[:2], with_v[:2]):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
    grads = [randn(*o.shape, dtype=dtype) for o in with_v]
    got = emu("_qkv_norm_rope_backward", grads[0], grads[1], None, q, k, None, *args)
    want = emu("_qkv_norm_rope_backward", *grads, q, k, v, *args)
    assert got[2].shape == (b, length, 0, hd)
    for i in (0, 1):
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0)
    # weight gradients: the warps' (row, head) items shift without v's heads, and with them the
    # order of the per-warp partial sums
    for i in (3, 4):
        torch.testing.assert_close(got[i], want[i], **tol(dtype))


def test_qkv_norm_rope_backward_many_tiles_per_block():
    """More than 1024 tiles: backward blocks loop over several tiles and the weight-gradient
    reduction sums 1024 block partials."""
    b, length, h, kv, hd = 1, 2200, 1, 1, 4
    q, k, v = _fused_qkv(b, length, h, kv, hd, torch.float32)
    qw, kw = 1 + 0.5 * torch.randn(hd), 1 + 0.5 * torch.randn(hd)
    pos = _qkv_positions(b, length)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, pos)
    grads_out = [randn(*r.shape) for r in ref]
    got = emu("_qkv_norm_rope_backward", *(g.transpose(1, 2) for g in grads_out), q, k, v, qw, kw, pos, 1e-6, 100.0)
    want = _qkv_reference_grads(q, k, v, qw, kw, pos, grads_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * (w.abs().max().item() + 1e-6))


# ---------------------------------------------------------------------------------------------
# Positions the CPU kernels reject (non-finite angles): the CUDA kernels cannot raise without a host
# sync, so they must give NaN rows for exactly those rows, never a bad access or other wrong rows.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rope_non_finite_positions_give_nan_rows(bad):
    x = randn(4, 2, 8)
    pos = torch.tensor([1.0, bad, 2.0, -3.0])
    out = emu("apply_multidimensional_rope", x, pos, 100.0, None, 1.0)
    assert torch.isnan(out[1]).all()
    good = [0, 2, 3]
    ref = reference.apply_multidimensional_rope(x[good], pos[good], base_frequency=100.0)
    torch.testing.assert_close(out[good], ref, **tol(torch.float32))


def test_rope_int64_limit_positions_match_reference():
    x = randn(5, 1, 8)
    pos = torch.tensor([-(2**63), 2**63 - 1, 0, -4, 2**40])
    torch.testing.assert_close(emu("apply_multidimensional_rope", x, pos, 100.0, None, 1.0),
                               reference.apply_multidimensional_rope(x, pos, base_frequency=100.0), **tol(torch.float32))


def test_qkv_norm_rope_non_finite_positions_give_nan_rows():
    q, k, v = randn(1, 3, 2, 16), randn(1, 3, 1, 16), randn(1, 3, 1, 16)
    w = torch.ones(16)
    pos = torch.tensor([[[0.0, 1.0], [float("inf"), 2.0], [3.0, 4.0]]])
    qo, ko, vo = emu("qkv_norm_rope", q, k, v, w, w, pos, 1e-6, 100.0, None)
    assert torch.isnan(qo[:, 1]).any() and torch.isnan(ko[:, 1]).any()
    assert torch.isfinite(vo).all()  # v is only normalised
    ref = reference.qkv_norm_rope(q[:, [0, 2]], k[:, [0, 2]], v[:, [0, 2]], w, w, pos[:, [0, 2]])
    torch.testing.assert_close(qo[:, [0, 2]], ref[0].transpose(1, 2), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# avg_pool_rms_norm: one block per output token; the kernels against the CPU kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(2, 64, 16, 48, "scale_plus_one"), (1, 36, 9, 300, "rms"), (2, 16, 1, 8, "none"),
                                  (0, 16, 4, 8, "scale"), (3, 16, 16, 5, "scale"), (1, 4096, 256, 40, "scale_plus_one")])
def test_avg_pool_rms_norm(dtype, case):
    b, seq, length, d, norm = case
    x = (2 * torch.randn(b, seq, d + 3))[..., :d].to(dtype)  # rows with a stride of d + 3
    w = 0.5 * torch.randn(d) if norm in ("scale", "scale_plus_one") else None
    cpu = torch.ops.vitops.avg_pool_rms_norm(x, length, w, 1e-6, norm)
    got = emu("avg_pool_rms_norm", x, length, w, 1e-6, norm)
    torch.testing.assert_close(got, cpu, **tol(dtype))
    g = randn(b, length, d, dtype=dtype)
    cpu_b = torch.ops.vitops._avg_pool_rms_norm_backward(g, x, length, w, 1e-6, norm)
    got_b = emu("_avg_pool_rms_norm_backward", g, x, length, w, 1e-6, norm)
    for a, c in zip(got_b, cpu_b):
        assert a.shape == c.shape and a.dtype == c.dtype
        scale = c.abs().max().item() + 1e-6 if c.numel() else 1.0
        torch.testing.assert_close(a.float(), c.float(), rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", QKV_OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 72), (2, 9, 2, 1, 8), (3, 5, 2, 2, 6)])
def test_qkv_norm_rope_given_cos_sin(dtype, options, shape):
    """Precomputed cos/sin (rope_cos, rope_sin) read by the emulated kernel: a batch-1 table in
    pair-major storage and a bf16 table (rounded to rope_dtype = float32 unchanged); forward against
    the reference, backward against the CPU kernel."""
    norm, v_norm, pairing, _, ndim = options
    b, length, h, kv, hd = shape
    if 2 * (hd // 2 // ndim) == 0:
        pytest.skip("no channels per axis")
    q, k, v = _fused_qkv(*shape, dtype)
    weights = (1 + 0.5 * torch.randn(hd), 1 + 0.5 * torch.randn(hd)) if norm in ("scale", "scale_plus_one") else (None, None)
    pos = _qkv_positions(b, length, ndim=ndim)
    for cos, sin in [(torch.rand(1, hd // 2, length).transpose(1, 2) * 2 - 1, torch.rand(1, length, hd // 2) * 2 - 1),
                     ((torch.rand(b, length, hd // 2) * 2 - 1).bfloat16(), (torch.rand(b, length, hd // 2) * 2 - 1).bfloat16())]:
        opts = dict(eps=1e-6, base_frequency=100.0, rope_dtype=torch.float32, norm=norm, v_norm=v_norm,
                    pairing=pairing, rope_freqs=None, rope_cos=cos, rope_sin=sin)
        ref = reference.qkv_norm_rope(q, k, v, *weights, pos, **opts)
        args = (*weights, pos, *opts.values())
        outs = emu("qkv_norm_rope", q, k, v, *args)
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o.transpose(1, 2), r, **tol(dtype))
        grads = [randn(*r.transpose(1, 2).shape, dtype=dtype) for r in ref]
        got = emu("_qkv_norm_rope_backward", *grads, q, k, v, *args)
        cpu = torch.ops.vitops._qkv_norm_rope_backward(*grads, q, k, v, *args)
        for g, c in zip(got, cpu):
            scale = c.abs().max().item() + 1e-6 if c.numel() else 1.0
            torch.testing.assert_close(g, c, rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * scale)


# Llama 4's orders: (norm, pairing, norm_after_rope, q_scale rows (0 = none), ndim)
QKV_LLAMA4_ORDERS = [
    ("rms", "interleaved", True, 0, 1),  # Llama 4 Scout RoPE layers
    ("none", "none", False, 1, 1),  # Llama 4 NoPE layers with the attention temperature
    ("scale", "half_split", True, 2, 2),
    ("scale_plus_one", "none", True, 2, 1),
    ("rms", "interleaved", False, 1, 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", QKV_LLAMA4_ORDERS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 72), (2, 9, 2, 1, 8), (1, 3, 2, 2, 6), (2, 5, 2, 1, 512)])
def test_qkv_norm_rope_llama4_orders(dtype, options, shape):
    """The norm after the rotation (staged in registers, up to the 512-wide head dim), no rotation,
    q_scale of batch 1 or B: forward against the reference (also from unaligned views), backward
    against the CPU kernel."""
    norm, pairing, after, scale_rows, ndim = options
    b, length, h, kv, hd = shape
    if pairing != "none" and 2 * (hd // 2 // ndim) == 0:
        pytest.skip("no channels per axis")
    q, k, v = _fused_qkv(*shape, dtype)
    weights = (1 + 0.5 * torch.randn(hd), (1 + 0.5 * torch.randn(hd)).to(torch.bfloat16))
    if norm in ("rms", "none"):
        weights = (None, None)
    scale = (0.5 + torch.rand(b if scale_rows == 2 else 1, length)).to(dtype) if scale_rows else None
    pos = _qkv_positions(b, length, ndim=ndim)
    opts = dict(eps=1e-6, base_frequency=100.0, rope_dtype=None, norm=norm, v_norm=True, pairing=pairing,
                rope_freqs=None, rope_cos=None, rope_sin=None, norm_after_rope=after, q_scale=scale)
    _check_emulated_qkv(q, k, v, weights, pos, opts, dtype)


# ---------------------------------------------------------------------------------------------
# merge_soft_tokens: the inverse map (atomicMax) and the row copies in 16-, 8-, 4- and 2-byte words
# ---------------------------------------------------------------------------------------------
def _merge_indices(rows, n, index_dtype, seed):
    """n indices over `rows` rows: distinct rows, rows written twice or three times, rows past the end
    and negative entries (INT32_MIN, INT64_MIN, -1), in random order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(rows, 1), (n,), generator=g)  # duplicates among them
    low = -(2**63) if index_dtype == torch.int64 else -(2**31)
    special = [rows, rows + 7, 2**31 - 1, -1, -(2**31), low]
    for k, value in enumerate(special[: n // 3]):
        idx[torch.randint(0, n, (1,), generator=g)] = value
    return idx.to(index_dtype)


# (leading dims, hidden): widths whose rows take 16-byte words (48 float32 / bfloat16), 8 (6 float32),
# 4 (5 float32, 6 bfloat16) and 2 (5 bfloat16 / float16); leading [T] and [B, S]; more rows than
# one block's 8 warps
MERGE_SHAPES = [((2, 9), 48), ((37,), 6), ((3, 5), 5), ((1, 1), 1), ((70,), 3), ((4, 0), 8), ((0,), 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("lead,h", MERGE_SHAPES)
def test_merge_soft_tokens(dtype, index_dtype, lead, h):
    """Against the reference (indices past the rows skipped, the largest position winning a row
    written twice), forward and backward, bitwise under both schedules; contiguous, offset by one
    element (narrower words) and strided inputs."""
    rows = 1
    for d in lead:
        rows *= d
    n = 3 * rows // 2 + 4
    x = randn(*lead, h, dtype=dtype)
    soft = randn(n, h, dtype=dtype)
    idx = _merge_indices(rows, n, index_dtype, seed=rows + h)
    grad = randn(*lead, h, dtype=dtype)
    want = reference.merge_soft_tokens(x, soft, idx)
    leaves = [x.clone().requires_grad_(), soft.clone().requires_grad_()]
    want_grads = torch.autograd.grad(reference.merge_soft_tokens(*leaves, idx), leaves, grad)
    variants = [(x, soft, idx, grad), (offset_by_one(x), offset_by_one(soft), idx, offset_by_one(grad))]
    if soft.shape[0] > 1:
        variants.append((x, noncontiguous(soft, 0), noncontiguous(idx, 0), grad))
    for xv, sv, iv, gv in variants:
        exact(emu("merge_soft_tokens", xv, sv, iv), want)
        gx, gs = emu("_merge_soft_tokens_backward", gv, iv)
        exact(gx, want_grads[0])
        exact(gs, want_grads[1])


def test_merge_soft_tokens_resolves_duplicates_to_the_largest_position():
    x, soft = randn(2, 4, 16), randn(7, 16)
    idx = torch.tensor([5, 1, 5, 8, -(2**31), 5, 1])  # row 5 thrice, row 1 twice, 8 past the 8 rows
    out = emu("merge_soft_tokens", x, soft, idx).view(-1, 16)
    exact(out[5], soft[5])
    exact(out[1], soft[6])
    untouched = [r for r in range(8) if r not in (1, 5)]
    exact(out[untouched], x.view(-1, 16)[untouched])
    grad = randn(2, 4, 16)
    gx, gs = emu("_merge_soft_tokens_backward", grad, idx)
    exact(gs[[5, 6]], grad.view(-1, 16)[[5, 1]])
    assert not gs[[0, 1, 2, 3, 4]].any()  # the losers, the row past the end, the skipped entry
    assert not gx.view(-1, 16)[[1, 5]].any()
    exact(gx.view(-1, 16)[untouched], grad.view(-1, 16)[untouched])


def test_merge_soft_tokens_float64_is_cpu_only():
    with pytest.raises(RuntimeError, match=r"`inputs_embeds` must be float32, bfloat16, float16 \(float64 is CPU only\)"):
        emu_ops.merge_soft_tokens(torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64),
                                  torch.tensor([0]))

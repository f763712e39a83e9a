import pytest
import torch

import vitops
from vitops import reference

from _utils import DEVICES, device_dtypes, noncontiguous, randn, tol

_op = torch.ops.vitops.factorized_posemb.default
_backward_op = torch.ops.vitops._factorized_posemb_backward.default

LAYOUTS = ["hf", "maxtext"]
INDEX_DTYPES = [torch.int64, torch.int32]


def make_table(n_pos, d, *, dtype=torch.float32, device="cpu", layout="hf", requires_grad=False):
    """Random table; the MaxText layout is a transposed (non-contiguous) view of an HF table.
    Returns (table, table_dim)."""
    hf = randn(2, n_pos, d, dtype=dtype, device=device)
    table = hf if layout == "hf" else hf.transpose(0, 1)
    return table.requires_grad_(requires_grad), (0 if layout == "hf" else 1)


def make_positions(lead, n_pos, *, dtype=torch.int64, device="cpu", padding=True):
    """Random (x, y) in [0, n_pos), with padded patches (-1, -1) and single -1 coordinates."""
    pos = torch.randint(0, n_pos, (*lead, 2), dtype=dtype, device=device)
    if padding and pos.numel() > 0:
        flat = pos.view(-1, 2)
        n = flat.shape[0]
        flat[torch.rand(n, device=device) < 0.2] = -1  # padded patch
        flat[torch.rand(n, device=device) < 0.1, 0] = -1  # only x missing
        flat[torch.rand(n, device=device) < 0.1, 1] = -1  # only y missing
    return pos


def reference_grad(table, table_dim, pos, grad_out):
    ref_table = table.detach().clone().requires_grad_()
    reference.factorized_posemb(ref_table, pos, table_dim).backward(grad_out)
    return ref_table.grad


# (leading dims of positions, N_pos, D)
SHAPES = [
    ((2, 37), 11, 24),  # batch of patch lists
    ((45,), 7, 7),  # odd D, no batch dim
    ((5,), 1, 1),  # N_pos = 1, D = 1
    ((2, 3, 5), 9, 16),  # two leading dims
    ((0,), 5, 8),  # no patches
    ((2, 0), 4, 8),  # empty batch rows
    ((300,), 13, 128),  # enough work for the vectorized CUDA path and several CPU threads
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("lead,n_pos,d", SHAPES)
def test_forward_backward_match_reference(device, dtype, layout, index_dtype, lead, n_pos, d):
    table, table_dim = make_table(n_pos, d, dtype=dtype, device=device, layout=layout, requires_grad=True)
    pos = make_positions(lead, n_pos, dtype=index_dtype, device=device)
    out = vitops.factorized_posemb(table, pos, layout=layout)
    ref = reference.factorized_posemb(table.detach(), pos, table_dim)
    assert out.shape == (*lead, d) and out.dtype == dtype and out.is_contiguous()
    # Both sum the two rows in float32 (float64) and round once: identical bits.
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    grad_out = randn(*out.shape, dtype=dtype, device=device)
    out.backward(grad_out)
    expected = reference_grad(table, table_dim, pos, grad_out)
    assert table.grad.shape == table.shape and table.grad.dtype == dtype
    torch.testing.assert_close(table.grad, expected, **tol(dtype))


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_inputs(device, dtype, layout):
    n_pos, d = 10, 32
    pos = make_positions((3, 20), n_pos, device=device)
    strided_pos = [
        noncontiguous(pos, dim=-2),
        pos.transpose(0, 1).contiguous().transpose(0, 1),  # leading dims swapped in memory
        pos.transpose(-1, -2).contiguous().transpose(-1, -2),  # x and y stored as separate planes
    ]
    base, table_dim = make_table(n_pos, d, dtype=dtype, device=device, layout=layout)
    hf = base if table_dim == 0 else base.transpose(0, 1)
    tables = [
        base,
        noncontiguous(hf, dim=1) if table_dim == 0 else noncontiguous(hf, dim=1).transpose(0, 1),  # strided N_pos
        noncontiguous(base, dim=-1),  # strided D: the one case that copies
        torch.cat([torch.zeros_like(base[..., :1]), base], dim=-1)[..., 1:],  # storage offset, misaligned rows
    ]
    for table in tables:
        for p in strided_pos:
            table = table.detach().requires_grad_()
            out = vitops.factorized_posemb(table, p, layout=layout)
            torch.testing.assert_close(out, reference.factorized_posemb(table.detach(), p, table_dim), rtol=0, atol=0)
            grad_out = noncontiguous(randn(*out.shape, dtype=dtype, device=device), dim=-1)
            out.backward(grad_out)
            torch.testing.assert_close(table.grad, reference_grad(table, table_dim, p, grad_out), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_padding_semantics(device):
    """-1 removes its own coordinate's row (per coordinate, not per patch); rows never hit get zero grad."""
    table, _ = make_table(4, 6, device=device, requires_grad=True)
    pos = torch.tensor([[1, 2], [-1, 3], [0, -1], [-1, -1]], device=device)
    out = vitops.factorized_posemb(table, pos)
    t = table.detach()
    expected = torch.stack([t[0, 1] + t[1, 2], t[1, 3], t[0, 0], torch.zeros(6, device=device)])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    hits = torch.zeros(2, 4, device=device)
    hits[0, 1] = hits[1, 2] = hits[1, 3] = hits[0, 0] = 1
    torch.testing.assert_close(table.grad, hits.unsqueeze(-1).expand(2, 4, 6))


def test_gradcheck_float64():
    for layout in LAYOUTS:
        table, _ = make_table(5, 3, dtype=torch.float64, layout=layout, requires_grad=True)
        pos = make_positions((2, 7), 5)
        assert torch.autograd.gradcheck(lambda t: vitops.factorized_posemb(t, pos, layout=layout), (table,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, layout):
    pos = make_positions((2, 9), 6, device=device)
    for requires_grad in (False, True):
        table, table_dim = make_table(6, 8, device=device, layout=layout, requires_grad=requires_grad)
        torch.library.opcheck(_op, (table, pos, table_dim))
        torch.library.opcheck(_op, (table, pos.int(), table_dim))
    grad = randn(2, 9, 8, device=device)
    torch.library.opcheck(_backward_op, (grad, pos, 6, table_dim))
    torch.library.opcheck(_backward_op, (grad, pos.int(), 6, table_dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    def f(table, pos):
        return vitops.factorized_posemb(table, pos) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for lead, n_pos, d in [((2, 12), 8, 16), ((3, 20), 10, 24)]:
        table, table_dim = make_table(n_pos, d, device=device, requires_grad=True)
        pos = make_positions(lead, n_pos, device=device)
        out = compiled(table, pos)
        torch.testing.assert_close(out, reference.factorized_posemb(table.detach(), pos, table_dim) * 2)
        grad_out = randn(*out.shape, device=device)
        out.backward(grad_out)
        torch.testing.assert_close(table.grad, reference_grad(table, table_dim, pos, grad_out * 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(device, dtype):
    """Thousands of patches hitting few rows: any accumulation-order change would flip low bits."""
    n_pos, d = 3, 64
    pos = make_positions((4, 2000), n_pos, device=device)
    grad = randn(4, 2000, d, dtype=dtype, device=device) * 1000
    first = _backward_op(grad, pos, n_pos, 0)
    for _ in range(3):
        assert torch.equal(_backward_op(grad, pos, n_pos, 0), first)
    if device == "cpu":  # the result must not depend on how rows are split across threads
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(_backward_op(grad, pos, n_pos, 0), first)
        finally:
            torch.set_num_threads(threads)
    # Increasing-patch-order float32 accumulation, spelled out for one row and a few columns.
    sel = pos[..., 0].reshape(-1) == 1
    rows = grad.reshape(-1, d)[sel][:, :4].float()
    acc = torch.zeros(4)
    for r in rows.cpu():
        acc = acc + r
    assert torch.equal(first[0, 1, :4].float().cpu(), acc.to(dtype).float())
    # The MaxText layout holds the same numbers.
    assert torch.equal(_backward_op(grad, pos, n_pos, 1), first.transpose(0, 1))


@pytest.mark.parametrize(
    "posemb,positions,table_dim,match",
    [
        (torch.randn(2, 5), torch.zeros(3, 2, dtype=torch.long), 0, r"must be \[2, N_pos, D\]"),
        (torch.randn(2, 5, 4, 1), torch.zeros(3, 2, dtype=torch.long), 0, r"must be \[2, N_pos, D\]"),
        (torch.ones(2, 5, 4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 0, "`posemb` must be float32"),
        (torch.randn(2, 5, 4), torch.zeros(3, 2), 0, "`positions_xy` must be an int64 or int32"),
        (torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.long), 2, "`table_dim` must be 0"),
        (torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.long), -1, "`table_dim` must be 0"),
        (torch.randn(3, 5, 4), torch.zeros(3, 2, dtype=torch.long), 0, "must have size 2"),
        (torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.long), 1, "must have size 2"),
        (torch.randn(2, 5, 4), torch.zeros(3, 3, dtype=torch.long), 0, r"must have shape \[\.\.\., 2\]"),
        (torch.randn(2, 5, 4), torch.zeros((), dtype=torch.long), 0, r"must have shape \[\.\.\., 2\]"),
        (torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.long, device="meta"), 0, "same device"),
        (torch.randn(2, 5, 4), torch.tensor([[0, 0], [5, 1]]), 0, r"x coordinate 5 \(patch 1\).*N_pos = 5"),
        (torch.randn(2, 5, 4), torch.tensor([[0, -2]], dtype=torch.int32), 0, r"y coordinate -2.*N_pos = 5"),
        (torch.randn(5, 2, 4), torch.tensor([[0, 9]]), 1, r"`positions_xy` has y coordinate 9.*N_pos = 5"),
    ],
)
def test_bad_input(posemb, positions, table_dim, match):
    with pytest.raises(RuntimeError, match=match):
        _op(posemb, positions, table_dim)


@pytest.mark.parametrize(
    "grad,positions,num_positions,table_dim,match",
    [
        (torch.randn(3, 4), torch.tensor([[0, 0], [1, 1], [2, 7]]), 5, 0, r"y coordinate 7 \(patch 2\).*N_pos = 5"),
        (torch.randn(3, 4), torch.zeros(4, 2, dtype=torch.long), 5, 0, "`grad_output` must be"),
        (torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long), 5, 3, "`table_dim` must be 0"),
        (torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long), -1, 0, "`num_positions` must be >= 0"),
        (torch.ones(3, 4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 5, 0, "`grad_output` must be float"),
        (torch.randn(3, 4), torch.zeros(3, 2), 5, 0, "`positions_xy` must be an int64 or int32"),
    ],
)
def test_bad_backward_input(grad, positions, num_positions, table_dim, match):
    with pytest.raises(RuntimeError, match=match):
        _backward_op(grad, positions, num_positions, table_dim)


def test_wrapper_layout_errors():
    with pytest.raises(ValueError, match="ambiguous"):
        vitops.factorized_posemb(torch.randn(2, 2, 4), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="`layout` must be"):
        vitops.factorized_posemb(torch.randn(2, 5, 4), torch.zeros(3, 2, dtype=torch.long), layout="jax")
    table = torch.randn(2, 2, 4)
    pos = torch.tensor([[0, 1], [1, 0]])
    torch.testing.assert_close(vitops.factorized_posemb(table, pos, layout="maxtext"),
                               reference.factorized_posemb(table, pos, 1), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_out_of_range_is_nan_and_skipped_in_backward():
    """CUDA cannot raise without a host sync: invalid coordinates poison their row with NaN."""
    table, _ = make_table(5, 16, device="cuda", requires_grad=True)
    pos = torch.tensor([[0, 1], [5, 0], [2, -7], [-1, 4], [1000000, -1]], device="cuda")
    out = vitops.factorized_posemb(table, pos)
    bad = torch.tensor([False, True, True, False, True], device="cuda")
    assert out[bad].isnan().all()
    clean = torch.where(bad.unsqueeze(-1), torch.full_like(pos, -1), pos)
    torch.testing.assert_close(out[~bad], reference.factorized_posemb(table.detach(), clean)[~bad], rtol=0, atol=0)
    grad_out = randn(5, 16, device="cuda")
    grad = _backward_op(grad_out, pos, 5, 0)
    valid = (pos >= 0) & (pos < 5)
    torch.testing.assert_close(grad, _backward_op(grad_out, torch.where(valid, pos, -1), 5, 0), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_matches_cpu_bitwise():
    table, _ = make_table(24, 64)
    pos = make_positions((3, 500), 24)
    grad = randn(3, 500, 64)
    torch.testing.assert_close(vitops.factorized_posemb(table.cuda(), pos.cuda()).cpu(),
                               vitops.factorized_posemb(table, pos), rtol=0, atol=0)
    torch.testing.assert_close(_backward_op(grad.cuda(), pos.cuda(), 24, 0).cpu(), _backward_op(grad, pos, 24, 0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_patch_embedder(device, dtype):
    """Same embeddings (and table gradient) as HF Gemma4VisionPatchEmbedder._position_embeddings."""
    cfg_mod = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    model_mod = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config = cfg_mod.Gemma4VisionConfig(hidden_size=48, position_embedding_size=20, patch_size=4)
    embedder = model_mod.Gemma4VisionPatchEmbedder(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        embedder.position_embedding_table.copy_(torch.randn(2, 20, 48))
    # Two images: a 5x4 grid of patches plus padding rows (-1, -1) up to a common length.
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(4), indexing="xy"), -1).reshape(-1, 2)
    pos = torch.full((2, 24, 2), -1, dtype=torch.long)
    pos[0, :20] = grid
    pos[1, :12] = grid[:12] + 3
    pos = pos.to(device)
    padding = (pos == -1).all(-1)

    hf_out = embedder._position_embeddings(pos, padding)
    out = vitops.factorized_posemb(embedder.position_embedding_table, pos)
    # HF adds the two rows in the table dtype; for a two-term sum that is one rounding, as in vitops.
    torch.testing.assert_close(out, hf_out, rtol=0, atol=0)

    grad_out = randn(*out.shape, dtype=dtype, device=device)
    (grad,) = torch.autograd.grad(out, embedder.position_embedding_table, grad_out)
    # HF's embedding backward accumulates in the table dtype; vitops accumulates in float32, so the
    # bf16 gradient is compared with HF run in float32 on the same (bf16-valued) table and gradient.
    embedder_f32 = embedder.float()
    hf_out_f32 = embedder_f32._position_embeddings(pos, padding)
    (hf_grad,) = torch.autograd.grad(hf_out_f32, embedder_f32.position_embedding_table, grad_out.float())
    torch.testing.assert_close(grad, hf_grad.to(dtype), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_table_with_only_padding(device):
    """N_pos = 0 is legal as long as every coordinate is padding: all-zero output, empty gradient."""
    table = randn(2, 0, 4, device=device, requires_grad=True)
    pos = torch.full((3, 2), -1, dtype=torch.long, device=device)
    out = vitops.factorized_posemb(table, pos)
    assert torch.equal(out, torch.zeros(3, 4, device=device))
    out.sum().backward()
    assert table.grad.shape == (2, 0, 4)

import pytest
import torch

from vitops import reference
from vitops.layers import rms_norm
from vitops.ops import apply_multidimensional_rope, qkv_norm_rope

from _utils import DEVICES, device_dtypes, randn, tol

# (B, L, H, KV, hd): Gemma 4 head dims 72 and 64, GQA (H != KV), tiny head dims whose last RoPE
# chunk is wider than the others (hd=6 -> chunks 2 + 4), empty sequence and empty batch.
SHAPES = [
    (2, 7, 4, 2, 72),
    (1, 5, 3, 3, 64),
    (2, 9, 2, 1, 8),
    (2, 4, 2, 2, 6),
    (2, 0, 2, 1, 8),
    (0, 3, 2, 1, 8),
]


def split_qkv(buf, h, kv, hd):
    """q [.., H, hd], k and v [.., KV, hd]: strided views of one fused projection output [..., (H + 2 KV) * hd]."""
    q = buf[..., : h * hd].unflatten(-1, (h, hd))
    k = buf[..., h * hd : (h + kv) * hd].unflatten(-1, (kv, hd))
    v = buf[..., (h + kv) * hd :].unflatten(-1, (kv, hd))
    return q, k, v


def fused_qkv(b, length, h, kv, hd, dtype=torch.float32, device="cpu", requires_grad=False):
    """q, k, v as strided views of one fused projection output [B, L, (H + 2 KV) * hd]."""
    buf = (3 * torch.randn(b, length, (h + 2 * kv) * hd, dtype=torch.float32, device=device)).to(dtype)
    buf.requires_grad_(requires_grad)
    q, k, v = split_qkv(buf, h, kv, hd)
    return buf, q, k, v


def random_positions(b, length, device="cpu", dtype=torch.int64, ndim=2):
    pos = torch.randint(0, 40, (b, length, ndim), device=device)
    if b and length > 2:
        pos[-1, -2:] = -1  # padding rows
    return pos.to(dtype)


def random_weights(hd, device="cpu", dtype=torch.float32):
    return (1 + 0.5 * torch.randn(hd, device=device)).to(dtype), (1 + 0.5 * torch.randn(hd, device=device)).to(dtype)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, shape):
    b, length, h, kv, hd = shape
    _, q, k, v = fused_qkv(*shape, dtype=dtype, device=device)
    assert not q.is_contiguous() or q.numel() == 0
    qw, kw = random_weights(hd, device)
    pos = random_positions(b, length, device)
    out = qkv_norm_rope(q, k, v, qw, kw, pos)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, pos)
    for o, r, heads in zip(out, ref, (h, kv, kv)):
        # attention layout: [B, N, L, hd] over [B, L, N, hd] memory (flash/SDPA's native layout)
        assert o.shape == (b, heads, length, hd) and o.transpose(1, 2).is_contiguous() and o.dtype == dtype
        torch.testing.assert_close(o, r, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64, torch.float32])
def test_position_dtypes_and_weight_dtypes(device, pos_dtype):
    _, q, k, v = fused_qkv(2, 6, 2, 2, 16, device=device)
    pos = random_positions(2, 6, device, pos_dtype)
    qw, kw = random_weights(16, device, torch.bfloat16)
    out = qkv_norm_rope(q, k, v, qw, kw, pos, eps=1e-5, base_frequency=50.0)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, pos, eps=1e-5, base_frequency=50.0)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_inputs_and_three_axes(device):
    q, k, v = randn(2, 5, 3, 12, device=device), randn(2, 5, 1, 12, device=device), randn(2, 5, 1, 12, device=device)
    qw, kw = random_weights(12, device)
    pos = random_positions(2, 5, device, ndim=3)  # chunks 4 + 4 + 4
    for o, r in zip(qkv_norm_rope(q, k, v, qw, kw, pos), reference.qkv_norm_rope(q, k, v, qw, kw, pos)):
        torch.testing.assert_close(o, r, **tol(torch.float32))


def _grads(fn, buf, qw, kw, outs_grad):
    outs = fn()
    torch.autograd.backward(outs, outs_grad)
    return buf.grad, qw.grad, kw.grad


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 72), (2, 5, 2, 1, 64), (1, 3, 2, 2, 6)])
def test_backward_matches_reference_autograd(device, dtype, shape):
    b, length, h, kv, hd = shape
    buf, q, k, v = fused_qkv(*shape, dtype=dtype, device=device, requires_grad=True)
    qw, kw = (w.requires_grad_() for w in random_weights(hd, device))
    pos = random_positions(b, length, device)
    outs = qkv_norm_rope(q, k, v, qw, kw, pos)
    grads_out = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads_out)
    # Reference autograd in float64: the kernel treats the roundings as identity and keeps its
    # gradient math in float32, so it is compared with the exact gradients of the same function.
    buf64 = buf.detach().double().requires_grad_()
    qw64, kw64 = qw.detach().double().requires_grad_(), kw.detach().double().requires_grad_()
    q64 = buf64[..., : h * hd].unflatten(-1, (h, hd))
    k64 = buf64[..., h * hd : (h + kv) * hd].unflatten(-1, (kv, hd))
    v64 = buf64[..., (h + kv) * hd :].unflatten(-1, (kv, hd))
    ref = reference.qkv_norm_rope(q64, k64, v64, qw64, kw64, pos)
    torch.autograd.backward(ref, [g.double() for g in grads_out])
    for got, want in [(buf.grad, buf64.grad), (qw.grad, qw64.grad), (kw.grad, kw64.grad)]:
        assert got.dtype == (dtype if got is buf.grad else torch.float32)
        scale = want.abs().max().item() + 1e-6
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
        else:  # bf16/fp16 inputs: cos/sin and the gradient outputs are rounded to the dtype
            torch.testing.assert_close(got.double(), want, rtol=4e-2, atol=2e-2 * scale)


def test_backward_same_dtype_reference_float32():
    """Against the reference's own float32 autograd (same dtype flow)."""
    buf, q, k, v = fused_qkv(2, 6, 4, 2, 72, requires_grad=True)
    qw, kw = (w.requires_grad_() for w in random_weights(72))
    pos = random_positions(2, 6)
    outs = qkv_norm_rope(q, k, v, qw, kw, pos)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, (buf, qw, kw), grads_out)
    want = torch.autograd.grad(reference.qkv_norm_rope(q, k, v, qw, kw, pos), (buf, qw, kw), grads_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    b, length, h, kv, hd = 2, 3, 2, 1, 8
    buf = torch.randn(b, length, (h + 2 * kv) * hd, dtype=torch.float64, requires_grad=True)
    qw = (1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_()
    kw = (1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_()
    pos = random_positions(b, length)

    def f(buf, qw, kw):
        q, k, v = split_qkv(buf, h, kv, hd)
        return qkv_norm_rope(q, k, v, qw, kw, pos)

    assert torch.autograd.gradcheck(f, (buf, qw, kw))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for requires_grad in (False, True):
        _, q, k, v = fused_qkv(2, 5, 4, 2, 16, device=device)
        q, k, v = (t.detach().requires_grad_(requires_grad) for t in (q, k, v))
        qw, kw = (w.requires_grad_(requires_grad) for w in random_weights(16, device))
        pos = random_positions(2, 5, device)
        torch.library.opcheck(torch.ops.vitops.qkv_norm_rope.default, (q, k, v, qw, kw, pos, 1e-6, 100.0))
    _, q, k, v = fused_qkv(2, 5, 4, 2, 16, device=device)
    qw, kw = random_weights(16, device)
    grads = (randn(2, 5, 4, 16, device=device), randn(2, 5, 2, 16, device=device), randn(2, 5, 2, 16, device=device))
    torch.library.opcheck(
        torch.ops.vitops._qkv_norm_rope_backward.default, (*grads, q, k, v, qw, kw, random_positions(2, 5, device), 1e-6, 100.0)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(device, dynamic):
    h, kv, hd = 4, 2, 16

    def f(buf, qw, kw, pos):
        q, k, v = split_qkv(buf, h, kv, hd)
        qo, ko, vo = qkv_norm_rope(q, k, v, qw, kw, pos)
        return torch.nn.functional.scaled_dot_product_attention(qo, ko, vo, enable_gqa=True, scale=1.0)

    def f_ref(buf, qw, kw, pos):  # the oracle: the reference op in place of vitops
        q, k, v = split_qkv(buf, h, kv, hd)
        qo, ko, vo = reference.qkv_norm_rope(q, k, v, qw, kw, pos)
        return torch.nn.functional.scaled_dot_product_attention(qo, ko, vo, enable_gqa=True, scale=1.0)

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    qw, kw = random_weights(hd, device)
    for b, length in [(2, 6), (3, 9)]:
        buf = randn(b, length, (h + 2 * kv) * hd, device=device)
        pos = random_positions(b, length, device)
        args = [buf.clone().requires_grad_(), qw.clone().requires_grad_(), kw.clone().requires_grad_()]
        ref_args = [t.detach().clone().requires_grad_() for t in args]
        out = compiled(*args, pos)
        ref = f_ref(*ref_args, pos)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward()
        ref.square().sum().backward()
        for a, r in zip(args, ref_args):
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_deterministic(device, dtype):
    buf, q, k, v = fused_qkv(3, 50, 4, 2, 72, dtype=dtype, device=device, requires_grad=True)
    qw, kw = (w.requires_grad_() for w in random_weights(72, device))
    pos = random_positions(3, 50, device)
    grads_out = None
    results = []
    for _ in range(2):
        outs = qkv_norm_rope(q, k, v, qw, kw, pos)
        grads_out = grads_out or [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, (buf, qw, kw), grads_out)
        results.append([o.detach() for o in outs] + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_weight_grads_do_not_depend_on_thread_count():
    buf, q, k, v = fused_qkv(4, 70, 2, 2, 16, requires_grad=True)
    qw, kw = (w.requires_grad_() for w in random_weights(16))
    pos = random_positions(4, 70)
    outs = qkv_norm_rope(q, k, v, qw, kw, pos)
    grads_out = [torch.randn_like(o) for o in outs]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(outs, (qw, kw), grads_out, retain_graph=True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _bad(**overrides):
    _, q, k, v = fused_qkv(2, 3, 2, 1, 8)
    qw, kw = random_weights(8)
    args = dict(q=q, k=k, v=v, q_weight=qw, k_weight=kw, positions=random_positions(2, 3))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(q=torch.randn(2, 3, 16)), r"`q` must have shape \[B, L, H, hd\]"),
        (dict(k=torch.randn(2, 3, 1, 4)), r"`k` shape .* does not match `q`"),
        (dict(v=torch.randn(2, 3, 2, 8)), r"`v` shape .* must equal `k`"),
        (dict(q=torch.randn(2, 3, 2, 16)[..., ::2]), r"`q` must have a contiguous head dim"),
        (dict(q=torch.randn(2, 3, 2, 8, dtype=torch.float64)), r"`q`, `k` and `v` must have the same dtype"),
        (dict(q=torch.ones(2, 3, 2, 8, dtype=torch.int64)), r"`q` must be float32"),
        (dict(q_weight=torch.randn(7)), r"`q_weight` must have shape \[hd\]"),
        (dict(k_weight=torch.ones(8, dtype=torch.int32)), r"`k_weight` must be a float32"),
        (dict(positions=torch.zeros(2, 4, 2, dtype=torch.int64)), r"`positions` must have shape \[B, L, ndim\]"),
        (dict(positions=torch.zeros(2, 3, 2, dtype=torch.bool)), r"`positions` must be an int32, int64"),
        (dict(positions=torch.zeros(2, 3, 5, dtype=torch.int64)), r"leaves no channels to rotate"),
    ],
)
def test_bad_input(overrides, match):
    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match=match):
        qkv_norm_rope(**args)


def test_bad_base_frequency():
    with pytest.raises(RuntimeError, match="`base_frequency` must be a positive finite number"):
        qkv_norm_rope(**_bad(), base_frequency=0.0)


def test_bad_backward_grad_shape():
    _, q, k, v = fused_qkv(2, 3, 2, 1, 8)
    qw, kw = random_weights(8)
    g = randn(2, 3, 2, 8)  # fits grad_q ([B, L, H, hd]), not grad_k
    with pytest.raises(RuntimeError, match=r"`grad_k` must have shape"):
        torch.ops.vitops._qkv_norm_rope_backward(g, g, g, q, k, v, qw, kw, random_positions(2, 3), 1e-6, 100.0)


@pytest.mark.cuda
def test_cuda_head_dim_limit_and_device_mismatch():
    _, q, k, v = fused_qkv(1, 2, 1, 1, 8, device="cuda")
    qw, kw = random_weights(8)
    with pytest.raises(RuntimeError, match="`q` and `q_weight` must be on the same device"):
        qkv_norm_rope(q, k, v, qw, kw, random_positions(1, 2, "cuda"))
    _, q, k, v = fused_qkv(1, 2, 1, 1, 1024, device="cuda")
    qw, kw = random_weights(1024, "cuda")
    with pytest.raises(RuntimeError, match="head dims up to"):
        qkv_norm_rope(q, k, v, qw, kw, random_positions(1, 2, "cuda"))


# --------------------------------------------------------------------------------------------
# parity with the installed transformers
# --------------------------------------------------------------------------------------------
def _hf_attention(dtype, device, heads=4, kv_heads=2, head_dim=24):
    gemma4 = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config_mod = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    config = config_mod.Gemma4VisionConfig(
        hidden_size=96, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=64, num_hidden_layers=1,
    )
    attn = gemma4.Gemma4VisionAttention(config, layer_idx=0).to(device=device, dtype=dtype)
    with torch.no_grad():
        attn.q_norm.weight.copy_(1 + 0.5 * torch.randn(head_dim))
        attn.k_norm.weight.copy_(1 + 0.5 * torch.randn(head_dim))
    rotary = gemma4.Gemma4VisionRotaryEmbedding(config).to(device)
    return gemma4, config, attn, rotary


def _hf_qkv(gemma4, attn, rotary, hidden, pos):
    """HF Gemma4VisionAttention.forward up to the attention call (q/k/v in [B, N, L, hd])."""
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    cos, sin = rotary(hidden, pos)
    q = gemma4.apply_multidimensional_rope(attn.q_norm(attn.q_proj(hidden).view(shape)), cos, sin, pos)
    k = gemma4.apply_multidimensional_rope(attn.k_norm(attn.k_proj(hidden).view(shape)), cos, sin, pos)
    v = attn.v_norm(attn.v_proj(hidden).view(shape))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_matches_hf_gemma4_vision_attention(device, dtype):
    if dtype == torch.float64:
        pytest.skip("HF computes its RoPE tables in float32; float64 parity is not defined")
    gemma4, config, attn, rotary = _hf_attention(dtype, device)
    b, length = 2, 12
    hidden = torch.randn(b, length, config.hidden_size, device=device).to(dtype)
    xs, ys = torch.meshgrid(torch.arange(4), torch.arange(3), indexing="xy")
    pos = torch.stack([xs, ys], -1).reshape(1, length, 2).repeat(b, 1, 1).to(device)
    pos[1, -3:] = -1  # padding
    with torch.no_grad():
        hf = _hf_qkv(gemma4, attn, rotary, hidden, pos)
        # the same projection outputs, fed to the fused op as views of one buffer
        proj = torch.cat([attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)], dim=-1)
        hd, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        q = proj[..., : h * hd].unflatten(-1, (h, hd))
        k = proj[..., h * hd : (h + kv) * hd].unflatten(-1, (kv, hd))
        v = proj[..., (h + kv) * hd :].unflatten(-1, (kv, hd))
        ours = qkv_norm_rope(
            q, k, v, attn.q_norm.weight, attn.k_norm.weight, pos,
            eps=config.rms_norm_eps, base_frequency=config.rope_parameters["rope_theta"],
        )
        # float64 ground truth of the same computation
        hf64 = _hf_qkv(gemma4, attn.double(), rotary, hidden.double(), pos)
    for o, r, r64 in zip(ours, hf, hf64):
        assert o.shape == r.shape and o.dtype == r.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=0, atol=2e-6)
        else:
            # within the dtype's tolerance of HF, and no further from float64 than HF is
            torch.testing.assert_close(o, r, **tol(dtype))
            ours_err = (o.double() - r64).abs().max().item()
            hf_err = (r.double() - r64).abs().max().item()
            assert ours_err <= hf_err * 1.01 + 1e-12


EXTREMES = [-(2**63), 2**63 - 1, -(2**62), 2**62, -4, 0, 1, 2**31 - 1, -(2**31)]


@pytest.mark.parametrize("seed", range(6))
def test_int64_limit_positions_match_reference(seed):
    """The angle table's span used to overflow int64 for positions far apart (heap overflow); every
    int64 position is valid (finite float32 angles)."""
    g = torch.Generator().manual_seed(seed)
    ndim = 1 + seed % 2
    b, length, hd = 1 + seed % 2, 3 + seed, 16
    pos = torch.tensor(EXTREMES)[torch.randint(0, len(EXTREMES), (b, length, ndim), generator=g)]
    _, q, k, v = fused_qkv(b, length, 2, 1, hd)
    qw, kw = random_weights(hd)
    for o, r in zip(qkv_norm_rope(q, k, v, qw, kw, pos), reference.qkv_norm_rope(q, k, v, qw, kw, pos)):
        torch.testing.assert_close(o, r, **tol(torch.float32))


def test_bad_positions_eps_and_base_raise():
    _, q, k, v = fused_qkv(1, 2, 1, 1, 16)
    qw, kw = random_weights(16)
    pos = torch.tensor([[[0.0], [float("nan")]]])
    with pytest.raises(RuntimeError, match="`positions` must be finite"):
        qkv_norm_rope(q, k, v, qw, kw, pos)
    ok = torch.zeros(1, 2, 1, dtype=torch.long)
    for kwargs, match in [(dict(eps=-1e-6), "`eps` must be a finite number >= 0"),
                          (dict(eps=float("nan")), "`eps` must be a finite number >= 0"),
                          (dict(base_frequency=float("inf")), "`base_frequency` must be a positive finite number"),
                          (dict(rope_dtype=torch.int32), "`rope_dtype` must be None or a floating dtype")]:
        with pytest.raises(RuntimeError, match=match):
            qkv_norm_rope(q, k, v, qw, kw, ok, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_dtype_rounds_the_tables(device):
    """rope_dtype=float32 with bfloat16 q/k: cos/sin stay float32 (HF under autocast), which differs
    from the default (tables rounded to bfloat16) and matches the reference with that option."""
    _, q, k, v = fused_qkv(2, 9, 2, 2, 32, dtype=torch.bfloat16, device=device)
    qw, kw = random_weights(32, device)
    pos = random_positions(2, 9, device)
    default = qkv_norm_rope(q, k, v, qw, kw, pos)
    f32 = qkv_norm_rope(q, k, v, qw, kw, pos, rope_dtype=torch.float32)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, pos, rope_dtype=torch.float32)
    for o, r in zip(f32, ref):
        torch.testing.assert_close(o, r, **tol(torch.bfloat16))
    assert not torch.equal(default[0], f32[0])
    torch.testing.assert_close(qkv_norm_rope(q, k, v, qw, kw, pos, rope_dtype=torch.bfloat16)[0], default[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# the other families' options: norm kinds, the v-norm flag, interleaved pairs, a frequency table
# --------------------------------------------------------------------------------------------
NORMS = ["scale", "scale_plus_one", "rms", "none"]


def _option_case(rng, device, dtype):
    """A seeded random call: shapes, position axes and every option drawn independently."""
    ndim = rng.choice([1, 2, 3])
    hd = 2 * ndim * rng.randint(1, 5) + 2 * rng.randint(0, 1)
    kv = rng.randint(1, 3)
    h = kv * rng.randint(1, 2)
    b, length = rng.randint(0, 3), rng.randint(0, 9)
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    opts = dict(norm=rng.choice(NORMS), v_norm=rng.random() < 0.5, pairing=rng.choice(["half_split", "interleaved"]),
                eps=rng.choice([1e-6, 1e-3]), base_frequency=rng.choice([100.0, 10000.0]))
    weights = random_weights(hd, device, rng.choice([torch.float32, torch.bfloat16]))
    if opts["norm"] in ("rms", "none"):
        weights = (None, None)
    if rng.random() < 0.5:
        opts["rope_freqs"] = torch.rand(hd // 2, device=device) + 0.01
    pos = random_positions(b, length, device, rng.choice([torch.int64, torch.float32]), ndim=ndim)
    return (q, k, v, *weights, pos), opts


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_options_match_reference(device, dtype):
    import random

    rng = random.Random(f"options/{device}/{dtype}")
    for _ in range(40):
        args, opts = _option_case(rng, device, dtype)
        out = qkv_norm_rope(*args, **opts)
        ref = reference.qkv_norm_rope(*args, **opts)
        for o, r in zip(out, ref):
            assert o.shape == r.shape and o.dtype == dtype and o.transpose(1, 2).is_contiguous()
            torch.testing.assert_close(o, r, **tol(dtype), msg=lambda m: f"{opts}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_option_identities(device):
    """Each option against an independent formulation of the same math (bitwise on the CPU)."""
    exact = dict(rtol=0, atol=0) if device == "cpu" else tol(torch.float32)
    _, q, k, v = fused_qkv(2, 6, 4, 2, 16, device=device)
    qw, kw = random_weights(16, device)
    pos = random_positions(2, 6, device)
    base = qkv_norm_rope(q, k, v, qw + 1, kw + 1, pos)
    # x * (1 + w) is the scale norm with the weight 1 + w (the kernel adds the 1 in float32)
    for o, r in zip(qkv_norm_rope(q, k, v, qw, kw, pos, norm="scale_plus_one"), base):
        torch.testing.assert_close(o, r, **exact)
    # the weightless norm is the scale norm with unit weights
    ones = torch.ones(16, device=device)
    for o, r in zip(qkv_norm_rope(q, k, v, None, None, pos, norm="rms"), qkv_norm_rope(q, k, v, ones, ones, pos)):
        torch.testing.assert_close(o, r, **exact)
    # no norms: q and k are the RoPE op's rotation of the inputs, v passes through
    qo, ko, vo = qkv_norm_rope(q, k, v, None, None, pos, norm="none", v_norm=False)
    torch.testing.assert_close(qo.transpose(1, 2), apply_multidimensional_rope(q, pos, base_frequency=100.0), **exact)
    torch.testing.assert_close(ko.transpose(1, 2), apply_multidimensional_rope(k, pos, base_frequency=100.0), **exact)
    assert torch.equal(vo.transpose(1, 2), v)
    # HF's frequencies given as a table equal the default (chunks of 8: 1 / 100^(2i / 8) per axis)
    table = torch.cat([reference.rope_inv_freq(8, 100.0, device=device)] * 2)
    for o, r in zip(qkv_norm_rope(q, k, v, qw, kw, pos, rope_freqs=table), qkv_norm_rope(q, k, v, qw, kw, pos)):
        torch.testing.assert_close(o, r, **tol(torch.float32))
    # interleaved pairs are half-split pairs after permuting each chunk's channels (2i, 2i+1) -> (i, i + w/2)
    perm = torch.cat([torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)]) + 8 * c for c in range(2)]).to(device)
    inter = qkv_norm_rope(q, k, v, None, None, pos, norm="none", pairing="interleaved")
    half = qkv_norm_rope(q[..., perm], k[..., perm], v[..., perm], None, None, pos, norm="none")
    for o, r in zip(inter[:2], half[:2]):
        torch.testing.assert_close(o[..., perm], r, **exact)


def test_options_gradcheck_float64():
    b, length, h, kv, hd = 2, 3, 2, 1, 8
    buf = torch.randn(b, length, (h + 2 * kv) * hd, dtype=torch.float64, requires_grad=True)
    pos = random_positions(b, length, ndim=1)
    freqs = torch.rand(hd // 2, dtype=torch.float64) + 0.1
    for norm in NORMS:
        for pairing, v_norm, rope_freqs in (("interleaved", False, None), ("half_split", True, freqs)):
            weights = [(1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_() for _ in range(2)]

            def f(buf, qw, kw):
                q, k, v = split_qkv(buf, h, kv, hd)
                weighted = norm in ("scale", "scale_plus_one")
                return qkv_norm_rope(q, k, v, qw if weighted else None, kw if weighted else None, pos, norm=norm,
                                     v_norm=v_norm, pairing=pairing, rope_freqs=rope_freqs)

            assert torch.autograd.gradcheck(f, (buf, *weights)), (norm, pairing)


@pytest.mark.parametrize("device", DEVICES)
def test_options_opcheck(device):
    _, q, k, v = fused_qkv(2, 5, 4, 2, 12, device=device)
    pos = random_positions(2, 5, device, ndim=3)
    freqs = torch.rand(6, device=device) + 0.1
    qw, kw = random_weights(12, device)
    for args in ((q, k, v, None, None, pos, 1e-6, 10.0, None, "rms", False, "interleaved", freqs),
                 (q, k, v, qw, kw, pos, 1e-6, 10.0, torch.float32, "scale_plus_one", True, "interleaved", None),
                 (q, k, v, None, None, pos, 1e-6, 10.0, None, "none", True, "half_split", freqs)):
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and i < 5 else t for i, t in enumerate(args)]
        torch.library.opcheck(torch.ops.vitops.qkv_norm_rope.default, tuple(leaves))
        grads = [randn(*t.shape, device=device) for t in args[:3]]
        torch.library.opcheck(torch.ops.vitops._qkv_norm_rope_backward.default, (*grads, *args))


@pytest.mark.parametrize("dynamic", [False, True])
def test_options_compile_fullgraph(dynamic):
    def f(q, k, v, pos):
        return qkv_norm_rope(q, k, v, None, None, pos, norm="rms", v_norm=False, pairing="interleaved")

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for length in (5, 8):
        q, k, v = (randn(2, length, 2, 8, requires_grad=True) for _ in range(3))
        pos = random_positions(2, length, ndim=1)
        out, ref = compiled(q, k, v, pos), reference.qkv_norm_rope(q, k, v, None, None, pos, norm="rms",
                                                                    v_norm=False, pairing="interleaved")
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        got = torch.autograd.grad(sum(o.square().sum() for o in out), (q, k, v))
        want = torch.autograd.grad(sum(r.square().sum() for r in ref), (q, k, v))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(norm="layer"), r'`norm` must be "scale" \(x \* w\), "scale_plus_one"'),
        (dict(pairing="complex"), r'`pairing` must be "half_split", "interleaved" or "none" \(no rotation\), got "complex"'),
        (dict(norm="rms"), r'`q_weight` must be None with norm="rms"'),
        (dict(norm="scale_plus_one", k_weight=None), r'`k_weight` must be given with norm="scale_plus_one"'),
        (dict(rope_freqs=torch.ones(3)), r"`rope_freqs` must have shape \[hd / 2\] = \[4\]"),
        (dict(rope_freqs=torch.ones(4, dtype=torch.int64)), r"`rope_freqs` must be a float32"),
        (dict(rope_freqs=torch.ones(4, device="meta")), r"`q` and `rope_freqs` must be on the same device"),
    ],
)
def test_bad_options(overrides, match):
    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match=match):
        qkv_norm_rope(**args)
    if "same device" in match:
        return  # on meta tensors all devices agree
    # the fake kernel (torch.compile / meta tensors) raises the same error
    meta = {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    with pytest.raises(RuntimeError, match=match):
        qkv_norm_rope(**meta)


def test_rope_freqs_is_not_differentiated():
    args = _bad(rope_freqs=torch.ones(4, requires_grad=True))
    with pytest.raises(RuntimeError, match="`rope_freqs` is not differentiated"):
        qkv_norm_rope(**args)


def test_missing_output_gradients_and_weightless_weight_grads():
    """Only q reaches the loss: k and v get the gradient of zero output gradients; no weights."""
    _, q, k, v = fused_qkv(2, 4, 2, 1, 8, requires_grad=True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    pos = random_positions(2, 4)
    qo, _, _ = qkv_norm_rope(q, k, v, None, None, pos, norm="rms")
    gq, gk, gv = torch.autograd.grad(qo.sum(), (q, k, v))
    ref = torch.autograd.grad(reference.qkv_norm_rope(q, k, v, None, None, pos, norm="rms")[0].sum(), (q, k, v),
                              allow_unused=True)
    torch.testing.assert_close(gq, ref[0], rtol=1e-5, atol=1e-5)
    assert not gk.any() and not gv.any()
    raw = torch.ops.vitops._qkv_norm_rope_backward(randn(2, 4, 2, 8), randn(2, 4, 1, 8), randn(2, 4, 1, 8), q, k, v,
                                                   None, None, pos, 1e-6, 100.0, None, "rms")
    assert raw[3].shape == (0,) and raw[4].shape == (0,)


# --------------------------------------------------------------------------------------------
# the options express the other families' attention entries (parity with transformers)
# --------------------------------------------------------------------------------------------
def _hf_gemma3_qk_norms(gemma3, hd, device):
    """HF's Gemma3RMSNorm q_norm / k_norm with random (not zero) weights."""
    norms = gemma3.Gemma3RMSNorm(hd, eps=1e-6), gemma3.Gemma3RMSNorm(hd, eps=1e-6)
    with torch.no_grad():
        for n in norms:
            n.weight.normal_(0, 0.5)
    return tuple(n.to(device) for n in norms)


@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if "float64" not in p.id])
def test_matches_hf_gemma3_text_norms_and_rope(device, dtype):
    """Gemma 3 text attention: q_norm/k_norm x * (1 + w), no v norm, 1-D half-split RoPE."""
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    hd, h, kv, b, length = 32, 4, 2, 2, 9
    q_norm, k_norm = _hf_gemma3_qk_norms(gemma3, hd, device)
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    position_ids = torch.arange(3, 3 + length, device=device).repeat(b, 1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    with torch.no_grad():
        hq, hk = gemma3.apply_rotary_pos_emb(q_norm(q.transpose(1, 2)), k_norm(k.transpose(1, 2)), cos, sin)
        ours = qkv_norm_rope(q, k, v, q_norm.weight, k_norm.weight, position_ids[..., None], eps=1e-6,
                             base_frequency=10000.0, norm="scale_plus_one", v_norm=False)
    torch.testing.assert_close(ours[0], hq, **(dict(rtol=0, atol=2e-6) if dtype == torch.float32 else tol(dtype)))
    torch.testing.assert_close(ours[1], hk, **(dict(rtol=0, atol=2e-6) if dtype == torch.float32 else tol(dtype)))
    assert torch.equal(ours[2], v.transpose(1, 2))


@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if "float64" not in p.id])
def test_matches_hf_llama4_vision_rope(device, dtype):
    """Llama 4 vision RoPE: interleaved complex pairs, the first half of the pairs by the column and
    the second by the row (1-based), the CLS token (last) unrotated: no norms, float32 cos/sin."""
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    config_mod = pytest.importorskip("transformers.models.llama4.configuration_llama4")
    hd, h = 16, 3
    config = config_mod.Llama4VisionConfig(hidden_size=hd * h, num_attention_heads=h, image_size=56, patch_size=14,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    freqs_ci = llama4.Llama4VisionRotaryEmbedding(config).freqs_ci.to(device)  # [17, 1, hd / 2]
    side, b = 4, 2
    length = side * side + 1
    q, k, v = (randn(b, length, h, hd, device=device).to(dtype) for _ in range(3))
    hq, hk = llama4.vision_apply_rotary_emb(q, k, freqs_ci)
    idx = torch.arange(side * side, device=device)
    pos = torch.stack([idx % side + 1, idx // side + 1], -1)
    pos = torch.cat([pos, torch.zeros(1, 2, dtype=pos.dtype, device=device)]).expand(b, length, 2)  # CLS: angle 0
    ours = qkv_norm_rope(q, k, v, None, None, pos, base_frequency=10000.0, rope_dtype=torch.float32, norm="none",
                         v_norm=False, pairing="interleaved")
    for o, r in zip(ours[:2], (hq, hk)):
        torch.testing.assert_close(o.transpose(1, 2), r, **(dict(rtol=0, atol=2e-6) if dtype == torch.float32
                                                             else tol(dtype)))
    assert torch.equal(ours[0].transpose(1, 2)[:, -1], q[:, -1])  # CLS unrotated


# --------------------------------------------------------------------------------------------
# v=None: q and k only (attention reads v's projection itself; Llama 4, Gemma 3)
# --------------------------------------------------------------------------------------------
_WITHOUT_V_OPTIONS = [
    dict(norm="none", pairing="interleaved", rope_dtype=torch.float32, base_frequency=10000.0),  # Llama 4 vision
    dict(norm="scale_plus_one", pairing="half_split"),  # Gemma 3 text
    dict(norm="rms", pairing="interleaved"),
    dict(norm="scale", pairing="half_split"),
]


def _weights_for(opts, hd, device):
    return random_weights(hd, device) if opts["norm"] in ("scale", "scale_plus_one") else (None, None)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("opts", _WITHOUT_V_OPTIONS, ids=lambda o: f"{o['norm']}-{o['pairing']}")
@pytest.mark.parametrize("shape", [(2, 9, 4, 2, 16), (1, 7, 3, 3, 88), (2, 0, 2, 1, 8), (0, 3, 2, 1, 8)])
def test_without_v_equals_the_q_k_outputs_with_v(device, dtype, opts, shape):
    """v=None gives q_out and k_out bitwise equal to the call with v, v_out None, and the same q/k gradients."""
    b, length, h, kv, hd = shape
    buf, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device, requires_grad=True)
    qw, kw = _weights_for(opts, hd, device)
    pos = random_positions(b, length, device)
    with_v = qkv_norm_rope(q, k, v, qw, kw, pos, v_norm=False, **opts)
    without = qkv_norm_rope(q, k, None, qw, kw, pos, v_norm=False, **opts)
    assert without[2] is None
    ref = reference.qkv_norm_rope(q, k, None, qw, kw, pos, v_norm=False, **opts)
    assert ref[2] is None
    for o, w, r in zip(without[:2], with_v[:2], ref[:2]):
        assert o.shape == w.shape and o.dtype == dtype and o.transpose(1, 2).is_contiguous()
        assert torch.equal(o, w)
        torch.testing.assert_close(o, r, **tol(dtype))
    grads = [randn(*o.shape, device=device, dtype=dtype) for o in without[:2]]
    got = torch.autograd.grad(without[:2], buf, grads)[0]
    want = torch.autograd.grad(with_v[:2], buf, grads)[0]
    assert torch.equal(got, want)
    assert not got[..., (h + kv) * hd :].any()  # v's slice gets nothing


def test_without_v_gradcheck_float64():
    b, length, h, kv, hd = 2, 4, 2, 1, 8
    pos = random_positions(b, length)
    for opts in _WITHOUT_V_OPTIONS:
        q = torch.randn(b, length, h, hd, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, length, kv, hd, dtype=torch.float64, requires_grad=True)
        weights = [(1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_() for _ in range(2)]
        weighted = opts["norm"] in ("scale", "scale_plus_one")

        def f(q, k, qw, kw):
            out = qkv_norm_rope(q, k, None, qw if weighted else None, kw if weighted else None, pos, v_norm=False,
                                **opts)
            assert out[2] is None
            return out[:2]

        assert torch.autograd.gradcheck(f, (q, k, *weights)), opts


@pytest.mark.parametrize("device", DEVICES)
def test_without_v_opcheck(device):
    _, q, k, _ = fused_qkv(2, 5, 4, 2, 12, device=device)
    pos = random_positions(2, 5, device)
    qw, kw = random_weights(12, device)
    for args in ((q, k, None, None, None, pos, 1e-6, 1e4, torch.float32, "none", False, "interleaved", None),
                 (q, k, None, qw, kw, pos, 1e-6, 1e4, None, "scale_plus_one", False, "half_split", None)):
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() and i < 5
                  else t for i, t in enumerate(args)]
        torch.library.opcheck(torch.ops.vitops.qkv_norm_rope.default, tuple(leaves))
        grads = (randn(*q.shape, device=device), randn(*k.shape, device=device), None)
        torch.library.opcheck(torch.ops.vitops._qkv_norm_rope_backward.default, (*grads, *args))


@pytest.mark.parametrize("dynamic", [False, True])
def test_without_v_compile_fullgraph(dynamic):
    opts = _WITHOUT_V_OPTIONS[0]

    def f(q, k, pos):
        q_out, k_out, v_out = qkv_norm_rope(q, k, None, None, None, pos, v_norm=False, **opts)
        assert v_out is None
        return q_out, k_out

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for length in (5, 8):
        q, k = (randn(2, length, 2, 8, requires_grad=True) for _ in range(2))
        pos = random_positions(2, length)
        out = compiled(q, k, pos)
        ref = reference.qkv_norm_rope(q, k, None, None, None, pos, v_norm=False, **opts)[:2]
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        got = torch.autograd.grad(sum(o.square().sum() for o in out), (q, k))
        want = torch.autograd.grad(sum(r.square().sum() for r in ref), (q, k))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_without_v_bad_input():
    args = _bad(v=None)
    for call_args in (args, {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in args.items()}):
        with pytest.raises(RuntimeError, match=r"`v_norm` must be False when `v` is None"):
            qkv_norm_rope(**call_args)  # v_norm defaults to True (Gemma 4)
        with pytest.raises(RuntimeError, match=r"`q` and `k` must have the same dtype, got float32 and float64"):
            qkv_norm_rope(**{**call_args, "k": call_args["k"].double()}, v_norm=False)
    _, q, k, v = fused_qkv(2, 3, 2, 1, 8)
    pos = random_positions(2, 3)
    gq, gk = randn(2, 3, 2, 8), randn(2, 3, 1, 8)
    bwd = torch.ops.vitops._qkv_norm_rope_backward
    for device in ("cpu", "meta"):
        t = [x.to(device) for x in (gq, gk, q, k, v, pos)]
        with pytest.raises(RuntimeError, match=r"`grad_v` must be None when `v` is None"):
            bwd(t[0], t[1], t[1], t[2], t[3], None, None, None, t[5], 1e-6, 100.0, None, "none", False)
        with pytest.raises(RuntimeError, match=r"`grad_v` must be given when `v` is given"):
            bwd(t[0], t[1], None, t[2], t[3], t[4], None, None, t[5], 1e-6, 100.0, None, "none", False)


# --------------------------------------------------------------------------------------------
# precomputed cos/sin (rope_cos, rope_sin): a decoder computes them once per forward
# --------------------------------------------------------------------------------------------
def _angle_tables(b, length, hd, ndim, device, table_dtype=torch.float32, seed=0, layout="contiguous"):
    """Random cos/sin-like tables [b, L, hd/2] (values in [-1, 1], not a real rotation: the op must
    read exactly what it is given) in a storage layout the op has to handle through strides."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = (torch.rand(b, length, hd // 2, generator=g) * 2 - 1 for _ in range(2))
    if layout == "transposed":  # pair-major storage
        cos, sin = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (cos, sin))
    elif layout == "strided":  # every other pair of a wider table
        cos, sin = (torch.stack([t, torch.full_like(t, 9.0)], -1)[..., 0] for t in (cos, sin))
    return cos.to(device=device, dtype=table_dtype), sin.to(device=device, dtype=table_dtype)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("seed", range(4))
def test_given_cos_sin_match_reference_forward_and_backward(device, dtype, seed):
    """Seeded random shapes, pairings, norms, axes, table dtypes, batch-1 tables and strided storage."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    ndim = pick(1, 2)
    hd = 2 * ndim * int(torch.randint(1, 9, (1,), generator=g))
    b, length, h, kv = pick(1, 2, 3), int(torch.randint(0, 12, (1,), generator=g)), pick(1, 2, 4), pick(1, 2)
    norm, pairing = pick("scale", "scale_plus_one", "rms", "none"), pick("half_split", "interleaved")
    table_dtype, layout = pick(torch.float32, torch.bfloat16, dtype), pick("contiguous", "transposed", "strided")
    with_v = pick(True, False)
    cos, sin = _angle_tables(pick(1, b), length, hd, ndim, device, table_dtype, seed, layout)
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    weighted = norm in ("scale", "scale_plus_one")
    qw, kw = (w.requires_grad_() for w in random_weights(hd, device, dtype)) if weighted else (None, None)
    pos = random_positions(b, length, device, ndim=ndim)
    kwargs = dict(norm=norm, v_norm=with_v, pairing=pairing, rope_cos=cos, rope_sin=sin)
    vi = v if with_v else None
    out = qkv_norm_rope(q, k, vi, qw, kw, pos, **kwargs)
    ref = reference.qkv_norm_rope(q, k, vi, qw, kw, pos, **kwargs)
    leaves = [t for t in (q, k, v if with_v else None, qw, kw) if t is not None]
    for o, r in zip(out, ref):
        if r is not None:
            torch.testing.assert_close(o, r, **tol(dtype))
    if not length * b:
        return
    grads = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in out if o is not None]
    got = torch.autograd.grad([o for o in out if o is not None], leaves, grads, allow_unused=True)
    want = torch.autograd.grad([r for r in ref if r is not None], leaves, grads, allow_unused=True)
    loose = dict(rtol=5e-2, atol=5e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-4, atol=1e-4)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **loose)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pairing", ["half_split", "interleaved"])
def test_given_cos_sin_of_the_angles_equal_evaluated_angles(device, pairing):
    """Tables holding the op's cos/sin (the same float32 angles; torch's cos/sin vs the kernel's libm
    differ in the last bit) give the evaluated path's result; sin negated in the backward (the
    transposed rotation) included."""
    b, length, h, kv, hd = 2, 11, 3, 1, 24
    _, q, k, v = fused_qkv(b, length, h, kv, hd, device=device)
    q, k = (t.detach().requires_grad_() for t in (q, k))
    pos = random_positions(b, length, device, ndim=1).clamp_min(0)
    freqs = torch.rand(hd // 2, device=device) + 0.05
    angle = pos.float() * freqs
    cos, sin = angle.cos(), angle.sin()
    qw, kw = random_weights(hd, device)
    a = qkv_norm_rope(q, k, None, qw, kw, pos, norm="scale_plus_one", v_norm=False, pairing=pairing, rope_freqs=freqs)
    t = qkv_norm_rope(q, k, None, qw, kw, pos, norm="scale_plus_one", v_norm=False, pairing=pairing, rope_cos=cos,
                      rope_sin=sin)
    for x, y in zip(a[:2], t[:2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a[0].sum() + a[1].square().sum(), (q, k))
    gt = torch.autograd.grad(t[0].sum() + t[1].square().sum(), (q, k))
    for x, y in zip(ga, gt):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if "float64" not in p.id])
def test_given_hf_cos_sin_match_hf_gemma3_text(device, dtype):
    """HF's Gemma 3 rotary output [B, L, hd] (both halves equal, in the activation dtype) given as it
    comes: the op reads its first half."""
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    from transformers import Gemma3TextConfig

    hd, h, kv, b, length = 32, 4, 2, 2, 9
    cfg = Gemma3TextConfig(hidden_size=h * hd, num_attention_heads=h, num_key_value_heads=kv, head_dim=hd,
                           num_hidden_layers=6)
    q_norm, k_norm = _hf_gemma3_qk_norms(gemma3, hd, device)
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    position_ids = torch.arange(5, 5 + length, device=device).repeat(b, 1)
    cos, sin = gemma3.Gemma3RotaryEmbedding(cfg).to(device)(q, position_ids, "full_attention")
    assert cos.shape == (b, length, hd) and cos.dtype == dtype
    with torch.no_grad():
        hq, hk = gemma3.apply_rotary_pos_emb(q_norm(q.transpose(1, 2)), k_norm(k.transpose(1, 2)), cos, sin)
        ours = qkv_norm_rope(q, k, None, q_norm.weight, k_norm.weight, position_ids[..., None], eps=1e-6,
                             norm="scale_plus_one", v_norm=False, rope_cos=cos, rope_sin=sin)
    exact = dict(rtol=0, atol=2e-6) if dtype == torch.float32 else tol(dtype)
    torch.testing.assert_close(ours[0], hq, **exact)
    torch.testing.assert_close(ours[1], hk, **exact)


def test_given_cos_sin_gradcheck_float64():
    b, length, h, kv, hd = 2, 3, 2, 1, 8
    buf = torch.randn(b, length, (h + 2 * kv) * hd, dtype=torch.float64, requires_grad=True)
    pos = random_positions(b, length, ndim=1)
    cos, sin = _angle_tables(1, length, hd, 1, "cpu", torch.float64)
    weights = [(1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    for pairing in ("half_split", "interleaved"):
        def f(buf, qw, kw):
            q, k, _ = split_qkv(buf, h, kv, hd)
            return qkv_norm_rope(q, k, None, qw, kw, pos, norm="scale_plus_one", v_norm=False, pairing=pairing,
                                 rope_cos=cos, rope_sin=sin)[:2]

        assert torch.autograd.gradcheck(f, (buf, *weights)), pairing


@pytest.mark.parametrize("device", DEVICES)
def test_given_cos_sin_opcheck(device):
    _, q, k, v = fused_qkv(2, 5, 4, 2, 12, device=device)
    pos = random_positions(2, 5, device, ndim=2)
    cos, sin = _angle_tables(1, 5, 12, 2, device, layout="transposed")
    qw, kw = random_weights(12, device)
    for args in ((q, k, None, qw, kw, pos, 1e-6, 10.0, None, "scale_plus_one", False, "half_split", None, cos, sin),
                 (q, k, v, None, None, pos, 1e-6, 10.0, torch.bfloat16, "rms", True, "interleaved", None, cos, sin)):
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and i < 5 else t for i, t in enumerate(args)]
        torch.library.opcheck(torch.ops.vitops.qkv_norm_rope.default, tuple(leaves))
        grads = [randn(*t.shape, device=device) for t in args[:2]] + [None if args[2] is None else randn(
            *args[2].shape, device=device)]
        torch.library.opcheck(torch.ops.vitops._qkv_norm_rope_backward.default, (*grads, *args))


@pytest.mark.parametrize("dynamic", [False, True])
def test_given_cos_sin_compile_fullgraph(dynamic):
    def f(q, k, pos, cos, sin):
        return qkv_norm_rope(q, k, None, None, None, pos, norm="rms", v_norm=False, rope_cos=cos, rope_sin=sin)[:2]

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for length in (5, 8):
        q, k = (randn(2, length, 2, 8, requires_grad=True) for _ in range(2))
        pos = random_positions(2, length, ndim=1)
        cos, sin = _angle_tables(2, length, 8, 1, "cpu")
        out = compiled(q, k, pos, cos, sin)
        ref = reference.qkv_norm_rope(q, k, None, None, None, pos, norm="rms", v_norm=False, rope_cos=cos,
                                      rope_sin=sin)[:2]
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        got = torch.autograd.grad(sum(o.square().sum() for o in out), (q, k))
        want = torch.autograd.grad(sum(r.square().sum() for r in ref), (q, k))
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(rope_cos=torch.ones(2, 3, 4)), r"`rope_cos` and `rope_sin` must be given together"),
        (dict(rope_cos=torch.ones(2, 3, 4), rope_sin=torch.ones(2, 3, 4), rope_freqs=torch.ones(4)),
         r"give either `rope_freqs` or the precomputed `rope_cos` / `rope_sin`, not both"),
        (dict(rope_cos=torch.ones(2, 3, 3), rope_sin=torch.ones(2, 3, 3)),
         r"`rope_cos` must have shape \[B or 1, L, hd / 2\] = \[2 or 1, 3, 4\]"),
        (dict(rope_cos=torch.ones(2, 3, 4), rope_sin=torch.ones(3, 3, 4)),
         r"`rope_sin` must have shape \[B or 1, L, hd / 2\]"),
        (dict(rope_cos=torch.ones(2, 4, 4), rope_sin=torch.ones(2, 4, 4)), r"`rope_cos` must have shape"),
        (dict(rope_cos=torch.ones(3, 4), rope_sin=torch.ones(3, 4)), r"`rope_cos` must have shape"),
        (dict(rope_cos=torch.ones(2, 3, 4, dtype=torch.int32), rope_sin=torch.ones(2, 3, 4)),
         r"`rope_cos` must be a float32"),
        (dict(rope_cos=torch.ones(2, 3, 4), rope_sin=torch.ones(2, 3, 4, device="meta")),
         r"`q` and `rope_sin` must be on the same device"),
    ],
)
def test_bad_given_cos_sin(overrides, match):
    _raises_in_real_and_fake(dict(norm="rms", q_weight=None, k_weight=None, **overrides), match)


def _raises_in_real_and_fake(overrides, match):
    """1-D text arguments with `overrides`: the real kernel and (unless the error is a device
    mismatch, which meta tensors cannot show) the fake kernel raise `match`."""
    args = _bad(**overrides)
    args["positions"] = args["positions"][..., :1]
    with pytest.raises(RuntimeError, match=match):
        qkv_norm_rope(**args)
    if "same device" in match:
        return
    meta = {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    with pytest.raises(RuntimeError, match=match):
        qkv_norm_rope(**meta)


def test_given_cos_sin_are_not_differentiated():
    cos = torch.ones(2, 3, 4, requires_grad=True)
    args = _bad(norm="rms", q_weight=None, k_weight=None, rope_cos=cos, rope_sin=torch.ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="`rope_cos` is not differentiated"):
        qkv_norm_rope(**args)


# --------------------------------------------------------------------------------------------
# Llama 4's orders: the norm after the rotation (norm_after_rope), NoPE layers (pairing "none"),
# the attention temperature scaling q's rows (q_scale)
# --------------------------------------------------------------------------------------------
def _q_scale(rows, length, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(rows, length, generator=g)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("seed", range(6))
def test_llama4_orders_match_reference_forward_and_backward(device, dtype, seed):
    """Seeded random shapes, norms, pairings (with "none"), norm before/after the rotation, q_scale of
    batch 1 or B in any float dtype, with and without v, evaluated or given angles."""
    g = torch.Generator().manual_seed(300 + seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    pairing = pick("half_split", "interleaved", "none")
    ndim = 1 if pairing == "none" else pick(1, 2)
    hd = 2 * ndim * int(torch.randint(1, 9, (1,), generator=g)) + (pick(0, 1) if pairing == "none" else 0)
    b, length, h, kv = pick(1, 2, 3), int(torch.randint(0, 12, (1,), generator=g)), pick(1, 2, 4), pick(1, 2)
    norm = pick("scale", "scale_plus_one", "rms", "none")
    with_v, after, scaled = pick(True, False), pick(True, False), pick(True, False)
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    weighted = norm in ("scale", "scale_plus_one")
    qw, kw = (w.requires_grad_() for w in random_weights(hd, device, dtype)) if weighted else (None, None)
    pos = random_positions(b, length, device, ndim=ndim)
    kwargs = dict(norm=norm, v_norm=with_v, pairing=pairing, norm_after_rope=after)
    if scaled:
        kwargs["q_scale"] = _q_scale(pick(1, b), length, device, pick(torch.float32, torch.bfloat16, dtype), seed)
    if pairing != "none" and pick(True, False):
        kwargs["rope_freqs"] = torch.rand(hd // 2, generator=g).to(device) + 0.05
    vi = v if with_v else None
    out = qkv_norm_rope(q, k, vi, qw, kw, pos, **kwargs)
    ref = reference.qkv_norm_rope(q, k, vi, qw, kw, pos, **kwargs)
    for o, r in zip(out, ref):
        if r is not None:
            torch.testing.assert_close(o, r, **tol(dtype))
    if not length * b:
        return
    leaves = [t for t in (q, k, v if with_v else None, qw, kw) if t is not None]
    grads = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in out if o is not None]
    got = torch.autograd.grad([o for o in out if o is not None], leaves, grads, allow_unused=True)
    want = torch.autograd.grad([r for r in ref if r is not None], leaves, grads, allow_unused=True)
    loose = dict(rtol=5e-2, atol=5e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-4, atol=1e-4)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **loose)


@pytest.mark.parametrize("device", DEVICES)
def test_pairing_none_and_unit_scale_are_exact(device):
    """No rotation and no norm: q and k pass through bit for bit; a q_scale of ones changes nothing;
    the norm without a rotation is the norm alone (either order)."""
    _, q, k, v = fused_qkv(2, 6, 3, 2, 10, dtype=torch.bfloat16, device=device)
    pos = random_positions(2, 6, device, ndim=1)
    ones = torch.ones(1, 6, device=device)
    qo, ko, _ = qkv_norm_rope(q, k, None, None, None, pos, norm="none", v_norm=False, pairing="none", q_scale=ones)
    assert torch.equal(qo, q.transpose(1, 2)) and torch.equal(ko, k.transpose(1, 2))
    for after in (False, True):
        qn, kn, _ = qkv_norm_rope(q, k, None, None, None, pos, norm="rms", v_norm=False, pairing="none",
                                  norm_after_rope=after)
        assert torch.equal(qn, rms_norm(q, None, 1e-6, "rms").transpose(1, 2))
        assert torch.equal(kn, rms_norm(k, None, 1e-6, "rms").transpose(1, 2))


@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if "float64" not in p.id])
def test_llama4_text_attention_entry_matches_hf(device, dtype):
    """HF Llama 4: apply_rotary_emb (float32 complex pairs, type_as) then Llama4TextL2Norm, from its
    own rotary embedding (as inverse frequencies, and as freqs_cis given as cos/sin); NoPE layers'
    (q * attn_scales).to(q.dtype) with HF's float32 temperature."""
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    from transformers import Llama4TextConfig

    hd, h, kv, b, length = 32, 4, 2, 2, 13
    cfg = Llama4TextConfig(hidden_size=h * hd, num_attention_heads=h, num_key_value_heads=kv, head_dim=hd,
                           num_hidden_layers=2, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                  high_freq_factor=4.0,
                                                                  original_max_position_embeddings=16))
    _, q, k, v = fused_qkv(b, length, h, kv, hd, dtype=dtype, device=device)
    position_ids = torch.arange(3, 3 + length, device=device).repeat(b, 1)
    rotary = llama4.Llama4TextRotaryEmbedding(cfg).to(device)
    freqs_cis = rotary(q, position_ids)
    l2 = llama4.Llama4TextL2Norm(cfg.rms_norm_eps)
    with torch.no_grad():
        hq, hk = (l2(t).transpose(1, 2) for t in llama4.apply_rotary_emb(q, k, freqs_cis))
        by_freqs = qkv_norm_rope(q, k, None, None, None, position_ids[..., None], eps=cfg.rms_norm_eps,
                                 rope_dtype=torch.float32, norm="rms", v_norm=False, pairing="interleaved",
                                 rope_freqs=rotary.inv_freq, norm_after_rope=True)
        by_tables = qkv_norm_rope(q, k, None, None, None, position_ids[..., None], eps=cfg.rms_norm_eps,
                                  rope_dtype=torch.float32, norm="rms", v_norm=False, pairing="interleaved",
                                  rope_cos=freqs_cis.real, rope_sin=freqs_cis.imag, norm_after_rope=True)
    close = dict(rtol=0, atol=2e-6) if dtype == torch.float32 else tol(dtype)
    for ours in (by_freqs, by_tables):
        torch.testing.assert_close(ours[0], hq, **close)
        torch.testing.assert_close(ours[1], hk, **close)
    # NoPE: HF's temperature on absolute positions, in float32
    positions = torch.arange(length, device=device) + 8190
    floor_scale, attn_scale = 8192.0, 0.1
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    hq = (q * scales.view(1, length, 1, 1)).to(q.dtype).transpose(1, 2)
    with torch.no_grad():
        qo, ko, _ = qkv_norm_rope(q, k, None, None, None, positions.expand(b, length)[..., None], norm="none",
                                  v_norm=False, pairing="none", q_scale=scales[None])
    assert torch.equal(qo, hq) and torch.equal(ko, k.transpose(1, 2))


def test_llama4_orders_gradcheck_float64():
    b, length, h, kv, hd = 2, 3, 2, 1, 8
    buf = torch.randn(b, length, (h + 2 * kv) * hd, dtype=torch.float64, requires_grad=True)
    pos = random_positions(b, length, ndim=1)
    scale = _q_scale(1, length, "cpu", torch.float64)
    weights = [(1 + 0.5 * torch.randn(hd, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    for norm, pairing, q_scale in (("rms", "interleaved", None), ("scale", "half_split", scale),
                                   ("scale_plus_one", "none", scale), ("none", "none", scale)):
        weighted = norm.startswith("scale")

        def f(buf, qw, kw):
            q, k, v = split_qkv(buf, h, kv, hd)
            return qkv_norm_rope(q, k, v, qw if weighted else None, kw if weighted else None, pos, norm=norm,
                                 pairing=pairing, norm_after_rope=True, q_scale=q_scale)

        assert torch.autograd.gradcheck(f, (buf, *weights)), (norm, pairing)


@pytest.mark.parametrize("device", DEVICES)
def test_llama4_orders_opcheck(device):
    _, q, k, v = fused_qkv(2, 5, 4, 2, 12, device=device)
    pos = random_positions(2, 5, device, ndim=1)
    qw, kw = random_weights(12, device)
    scale = _q_scale(2, 5, device, torch.bfloat16)
    for args in ((q, k, None, None, None, pos, 1e-5, 10.0, torch.float32, "rms", False, "interleaved", None, None,
                  None, True, None),
                 (q, k, v, qw, kw, pos, 1e-6, 10.0, None, "scale", True, "half_split", None, None, None, True, scale),
                 (q, k, None, None, None, pos, 1e-6, 10.0, None, "none", False, "none", None, None, None, False,
                  scale[:1])):
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and i < 5 else t for i, t in enumerate(args)]
        torch.library.opcheck(torch.ops.vitops.qkv_norm_rope.default, tuple(leaves))
        grads = [randn(*t.shape, device=device) for t in args[:2]] + [None if args[2] is None else randn(
            *args[2].shape, device=device)]
        torch.library.opcheck(torch.ops.vitops._qkv_norm_rope_backward.default, (*grads, *args))


@pytest.mark.parametrize("dynamic", [False, True])
def test_llama4_orders_compile_fullgraph(dynamic):
    def f(q, k, pos, scale):
        rope = qkv_norm_rope(q, k, None, None, None, pos, norm="rms", v_norm=False, pairing="interleaved",
                             norm_after_rope=True)[:2]
        nope = qkv_norm_rope(q, k, None, None, None, pos, norm="none", v_norm=False, pairing="none", q_scale=scale)[:2]
        return rope + nope

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for length in (5, 8):
        q, k = (randn(2, length, 2, 8, requires_grad=True) for _ in range(2))
        pos = random_positions(2, length, ndim=1)
        scale = _q_scale(1, length, "cpu")
        out = compiled(q, k, pos, scale)
        ref = (reference.qkv_norm_rope(q, k, None, None, None, pos, norm="rms", v_norm=False, pairing="interleaved",
                                       norm_after_rope=True)[:2]
               + reference.qkv_norm_rope(q, k, None, None, None, pos, norm="none", v_norm=False, pairing="none",
                                         q_scale=scale)[:2])
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        got = torch.autograd.grad(sum(o.square().sum() for o in out), (q, k))
        want = torch.autograd.grad(sum(r.square().sum() for r in ref), (q, k))
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(q_scale=torch.ones(2, 4)), r"`q_scale` must have shape \[B or 1, L\] = \[2 or 1, 3\]"),
        (dict(q_scale=torch.ones(3, 3)), r"`q_scale` must have shape \[B or 1, L\]"),
        (dict(q_scale=torch.ones(2, 3, 1)), r"`q_scale` must have shape \[B or 1, L\]"),
        (dict(q_scale=torch.ones(2, 3, dtype=torch.int64)), r"`q_scale` must be a float32"),
        (dict(q_scale=torch.ones(2, 3, device="meta")), r"`q` and `q_scale` must be on the same device"),
        (dict(pairing="none", rope_freqs=torch.ones(4)), r'must be None with pairing="none"'),
        (dict(pairing="none", rope_cos=torch.ones(2, 3, 4), rope_sin=torch.ones(2, 3, 4)),
         r'must be None with pairing="none"'),
        (dict(pairing="rotate_half"), r'`pairing` must be "half_split", "interleaved" or "none"'),
    ],
)
def test_bad_llama4_options(overrides, match):
    _raises_in_real_and_fake(dict(norm="rms", q_weight=None, k_weight=None, norm_after_rope=True, **overrides), match)


def test_q_scale_is_not_differentiated():
    args = _bad(norm="rms", q_weight=None, k_weight=None, q_scale=torch.ones(2, 3, requires_grad=True))
    with pytest.raises(RuntimeError, match="`q_scale` is not differentiated"):
        qkv_norm_rope(**args)


def test_pairing_none_takes_any_head_dim():
    """Without a rotation nothing needs pairs: odd head dims and more axes than channels are fine."""
    _, q, k, v = fused_qkv(2, 4, 2, 1, 3)
    pos = random_positions(2, 4, ndim=5)
    out = qkv_norm_rope(q, k, v, None, None, pos, norm="rms", pairing="none")
    ref = reference.qkv_norm_rope(q, k, v, None, None, pos, norm="rms", pairing="none")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)

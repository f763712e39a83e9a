"""moe_route / moe_combine (Llama 4's top-1 MoE routing): HF Llama4TextMoe's router and input
scaling, the stable bucketing as a property over seeded random shapes (token counts across the CUDA
counting-sort chunks, expert counts past a warp), ties and NaN logits, forward and backward against
the reference (with the scores' gradient), bad inputs from the real and the fake kernel, bad
permutations (clear errors on the CPU, NaN rows and no crash under the emulated CUDA kernels)."""

import pytest
import torch

from vitops import reference, testing
from vitops.ops import moe_combine, moe_route

from _utils import DEVICES, device_dtypes, tol


def _inputs(n, h, e, device="cpu", dtype=torch.float32, logit_dtype=None, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, h, generator=g)).to(device=device, dtype=dtype)
    logits = 2 * torch.randn(n, e, generator=g)
    if ties:
        logits = logits.round()
    return x, logits.to(device=device, dtype=logit_dtype or dtype)


def _emulator():
    if not testing.load_cuda_emulator():
        pytest.skip("the CUDA emulator library was not built")
    return torch.ops.vitops_emu


@pytest.mark.parametrize("device,dtype", [p for p in device_dtypes() if "float64" not in p.id])
def test_matches_hf_llama4_router_and_expert_inputs(device, dtype):
    """HF's router: topk(1) of the router logits, sigmoid in float32 cast to the activation dtype,
    the repeated input scaled by the [E, N] scores; our bucketed rows are HF's nonzero expert inputs."""
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(hidden_size=48, intermediate_size=32, num_local_experts=7, num_experts_per_tok=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    router = llama4.Llama4Router(cfg).to(device=device, dtype=dtype)
    x = torch.randn(300, 48, device=device).to(dtype)
    with torch.no_grad():
        hf_scores, hf_logits = router(x)  # [N, E] scores (0 off the top expert), [N, E] logits
        routed, scores, order, slot, ends = moe_route(x, hf_logits)
    hf_expert = hf_logits.float().topk(1, dim=-1).indices[:, 0]
    tied = (hf_logits == hf_logits.max(-1, keepdim=True).values).sum(-1) > 1
    keep = ~tied  # HF's topk leaves tied logits' order unspecified
    assert torch.equal(hf_logits.argmax(-1)[keep], hf_expert[keep])
    expert_of_row = torch.bucketize(torch.arange(300, device=device), ends.long(), right=True)
    assert torch.equal(expert_of_row[slot][keep], hf_expert[keep])
    hf_token_scores = hf_scores.gather(-1, hf_expert[:, None])[:, 0]
    torch.testing.assert_close(scores[keep], hf_token_scores[keep], rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    hf_inputs = x * hf_token_scores[:, None]  # HF: hidden_states.repeat(E, 1) * router_scores
    torch.testing.assert_close(routed[slot][keep], hf_inputs[keep], **tol(dtype))


@pytest.mark.parametrize("seed", range(8))
def test_bucketing_is_a_stable_sort_by_expert(seed):
    """Seeded token counts across the 256-token chunks, expert counts 1 to past a warp, tied logits:
    token_order is the stable argsort of the first maximal expert, token_slot its inverse,
    expert_ends the cumulative counts, the rows x * score; the emulated CUDA kernels equal the CPU
    kernel bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n = [0, 1, 255, 256, 257, 1000, int(torch.randint(0, 1500, (1,), generator=g))][seed % 7]
    e = [1, 3, 16, 33, 130][int(torch.randint(0, 5, (1,), generator=g))]
    x, logits = _inputs(n, 24, e, seed=seed, ties=seed % 2 == 0)
    routed, scores, order, slot, ends = moe_route(x, logits)
    expert = logits.argmax(-1) if n else torch.zeros(0, dtype=torch.int64)
    assert torch.equal(order, torch.argsort(expert, stable=True))
    assert torch.equal(order[slot], torch.arange(n)) and torch.equal(slot[order], torch.arange(n))
    assert ends.dtype == torch.int32 and torch.equal(ends, torch.cumsum(torch.bincount(expert, minlength=e), 0).int())
    # libm's expf vs torch's vectorised sigmoid: an ulp apart at most
    torch.testing.assert_close(scores, torch.sigmoid(logits.gather(-1, expert[:, None])[:, 0]), rtol=2.4e-7, atol=0)
    assert torch.equal(routed, (x * scores[:, None])[order])
    emu = _emulator()
    for schedule in (0, 1):
        with testing.emulator_schedule(schedule):
            for a, b in zip(emu.moe_route(x, logits), (routed, scores, order, slot, ends)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_and_nan_take_the_first_maximum(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, float("nan"), float("nan"), 1.0],
                           [float("-inf")] * 4, [float("inf"), 0.0, float("inf"), 1.0]], device=device)
    x = torch.ones(5, 2, device=device)
    _, scores, order, slot, ends = moe_route(x, logits)
    expert = torch.bucketize(slot, ends.long(), right=True)
    assert expert.tolist() == [1, 0, 1, 0, 0] == logits.argmax(-1).tolist()
    assert torch.isnan(scores[2]) and scores[3] == 0 and scores[4] == 1


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("with_scores", [False, True])
def test_forward_and_backward_match_reference(device, dtype, with_scores):
    """Gradients of x and of the selected logits (through the rows and, when used, the scores)."""
    x, logits = _inputs(333, 20, 5, device, dtype, torch.float32 if dtype != torch.float64 else dtype, seed=7)
    leaves = [t.detach().requires_grad_() for t in (x, logits)]
    ref_leaves = [t.detach().requires_grad_() for t in (x, logits)]
    out, ref = moe_route(*leaves), reference.moe_route(*ref_leaves)
    for o, r in zip(out, ref):
        if o.is_floating_point():
            torch.testing.assert_close(o, r, **tol(dtype))
        else:
            assert torch.equal(o, r)
    g = torch.Generator().manual_seed(2)
    gr = torch.randn(out[0].shape, generator=g).to(device=device, dtype=dtype)
    gs = torch.randn(out[1].shape, generator=g).to(device=device, dtype=dtype)

    def loss(o):
        return (o[0].float() * gr.float()).sum() + ((o[1].float() * gs.float()).sum() if with_scores else 0)

    got = torch.autograd.grad(loss(out), leaves)
    want = torch.autograd.grad(loss(ref), ref_leaves)
    loose = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-6)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **loose)
    unselected = torch.ones_like(logits, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), False)
    assert not got[1][unselected].any()  # only the selected logits get a gradient


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_combine_is_the_inverse_scatter(device, dtype):
    x, logits = _inputs(270, 16, 4, device, dtype, seed=3)
    shared = torch.randn(270, 16, device=device).to(dtype)
    routed, _, order, slot, _ = moe_route(x, logits)
    out = moe_combine(shared, routed, slot, order)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = (shared.to(acc) + (x.to(acc) * moe_route(x, logits)[1].to(acc)[:, None]).to(dtype).to(acc)).to(dtype)
    assert torch.equal(out, want)
    leaves = [t.detach().requires_grad_() for t in (shared, routed)]
    grad = torch.randn(270, 16, device=device).to(dtype)
    gs, ge = torch.autograd.grad(moe_combine(*leaves, slot, order), leaves, grad)
    assert torch.equal(gs, grad) and torch.equal(ge, grad[order])


def _bad_route(**overrides):
    args = dict(x=torch.randn(6, 4), router_logits=torch.randn(6, 3))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(x=torch.randn(2, 6, 4)), r"`x` must have shape \[N, H\]"),
        (dict(router_logits=torch.randn(5, 3)), r"`router_logits` must have shape \[N, E\] = \[6, E\]"),
        (dict(router_logits=torch.randn(6, 0)), r"at least one expert"),
        (dict(x=torch.ones(6, 4, dtype=torch.int64)), r"`x` must be float32"),
        (dict(router_logits=torch.ones(6, 3, dtype=torch.int32)), r"`router_logits` must be a float32"),
        (dict(router_logits=torch.randn(6, 3, device="meta")), r"`x` and `router_logits` must be on the same device"),
        (dict(x=torch.zeros(1).expand(2**31, 4), router_logits=torch.zeros(1).expand(2**31, 2)),
         r"at most 2\^31 - 1 tokens"),
    ],
)
def test_bad_route_inputs(overrides, match):
    args = _bad_route(**overrides)
    with pytest.raises(RuntimeError, match=match):
        moe_route(**args)
    if "same device" in match:
        return
    meta = {n: t.to("meta") for n, t in args.items()}
    with pytest.raises(RuntimeError, match=match):
        moe_route(**meta)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s, o: (s.clone().index_fill_(0, torch.tensor([0]), 9), o), r"`token_slot` must hold row indices in \[0, 5\)"),
        (lambda s, o: (s.clone().index_fill_(0, torch.tensor([0]), -1), o), r"`token_slot` must hold row indices"),
        (lambda s, o: (torch.where(s == s[1], s[0], s), o), r"`token_order` must be the inverse of `token_slot`"),
        (lambda s, o: (s, o.roll(1)), r"`token_order` must be the inverse of `token_slot`"),
        (lambda s, o: (s.int(), o), r"`token_slot` must be an int64 tensor"),
        (lambda s, o: (s, o[:4]), r"`token_order` must have shape \[N\] = \[5\]"),
    ],
)
def test_combine_rejects_bad_permutations(mutate, match):
    x, logits = _inputs(5, 3, 2, seed=1)
    routed, _, order, slot, _ = moe_route(x, logits)
    bad_slot, bad_order = mutate(slot, order)
    with pytest.raises(RuntimeError, match=match):
        moe_combine(x, routed, bad_slot, bad_order)


def test_backward_ops_reject_bad_permutations():
    x, logits = _inputs(5, 3, 2, seed=1)
    routed, _, order, slot, _ = moe_route(x, logits)
    dup = slot.clone()
    dup[0] = dup[1]
    with pytest.raises(RuntimeError, match=r"`token_slot` must be a permutation"):
        torch.ops.vitops._moe_route_backward(routed, None, x, logits, dup)
    with pytest.raises(RuntimeError, match=r"`token_order` must hold indices in \[0, 5\)"):
        torch.ops.vitops._moe_combine_backward(routed, order.clone().fill_(7))
    with pytest.raises(RuntimeError, match=r"`grad_scores` must be None or have shape \[N\] = \[5\]"):
        torch.ops.vitops._moe_route_backward(routed, torch.zeros(4), x, logits, slot)


@pytest.mark.parametrize("backend", ["emulated", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cuda_out_of_range_indices_give_nan_rows(backend):
    """The CUDA kernels cannot check the permutations without a host sync: an index out of [0, N)
    reads nothing and gives a NaN row (no out-of-bounds access, no uninitialised output)."""
    emu = _emulator() if backend == "emulated" else torch.ops.vitops
    device = "cpu" if backend == "emulated" else "cuda"
    x, logits = _inputs(6, 5, 3, device, seed=4)
    routed, _, order, slot, _ = moe_route(x, logits)
    bad_slot, bad_order = slot.clone(), order.clone()
    bad_slot[2], bad_order[4] = 6, -(2**63)
    rows = torch.arange(6, device=device)
    out = emu.moe_combine(x, routed, bad_slot, order)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[rows != 2]).any()
    back = emu._moe_combine_backward(routed, bad_order)
    assert torch.isnan(back[4]).all() and not torch.isnan(back[rows != 4]).any()
    gx, gl = emu._moe_route_backward(routed, None, x, logits, bad_slot)
    assert torch.isnan(gx[2]).all() and not torch.isnan(gx[rows != 2]).any()

"""merge_soft_tokens (the multimodal merge) and vitops.serving.soft_token_indices.

The op against the reference over seeded random shapes ([T, H] and [B, S, H], int32 and int64
indices, skipped negative entries, every dtype), forward and backward, bitwise (the op moves values);
empty and strided inputs, the wrapper's dtype/device cast, bad inputs from the real and the fake
kernels, index values the CPU kernels refuse (past the rows, a row written twice), gradcheck,
opcheck and torch.compile (static and dynamic, with the index builder in the graph: no host read).
HF parity: merge_soft_tokens(embeds, features, soft_token_indices(ids, image_token_id)) is bitwise
HF's own masked_scatter, and the embeddings HF's forward hands its language model, for tiny random
Gemma 4, Gemma 3 and Llama 4 models (batches of 2, several images per sequence). The window / ragged
semantics against a direct model of MAX's compute_multimodal_merge_indices, and a chunked prefill
(merged chunk by chunk) against the whole prompt merged at once."""

from __future__ import annotations

import random

import pytest
import torch

import vitops
from vitops import reference
from vitops.serving import merge as serving_merge
from vitops.serving.merge import SKIP, check_soft_token_count, merge_soft_tokens, soft_token_indices

from _utils import DEVICES, device_dtypes, noncontiguous

op = torch.ops.vitops.merge_soft_tokens.default
backward_op = torch.ops.vitops._merge_soft_tokens_backward.default
INT32_MIN, INT64_MIN = -(2**31), -(2**63)


def _case(seed, device="cpu", dtype=torch.float32, index_dtype=None, batched=None):
    """Seeded random embeddings ([T, H] or [B, S, H]), soft tokens and unique in-range indices in random
    order with skipped negative entries mixed in."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    h = rng.choice([1, 3, 8, 40, 64, rng.randint(1, 90)])
    batched = rng.random() < 0.5 if batched is None else batched
    shape = (rng.randint(1, 3), rng.randint(1, 30), h) if batched else (rng.randint(1, 120), h)
    rows = shape[0] * shape[1] if batched else shape[0]
    written = torch.randperm(rows, generator=g)[: rng.randint(0, rows)].tolist()
    index_dtype = index_dtype or rng.choice([torch.int32, torch.int64])
    low = INT64_MIN if index_dtype == torch.int64 else INT32_MIN
    entries = written + [rng.choice([-1, INT32_MIN, low, -rng.randint(2, 999)]) for _ in range(rng.randint(0, 6))]
    rng.shuffle(entries)
    x = (2 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    soft = (2 * torch.randn(len(entries), h, generator=g)).to(device=device, dtype=dtype)
    return x, soft, torch.tensor(entries, dtype=index_dtype, device=device)


def _grads(fn, x, soft, idx, grad):
    leaves = [x.detach().clone().requires_grad_(), soft.detach().clone().requires_grad_()]
    out = fn(leaves[0], leaves[1], idx)
    return (out, *torch.autograd.grad(out, leaves, grad))


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("seed", range(6))
def test_forward_and_backward_match_reference(seed, device, dtype):
    x, soft, idx = _case(seed, device, dtype)
    grad = torch.randn(x.shape, device=device).to(dtype)
    out, gx, gs = _grads(merge_soft_tokens, x, soft, idx, grad)
    ref, rgx, rgs = _grads(reference.merge_soft_tokens, x, soft, idx, grad)
    for a, b in ((out, ref), (gx, rgx), (gs, rgs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    # what the reference encodes, spelled out: written rows are soft tokens, the rest the embeddings
    flat, flat_grad = out.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=device)
    for j, row in enumerate(idx.tolist()):
        if row >= 0:
            keep[row] = False
            assert torch.equal(flat[row], soft[j]) and torch.equal(gs[j], flat_grad[row])
        else:
            assert not gs[j].any()
    assert torch.equal(flat[keep], x.reshape(-1, x.shape[-1])[keep])
    assert not gx.reshape(-1, x.shape[-1])[~keep].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [-1, INT32_MIN, INT64_MIN, -(2**40)])
def test_negative_indices_are_skipped(device, skip):
    x = torch.randn(2, 4, 6, device=device)
    soft = torch.randn(3, 6, device=device)
    dtype = torch.int32 if -(2**31) <= skip else torch.int64
    idx = torch.tensor([5, skip, 0], dtype=dtype, device=device)
    out = merge_soft_tokens(x, soft, idx)
    want = x.clone()
    want[1, 1], want[0, 0] = soft[0], soft[2]
    assert torch.equal(out, want)
    gx, gs = backward_op(torch.ones_like(x), idx)
    assert not gs[1].any() and gs[[0, 2]].eq(1).all()
    assert gx.sum() == x[..., 0].numel() * 6 - 12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,n", [((0, 8), 0), ((0, 5, 8), 0), ((3, 0, 8), 2), ((5, 8), 0), ((5, 0), 3),
                                     ((2, 3, 0), 4), ((0, 0), 0)])
def test_empty_inputs(device, shape, n):
    x = torch.randn(shape, device=device)
    soft = torch.randn(n, shape[-1], device=device)
    rows = x[..., 0].numel() if shape[-1] else (shape[0] if len(shape) == 2 else shape[0] * shape[1])
    idx = torch.tensor([j if j < rows else SKIP for j in range(n)], dtype=torch.int64, device=device)
    out, gx, gs = _grads(merge_soft_tokens, x, soft, idx, torch.randn(shape, device=device))
    assert torch.equal(out, reference.merge_soft_tokens(x, soft, idx))
    assert out.shape == x.shape and gx.shape == x.shape and gs.shape == soft.shape
    assert not gs[idx < 0].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_noncontiguous_inputs(device, index_dtype):
    x, soft, idx = _case(11, device, torch.bfloat16, index_dtype, batched=True)
    strided = (x.transpose(0, 1).contiguous().transpose(0, 1), noncontiguous(soft, 0), noncontiguous(idx, 0))
    assert not any(t.is_contiguous() for t in strided[1:])
    grad = torch.randn(x.shape, device=device).to(x.dtype)
    for a, b in zip(_grads(merge_soft_tokens, *strided, noncontiguous(grad, 1)),
                    _grads(merge_soft_tokens, x, soft, idx, grad)):
        assert torch.equal(a, b)
    # the backward op reads a strided gradient too
    for a, b in zip(backward_op(noncontiguous(grad, -1), strided[2]), backward_op(grad, idx)):
        assert torch.equal(a, b)


def test_wrapper_casts_soft_tokens_as_hf_does():
    """HF casts the features with .to(embeds.device, embeds.dtype) before masked_scatter: the wrapper
    does the same, differentiably (the gradient comes back in the features' dtype)."""
    x, _, idx = _case(3, dtype=torch.bfloat16, batched=True)
    soft = torch.randn(idx.shape[0], x.shape[-1], dtype=torch.float32, requires_grad=True)
    out = merge_soft_tokens(x, soft, idx)
    assert torch.equal(out, reference.merge_soft_tokens(x, soft.to(torch.bfloat16), idx))
    (g,) = torch.autograd.grad(out.float().sum(), soft)
    assert g.dtype == torch.float32 and torch.equal(g, (idx >= 0).float()[:, None].expand_as(g))
    with pytest.raises(RuntimeError, match=r"`soft_tokens` must have the dtype of `inputs_embeds` \(bfloat16\), got "
                                           r"float32 \(the wrapper vitops.merge_soft_tokens casts it\)"):
        op(x, soft.detach(), idx)


@pytest.mark.cuda
def test_wrapper_moves_soft_tokens_to_the_embeddings_device():
    x, soft, idx = _case(4, "cuda", torch.float16, batched=True)
    out = merge_soft_tokens(x, soft.float().cpu(), idx)
    assert torch.equal(out, merge_soft_tokens(x, soft, idx))


def test_exported_names():
    assert vitops.merge_soft_tokens is vitops.ops.merge_soft_tokens is merge_soft_tokens
    assert vitops.serving.merge_soft_tokens is merge_soft_tokens
    assert vitops.serving.soft_token_indices is soft_token_indices is serving_merge.soft_token_indices
    assert vitops.serving.check_soft_token_count is check_soft_token_count


# ---------------------------------------------------------------------------------------------
# bad input: real and fake kernels
# ---------------------------------------------------------------------------------------------
def _bad(**overrides):
    args = dict(inputs_embeds=torch.randn(2, 5, 4), soft_tokens=torch.randn(3, 4), indices=torch.tensor([0, 7, 9]))
    args.update(overrides)
    return args


BAD_INPUTS = [
    (dict(inputs_embeds=torch.randn(20)), r"`inputs_embeds` must have shape \[T, H\] or \[B, S, H\].*got \[20\]"),
    (dict(inputs_embeds=torch.randn(1, 2, 5, 4)), r"`inputs_embeds` must have shape \[T, H\] or \[B, S, H\]"),
    (dict(inputs_embeds=torch.ones(2, 5, 4, dtype=torch.int32)), r"`inputs_embeds` must be float32, bfloat16, float16"),
    (dict(soft_tokens=torch.randn(3, 5)), r"`soft_tokens` must have shape \[N, H\] = \[N, 4\].*got \[3, 5\]"),
    (dict(soft_tokens=torch.randn(1, 3, 4)), r"`soft_tokens` must have shape \[N, H\] = \[N, 4\]"),
    (dict(soft_tokens=torch.randn(3, 4, dtype=torch.float64)),
     r"`soft_tokens` must have the dtype of `inputs_embeds` \(float32\), got float64"),
    (dict(soft_tokens=torch.randn(3, 4, device="meta")),
     r"`inputs_embeds` and `soft_tokens` must be on the same device, got cpu and meta"),
    (dict(indices=torch.tensor([[0, 7, 9]])), r"`indices` must have shape \[N\] \(one row index per soft token\)"),
    (dict(indices=torch.tensor([0.0, 7.0, 9.0])), r"`indices` must be an int64 or int32 tensor, got float32"),
    (dict(indices=torch.tensor([0, 7, 9], dtype=torch.int16)), r"`indices` must be an int64 or int32 tensor, got int16"),
    (dict(indices=torch.tensor([0, 7, 9], device="meta")),
     r"`inputs_embeds` and `indices` must be on the same device, got cpu and meta"),
    (dict(indices=torch.tensor([0, 7])), r"`indices` must have one entry per row of `soft_tokens` \(\[3\]\), got \[2\]"),
    (dict(soft_tokens=torch.zeros(1, 1).expand(2**31, 4), indices=torch.zeros(1, dtype=torch.int64).expand(2**31)),
     r"at most 2\^31 - 1 soft tokens, got N = 2147483648"),
    (dict(inputs_embeds=torch.zeros(1, 1, 1).expand(0, 2**62, 4), soft_tokens=torch.zeros(0, 4),
          indices=torch.zeros(0, dtype=torch.int64)), r"the output would have shape \[0, 4611686018427387904, 4\]"),
]


@pytest.mark.parametrize("overrides,match", BAD_INPUTS)
def test_bad_inputs_real_and_fake(overrides, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match=r"^vitops\.merge_soft_tokens: " + match):
        op(*args.values())
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in args.values()]
    with mode, pytest.raises(RuntimeError, match=r"^vitops\.merge_soft_tokens: " + match):
        op(*fake)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(20), torch.tensor([1])), r"`grad_output` must have shape \[T, H\] or \[B, S, H\]"),
    ((torch.ones(5, 4, dtype=torch.int64), torch.tensor([1])), r"`grad_output` must be float32"),
    ((torch.randn(5, 4), torch.tensor([[1]])), r"`indices` must have shape \[N\]"),
    ((torch.randn(5, 4), torch.tensor([1.0])), r"`indices` must be an int64 or int32 tensor"),
    ((torch.randn(5, 4), torch.tensor([1], device="meta")), r"`grad_output` and `indices` must be on the same device"),
    ((torch.zeros(1, 1, 1).expand(0, 2**62, 2), torch.tensor([1])), r"grad_inputs_embeds would have shape"),
])
def test_backward_bad_inputs_real_and_fake(args, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError, match=r"^vitops\._merge_soft_tokens_backward: " + match):
        backward_op(*args)
    mode = FakeTensorMode()
    with mode, pytest.raises(RuntimeError, match=r"^vitops\._merge_soft_tokens_backward: " + match):
        backward_op(*[mode.from_tensor(t) for t in args])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_rejects_rows_past_the_end_and_rows_written_twice(index_dtype):
    """Checked on the CPU (naming the positions) and not by the fake kernel (values); the CUDA kernels
    skip / resolve them instead (test_cuda_emulated.py, test_cuda_resolves_bad_index_values)."""
    x, soft = torch.randn(2, 5, 4), torch.randn(4, 4)
    big = 2**31 - 1 if index_dtype == torch.int32 else 2**63 - 1
    cases = [
        ([0, 10, 3, 11], r"`indices` must hold row indices below the row count 10 of the embeddings \(negative: "
                         r"skipped\), got indices\[1\] = 10"),
        ([0, big, 3, 1], rf"`indices` must hold row indices below.*got indices\[1\] = {big}"),
        ([4, 1, SKIP, 4], r"`indices` must address each row at most once, but indices\[0\] and indices\[3\] are both 4"),
        ([2, 7, 7, 2], r"`indices` must address each row at most once, but indices\[1\] and indices\[2\] are both 7"),
    ]
    for entries, match in cases:
        idx = torch.tensor(entries, dtype=index_dtype)
        with pytest.raises(RuntimeError, match=r"^vitops\.merge_soft_tokens: " + match):
            merge_soft_tokens(x, soft, idx)
        with pytest.raises(RuntimeError, match=r"^vitops\._merge_soft_tokens_backward: " + match):
            backward_op(x, idx)
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        with mode:  # metadata only: the fake kernel accepts it
            assert op(*(mode.from_tensor(t) for t in (x, soft, idx))).shape == x.shape


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_float64(seed):
    x, soft, idx = _case(seed, dtype=torch.float64)
    x, soft = x[..., :5].clone().requires_grad_(), soft[..., :5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: merge_soft_tokens(a, b, idx), (x, soft))
    assert torch.autograd.gradgradcheck(lambda a, b: merge_soft_tokens(a, b, idx), (x, soft))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_opcheck(device, seed):
    x, soft, idx = _case(seed + 20, device)
    for requires_grad in (False, True):
        torch.library.opcheck(op, (x.clone().requires_grad_(requires_grad), soft.clone().requires_grad_(requires_grad),
                                   idx))
    torch.library.opcheck(backward_op, (torch.randn_like(x), idx))


def _merge_from_ids(embeds, features, ids):
    return merge_soft_tokens(embeds, features, soft_token_indices(ids, 9, features.shape[0]))


def _prompts(seed, batch, seq_len, images):
    """[B, S] ids with `images` runs of placeholders (id 9) of random lengths, and their features."""
    rng = random.Random(seed)
    ids = torch.randint(10, 50, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    for _ in range(images):
        b, n = rng.randrange(batch), rng.randint(1, seq_len // 3)
        s = rng.randrange(seq_len - n + 1)
        ids[b, s : s + n] = 9
    return ids


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_the_index_builder(dynamic):
    """The hot path (indices built with num_soft_tokens, then the merge) compiles into one graph: no
    data-dependent op (nonzero, .item()) and no graph break; forward and backward match eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_merge_from_ids, fullgraph=True, dynamic=dynamic)
    for seed, (b, s, h) in enumerate([(2, 24, 16), (3, 40, 16), (1, 17, 8)]):
        ids = _prompts(seed, b, s, 3)
        n = int((ids == 9).sum())
        embeds = torch.randn(b, s, h, requires_grad=True)
        feats = torch.randn(n, h, requires_grad=True)
        out = compiled(embeds, feats, ids)
        want = embeds.masked_scatter((ids == 9)[..., None], feats)
        assert torch.equal(out, want)
        grads = torch.autograd.grad((out * out).sum(), (embeds, feats))
        want_grads = torch.autograd.grad((want * want).sum(), (embeds, feats))
        for a, w in zip(grads, want_grads):
            assert torch.equal(a, w)


# ---------------------------------------------------------------------------------------------
# soft_token_indices
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_indices_are_hf_placeholder_order(seed):
    """Flat positions of the placeholder mask, batch-major: masked_scatter's order, with or without
    num_soft_tokens; [S] ids are one sequence."""
    ids = _prompts(seed, 1 + seed % 3, 30, 4)
    want = (ids.reshape(-1) == 9).nonzero()[:, 0]
    n = want.shape[0]
    assert torch.equal(soft_token_indices(ids, 9), want)
    assert torch.equal(soft_token_indices(ids, 9, n), want)
    assert torch.equal(soft_token_indices(ids[0], 9), (ids[0] == 9).nonzero()[:, 0])
    # more soft tokens than placeholders: the rest are skipped; fewer: the surplus placeholders get none
    more = soft_token_indices(ids, 9, n + 3)
    assert torch.equal(more[:n], want) and more[n:].eq(SKIP).all()
    assert torch.equal(soft_token_indices(ids, 9, max(n - 2, 0)), want[: max(n - 2, 0)])
    idx, count = soft_token_indices(ids, 9, n + 3, return_count=True)
    assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == n
    check_soft_token_count(count, n)
    with pytest.raises(ValueError, match=rf"Image features and image tokens do not match, tokens: {n}, features: {n + 3}"):
        check_soft_token_count(count, n + 3)
    # int32 for MAX's kernels: SKIP is INT32_MIN and stays skipped
    assert more.int()[n:].eq(-(2**31)).all()


def _max_merge_indices(requests):
    """MAX's compute_multimodal_merge_indices (facts file, D6), written out: per request the placeholder
    positions minus processed_length; those inside [0, active_length) shifted by the running batch
    offset (the sum of the previous requests' active lengths), the rest INT32_MIN."""
    out, batch_offset = [], 0
    for positions, processed_length, active_length in requests:
        for p in positions:
            q = p - processed_length
            out.append(q + batch_offset if 0 <= q < active_length else INT32_MIN)
        batch_offset += active_length
    return out


@pytest.mark.parametrize("seed", range(8))
def test_windows_of_a_ragged_batch_match_max(seed):
    """Random prompts (a ragged batch), each with a window [processed, processed + active): MAX's
    indices, given as ints, lists or tensors; the rows also come out right for a padded [B, S] copy."""
    rng = random.Random(seed)
    prompts, requests, starts, stops = [], [], [], []
    for b in range(rng.randint(1, 4)):
        length = rng.randint(1, 40)
        ids = _prompts(seed * 10 + b, 1, length, rng.randint(0, 3))[0] if length >= 3 else torch.full((length,), 9)
        processed = rng.randint(0, length)
        active = rng.randint(0, length - processed + 2)  # a window may pass the prompt (decode steps)
        prompts.append(ids)
        requests.append(((ids == 9).nonzero()[:, 0].tolist(), processed, active))
        starts.append(processed)
        stops.append(processed + active)
    want = torch.tensor(_max_merge_indices(requests), dtype=torch.int64)
    n = want.shape[0]
    assert torch.equal(soft_token_indices(prompts, 9, start=starts, stop=stops), want)
    assert torch.equal(soft_token_indices(prompts, 9, n, start=torch.tensor(starts), stop=torch.tensor(stops)), want)
    # the same prompts padded to [B, S] (padding is not a placeholder): the same rows
    padded = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=0)
    assert torch.equal(soft_token_indices(padded, 9, n, start=starts, stop=stops), want)
    # a single window for every sequence
    assert torch.equal(soft_token_indices(prompts, 9, start=2, stop=5),
                       torch.tensor(_max_merge_indices([(r[0], 2, 3) for r in requests]), dtype=torch.int64))


@pytest.mark.parametrize("seed", range(4))
def test_chunked_prefill_equals_one_merge(seed):
    """A ragged batch prefilled in chunks (each step's embeddings are the requests' active rows back to
    back, the soft tokens all of theirs, out-of-chunk ones skipped) gives the rows of one merge of the
    whole prompts."""
    rng = random.Random(seed)
    prompts = [_prompts(seed * 7 + b, 1, rng.randint(5, 30), rng.randint(1, 3))[0] for b in range(rng.randint(1, 3))]
    h = 12
    embeds = [torch.randn(len(p), h) for p in prompts]
    feats = torch.randn(int(sum((p == 9).sum() for p in prompts)), h)
    whole = merge_soft_tokens(torch.cat(embeds), feats, soft_token_indices(prompts, 9))
    done = [0] * len(prompts)
    pieces = [[] for _ in prompts]
    while any(d < len(p) for d, p in zip(done, prompts)):
        chunk = [min(rng.randint(1, 8), len(p) - d) for d, p in zip(done, prompts)]
        step = torch.cat([e[d : d + c] for e, d, c in zip(embeds, done, chunk)])
        idx = soft_token_indices(prompts, 9, feats.shape[0], start=done, stop=[d + c for d, c in zip(done, chunk)])
        out = merge_soft_tokens(step, feats, idx)
        offset = 0
        for b, c in enumerate(chunk):
            pieces[b].append(out[offset : offset + c])
            offset += c
        done = [d + c for d, c in zip(done, chunk)]
    assert torch.equal(torch.cat([torch.cat(p) for p in pieces]), whole)


def test_row_offsets_place_windows_in_a_padded_step():
    """Explicit row offsets: each request's chunk at row b * W of a padded [B, W, H] step."""
    prompts = [torch.tensor([1, 9, 9, 2, 9, 3]), torch.tensor([9, 9, 4])]
    idx = soft_token_indices(prompts, 9, 5, start=[1, 0], stop=[4, 2], row_offsets=[0, 4])
    assert idx.tolist() == [0, 1, SKIP, 4, 5]
    step = torch.randn(2, 4, 3)
    feats = torch.randn(5, 3)
    out = merge_soft_tokens(step, feats, idx)
    assert torch.equal(out[0, :2], feats[:2]) and torch.equal(out[1, :2], feats[3:5])
    assert torch.equal(out[0, 2:], step[0, 2:]) and torch.equal(out[1, 2:], step[1, 2:])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_ids=torch.tensor([1.0, 9.0]), token_id=9), TypeError, r"`input_ids` must be an integer tensor"),
    (dict(input_ids=torch.ones(2, 2, 2, dtype=torch.int64), token_id=9), ValueError, r"shape \[S\] or \[B, S\]"),
    (dict(input_ids=[], token_id=9), TypeError, r"non-empty list of 1-D tensors"),
    (dict(input_ids=[torch.tensor([1]), torch.tensor([[2]])], token_id=9), ValueError, r"`input_ids\[1\]` must be"),
    (dict(input_ids=torch.tensor([1, 9]), token_id=9.0), TypeError, r"`token_id` must be an int"),
    (dict(input_ids=torch.tensor([1, 9]), token_id=9, num_soft_tokens=-1), ValueError, r"`num_soft_tokens` must be"),
    (dict(input_ids=torch.tensor([1, 9]), token_id=9, start=-1), ValueError, r"`start` must be >= 0, got -1"),
    (dict(input_ids=torch.tensor([[1, 9]] * 2), token_id=9, start=[3, 0], stop=[2, 2]), ValueError,
     r"`stop` must be >= `start`, got the window \[3, 2\) for sequence 0"),
    (dict(input_ids=torch.tensor([[1, 9]] * 2), token_id=9, start=[0, 0, 0]), ValueError,
     r"`start` must have one entry per sequence \(2\), got 3"),
    (dict(input_ids=torch.tensor([[1, 9]] * 2), token_id=9, stop=torch.tensor([1.0, 2.0])), ValueError,
     r"`stop` must be an int, a list of ints or a 1-D integer tensor"),
    (dict(input_ids=torch.tensor([[1, 9]] * 2), token_id=9, row_offsets=torch.tensor([0, 1, 2])), ValueError,
     r"`row_offsets` must have one entry per sequence \(2\), got 3"),
])
def test_index_builder_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        soft_token_indices(**kwargs)


@pytest.mark.cuda
def test_cuda_hot_path_does_not_sync():
    ids = _prompts(3, 2, 40, 4).cuda()
    n = int((ids == 9).sum())
    embeds, feats = torch.randn(2, 40, 32, device="cuda"), torch.randn(n, 32, device="cuda")
    starts = torch.tensor([3, 0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, count = soft_token_indices(ids, 9, n, return_count=True)
        out = merge_soft_tokens(embeds, feats, idx)
        windowed = soft_token_indices(ids, 9, n, start=starts, stop=[40, 30])
        grads = torch.autograd.grad(merge_soft_tokens(embeds.requires_grad_(), feats, windowed).sum(), embeds)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, embeds.detach().masked_scatter((ids == 9)[..., None], feats)) and int(count) == n
    assert grads[0].shape == embeds.shape


@pytest.mark.cuda
def test_cuda_resolves_bad_index_values():
    """No host sync, so no error: indices past the rows are skipped and the largest position wins a
    row written twice (forward and backward alike), as the reference says."""
    x, soft = torch.randn(2, 5, 8, device="cuda"), torch.randn(6, 8, device="cuda")
    idx = torch.tensor([3, 10, 3, 2**40, 7, 3], device="cuda")
    out = op(x, soft, idx)
    assert torch.equal(out, reference.merge_soft_tokens(x, soft, idx))
    assert torch.equal(out.view(-1, 8)[3], soft[5])
    grad = torch.randn_like(x)
    gx, gs = backward_op(grad, idx)
    assert torch.equal(gs[5], grad.view(-1, 8)[3]) and not gs[[0, 1, 2, 3]].any()
    assert not gx.view(-1, 8)[[3, 7]].any()


# ---------------------------------------------------------------------------------------------
# HF parity: Gemma 4, Gemma 3, Llama 4 (tiny random models, batch 2, several images per sequence)
# ---------------------------------------------------------------------------------------------
def _gemma4_images(grids, seed):
    """Gemma 4 patches [n, 64, 48] and positions for images of (cols, rows) patch grids, padded as
    HF's processor pads (zero rows, (-1, -1) positions); pooling 2 x 2: cols * rows / 4 soft tokens."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(grids), 64, 48)
    pos = torch.full((len(grids), 64, 2), -1, dtype=torch.int64)
    for i, (cols, rows) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos[i, : cols * rows] = torch.stack([xs.flatten(), ys.flatten()], -1)
        pixels[i, : cols * rows] = torch.rand(cols * rows, 48, generator=g)
    return dict(pixel_values=pixels, image_position_ids=pos), [c * r // 4 for c, r in grids]


def _hf_batch(family, seed=0):
    """A tiny HF model and a batch of 2 prompts: three images in the first sequence, one in the second
    (padded), HF's image token between boi / eoi."""
    import _hf_tiny

    model, _ = _hf_tiny.build(family, seed=seed)
    if family == "gemma4":
        images, tokens = _gemma4_images([(8, 8), (6, 4), (4, 4), (8, 6)], seed)
    else:
        g = torch.Generator().manual_seed(seed)
        images, tokens = dict(pixel_values=torch.randn(4, 3, 32, 32, generator=g)), [16] * 4
    img, boi, eoi = _hf_tiny.IMAGE_TOKEN, _hf_tiny.BOI, _hf_tiny.EOI
    seqs = [[2, 5], [2]]
    for i, n in enumerate(tokens):
        seqs[0 if i < 3 else 1] += [boi] + [img] * n + [eoi, 7 + i]
    length = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    inputs = dict(input_ids=ids, attention_mask=mask, **images)
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == img).long()
    return model, inputs


class _Captured(Exception):
    pass


def _language_model_embeddings(model, inputs):
    """The inputs_embeds HF's forward hands its language model (the forward stops there)."""
    lm = model.language_model if hasattr(model, "vision_model") else model.model.language_model
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def _placeholder_mask(model, ids, embeds, features):
    """HF's own placeholder mask, expanded to the embeddings."""
    if type(model).__name__.startswith("Gemma4"):
        mask = model.model.get_placeholder_mask(ids, embeds)[0][..., None]
    else:
        owner = model if hasattr(model, "vision_model") else model.model
        mask = owner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    return mask.expand_as(embeds)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # _hf_tiny.cast restores them
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["gemma4", "gemma3", "llama4"])
def test_hf_parity(family, dtype):
    """Bitwise: HF's masked_scatter with HF's placeholder mask, and the merged embeddings of HF's own
    forward; the features come from HF's vision path (tower + projector) of the same model."""
    import _hf_tiny

    model, inputs = _hf_batch(family)
    model = _hf_tiny.cast(model, dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    ids = inputs["input_ids"]
    with torch.no_grad():
        features = _hf_tiny.image_features(model, inputs)
        text_only = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_position_ids")}
        embeds = _language_model_embeddings(model, text_only)  # HF's embeddings before the merge
    idx = soft_token_indices(ids, model.config.image_token_id, features.shape[0])
    assert idx.shape[0] == int((ids == model.config.image_token_id).sum()) and (idx >= 0).all()
    ours = merge_soft_tokens(embeds, features, idx)
    with torch.no_grad():
        hf = embeds.masked_scatter(_placeholder_mask(model, ids, embeds, features), features.to(embeds.dtype))
        hf_forward = _language_model_embeddings(model, inputs)
    assert ours.dtype == embeds.dtype == dtype
    assert torch.equal(ours, hf)
    assert torch.equal(ours, hf_forward)
    # float32 features into bfloat16 embeddings: the wrapper's cast is HF's .to(embeds.dtype)
    if dtype == torch.bfloat16:
        f32 = features.float() + 1e-3
        assert torch.equal(merge_soft_tokens(embeds, f32, idx),
                           embeds.masked_scatter(_placeholder_mask(model, ids, embeds, f32), f32.to(dtype)))

"""Shared test helpers: devices, dtypes, tolerances, non-contiguous copies."""

from __future__ import annotations

import pytest
import torch

from vitops.ops._manifest import DEFAULT_TOLERANCES

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def device_dtypes():
    """(device, dtype) pairs: every CPU dtype; CUDA kernels cover float32/bfloat16/float16."""
    out = [pytest.param("cpu", d, id=f"cpu-{str(d).split('.')[-1]}") for d in CPU_DTYPES]
    out += [pytest.param("cuda", d, id=f"cuda-{str(d).split('.')[-1]}", marks=pytest.mark.cuda) for d in CUDA_DTYPES]
    return out


def tol(dtype: torch.dtype) -> dict:
    """Tolerances for comparing a kernel with the reference (both accumulate in float32): the op
    manifest's defaults."""
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def noncontiguous(t: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Same values as t, but a strided view (every other element along `dim` of a 2x larger buffer)."""
    shape = list(t.shape)
    shape[dim] = shape[dim] * 2
    buf = torch.empty(shape, dtype=t.dtype, device=t.device)
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(0, None, 2)
    view = buf[tuple(idx)]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


# Pooling positions so large that the slot x/k + (W/k) * (y/k) overflows int64 and could wrap into
# [0, length): the CPU kernels must report them as past `length`, the CUDA kernels skip them (as
# padding); neither may pool them into a wrong slot.
HUGE_POSITIONS = {  # name: (positions, length, indices of the patches no slot can hold)
    "y": ([(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 2**62)], 8, [7]),
    "wide_image": ([(2**33 - 1, 0), (0, 2**31), (0, 0), (1, 0)], 4, [0, 1]),
    "int64_max_x": ([(2**63 - 1, 0), (0, 0), (1, 0), (2, 0)], 4, [0]),
}


def block_and_layer_by_layer(block, x, positions):
    """A scannable block's output, the same layers run one by one, and the ids of the RopeTables
    each RopeTables.get call of the block's forward was made on (the block shares one)."""
    from vitops.layers import RopeTables

    seen = []
    original = RopeTables.get

    def recording_get(self, *args, **kwargs):
        seen.append(id(self))
        return original(self, *args, **kwargs)

    with torch.no_grad():
        RopeTables.get = recording_get
        try:
            block_out = block(x, decoder_positions=positions)
        finally:
            RopeTables.get = original
        y = x
        for i in range(block.num_of_layers):
            y, _ = getattr(block, f"layers_{i}")(y, decoder_positions=positions)
    return block_out, y, seen


def check_random_packing(block, width: int, seed: int) -> None:
    """A decoder block over a batch of 2 rows, each packing 1-4 sequences of 1-9 tokens (segment ids
    1, 2, ...; positions restarting at 0; the shorter row padded with segment 0), equals the block run on
    every sequence alone, within 1e-5 of the sequence's output scale."""
    import random

    rng = random.Random(seed)
    rows = [[rng.randint(1, 9) for _ in range(rng.randint(1, 4))] for _ in range(2)]
    total = max(sum(lengths) for lengths in rows)
    x = torch.randn(2, total, width, generator=torch.Generator().manual_seed(seed))
    segments = torch.zeros(2, total, dtype=torch.long)
    positions = torch.zeros(2, total, dtype=torch.long)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            segments[r, start:start + n] = i + 1
            positions[r, start:start + n] = torch.arange(n)
            start += n
    with torch.no_grad():
        packed = block(x, segments, positions)
        for r, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                alone = block(x[r:r + 1, start:start + n])
                torch.testing.assert_close(packed[r:r + 1, start:start + n], alone, rtol=1e-5,
                                           atol=1e-5 * alone.abs().max().item(), msg=lambda m: f"{rows}: {m}")
                start += n


def autocast_against_hf(hf_text_model, block, x: torch.Tensor, dtype=torch.bfloat16):
    """HF's text model and a vitops decoder block (followed by HF's final norm) under CPU autocast,
    forward and backward from the same float32 input and output gradient; returns (HF's output, ours,
    HF's input-gradient error against float64 without autocast, ours)."""
    import copy

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        want = hf_text_model(inputs_embeds=x_hf).last_hidden_state
        got = hf_text_model.norm(block(x_ours))
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    want.backward(grad)
    got.backward(grad)
    x64 = x.double().requires_grad_(True)
    copy.deepcopy(hf_text_model).double()(inputs_embeds=x64).last_hidden_state.backward(grad.double())
    return want.detach(), got.detach(), rel(x_hf.grad, x64.grad), rel(x_ours.grad, x64.grad)


def check_decoder_bad_calls(block, width: int) -> None:
    """A decoder block's calls with mismatched arguments raise errors that name the argument and the
    expected form (no kernel error, no silent result)."""
    x = torch.randn(2, 5, width)
    ids = torch.ones(2, 5, dtype=torch.long)
    cases = [
        (lambda: block(torch.randn(2, 5, width + 1)), ValueError, rf"`inputs` must be \[B, L, {width}\]"),
        (lambda: block(torch.ones(2, 5, width, dtype=torch.long)), TypeError, "`inputs` must be a floating-point"),
        (lambda: block(x, ids[:, :4]), ValueError, r"`decoder_segment_ids` must be \[B, L\] = \[2, 5\]"),
        (lambda: block(x, None, torch.arange(5)[None]), ValueError, r"`decoder_positions` must be \[B, L\] = \[2, 5\]"),
        (lambda: block(x, None, ids.to("meta")), ValueError, "`decoder_positions` must be on the device of `inputs`"),
        (lambda: block(x[:1], model_mode="autoregressive", kv_cache=block(x, model_mode="prefill")[1]), ValueError,
         "`kv_cache` holds 2 sequences but `inputs` has B = 1"),
    ]
    with torch.no_grad():
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()

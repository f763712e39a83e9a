"""Seeded fuzz cases for every vitops op (forward and backward), shared by tests/test_fuzz.py and
the subprocess worker tests/fuzz_worker.py.

A case is ``(op, kind, seed)``; ``make_case`` rebuilds it deterministically in any process:

* ``valid``: random shapes (empty, odd, padded), dtypes, strided views, scalar arguments; the op
  must match ``vitops.reference`` (forward, and backward through autograd in float32/float64),
  and its fake kernel must give the same output metadata.
* ``invalid``: one mutation of a valid case (wrong rank / dtype / device, bad scalars, negative or
  int64-limit sizes, expanded tensors of huge size, positions out of range or non-finite). The op
  must raise ``RuntimeError`` with a ``vitops.<op>:`` message naming an argument in backticks;
  a ``meta`` mutation (metadata only) must also be rejected by the fake kernel. Run in a
  subprocess, so that a crash or a hang fails the test instead of killing pytest.

``namespace="vitops_emu"`` runs the CUDA kernels under the CPU emulator (CUDA rules: no float64,
invalid positions poison or skip instead of raising).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable

import torch

import vitops
from vitops import reference

from _utils import tol

from vitops.ops._manifest import MANIFEST, entry

OPS = tuple(e.name for e in MANIFEST)  # the op manifest; the generators and mutations below are the fuzzer's own
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
INT32_MIN = -(2**31)
BAD_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.bool, torch.complex64, torch.float8_e4m3fn)


@dataclasses.dataclass
class Case:
    op: str  # the schema name (forward op or _<op>_backward)
    args: list  # positional arguments of torch.ops.<namespace>.<op>
    # "match": compare with the reference; "raise": a clear vitops RuntimeError; "returns": must
    # not raise (extreme but valid sizes); "no_crash": a result or a clear error (CUDA rules for bad
    # values); "raise_or_match": either a clear error that the fake kernel agrees with, or a result
    # equal to the reference (mutations whose validity depends on the op, e.g. one more dim);
    # "like_reference": bad values (positions out of range, non-finite): a clear error where the
    # reference raises, else the reference's result.
    expect: str
    reference: Callable[[], Any] | None = None  # the reference's outputs, same structure as the op's
    meta_invalid: bool = False  # invalid from metadata alone: the fake kernel must raise too
    grad_check: Callable[[Callable], None] | None = None  # backward check (valid cases)
    tolerance: dict | None = None
    describe: str = ""


def _tol(dtype: torch.dtype) -> dict:
    """The suite's kernel-vs-reference tolerances, doubled: random scales (x3 activations) and
    shapes push a few elements past the hand-picked cases' bounds."""
    return {name: 2 * value for name, value in tol(dtype).items()}


def _output_tol(op: str, dtype: torch.dtype) -> dict:
    """_tol of an op's output dtype; posemb_sincos_2d computes in float32 whatever its output dtype (as
    MaxText), so its float64 tables carry float32's last-bit differences of libm's sin/cos/pow; so
    does moe_route's score of float32 logits (HF's float32 sigmoid) scaling float64 rows."""
    float32_math = op in ("posemb_sincos_2d", "moe_route")
    return _tol(torch.float32 if float32_math and dtype == torch.float64 else dtype)


def _dtypes(namespace: str):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if namespace == "vitops" else [])


def _randn(rng: random.Random, shape, dtype, scale=1.0):
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _strided(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """Same values, sometimes as a non-contiguous view (every other element of one dim, or a view
    with a storage offset)."""
    if t.dim() == 0 or rng.random() < 0.5:
        return t
    dim = rng.randrange(t.dim())
    shape = list(t.shape)
    shape[dim] *= 2
    buf = torch.zeros(shape, dtype=t.dtype)
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(1, None, 2) if shape[dim] else slice(None)
    view = buf[tuple(idx)]
    view.copy_(t)
    return view


def _rand_dims(rng, n, lo=0, hi=3):
    return [rng.randint(lo, hi) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# valid cases per op
# ---------------------------------------------------------------------------------------------
def _patchify(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    p = rng.randint(1, 5)
    lead = _rand_dims(rng, rng.randint(0, 2), 0, 3)
    h, w, c = p * rng.randint(0, 4), p * rng.randint(0, 4), rng.randint(1, 4)
    images = _strided(rng, _randn(rng, (*lead, h, w, c), dtype))
    channels_first = rng.random() < 0.3  # Llama 4's unfold order (drawn last: the other cases stay as they were)
    if channels_first:
        images = images.movedim(-1, -3)  # [..., C, H, W], a strided view
    return dict(images=images, patch_size=p, channels_first=channels_first)


def _pixel_shuffle(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    n = rng.choice([1, 2, 2, 3, 4])
    side = n * rng.randint(0, 4)
    lead = _rand_dims(rng, rng.randint(0, 2), 0, 3)
    x = _strided(rng, _randn(rng, (*lead, side * side, rng.randint(0, 6)), dtype))
    return dict(input_tensor=x, shuffle_ratio=1.0 / n)


def _posemb(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    n, d = rng.randint(1, 9), rng.randint(0, 9)
    table_dim = rng.randint(0, 1)
    table = _randn(rng, (2, n, d) if table_dim == 0 else (n, 2, d), dtype)
    if rng.random() < 0.3:  # the other layout's transpose view
        table = _randn(rng, (n, 2, d) if table_dim == 0 else (2, n, d), dtype).transpose(0, 1)
    lead = _rand_dims(rng, rng.randint(1, 2), 0, 5)
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    pos = torch.randint(-1, n, (*lead, 2), generator=g).to(rng.choice([torch.int32, torch.int64]))
    return dict(posemb=table, positions_xy=_strided(rng, pos), table_dim=table_dim)


def _rope(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    for _ in range(100):
        lead = _rand_dims(rng, rng.randint(0, 2), 0, 3)
        length, heads = rng.randint(0, 6), rng.randint(1, 4)
        hd = 2 * rng.randint(1, 12)
        one_d = rng.random() < 0.3
        ndim = 1 if one_d else rng.randint(1, 3)
        fraction = rng.choice([None, None, 0.5, 0.25, 1.0, 0.0, 0.75])
        try:  # the reference's geometry rules decide whether this is a valid case
            if one_d:
                rot = hd if fraction is None else int(fraction * hd)
                if rot % 2:
                    continue
            else:
                widths = reference.rope_chunks(hd, ndim, fraction)
                if any(w % 2 for w in widths):
                    continue
        except ValueError:
            continue
        break
    pos_dtype = rng.choice([torch.int32, torch.int64, torch.float32, torch.float64])
    if namespace == "vitops_emu" and pos_dtype == torch.float64:
        pos_dtype = torch.float32
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    pshape = (*lead, length) if one_d else (*lead, length, ndim)
    pos = torch.randint(-3, 60, pshape, generator=g)
    pos = pos.to(pos_dtype) if pos_dtype in (torch.int32, torch.int64) else (pos + torch.rand(pshape, generator=g)).to(pos_dtype)
    inputs = _strided(rng, _randn(rng, (*lead, length, heads, hd), dtype))
    return dict(inputs=inputs, positions=pos, base_frequency=rng.choice([100.0, 10000.0, 37.5, 1.5]),
                rotary_fraction=fraction, scale_factor=rng.choice([1.0, 1.0, 0.5, 2.0]))


def _pool_inputs(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    k = rng.randint(1, 3)
    length = rng.randint(1, 6)
    seq_len = k * k * length
    b, d = rng.randint(0, 3), rng.randint(0, 9)
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    positions = torch.full((b, seq_len, 2), -1, dtype=torch.int64)
    for i in range(b):
        # an image of (rows x cols) pooled cells, rows * cols <= length, patches shuffled, rest padding
        cols = rng.randint(1, length)
        rows = rng.randint(0, length // cols)
        pts = [(x, y) for y in range(rows * k) for x in range(cols * k)]
        rng.shuffle(pts)
        slots = rng.sample(range(seq_len), len(pts))
        for (x, y), s in zip(pts, slots):
            positions[i, s] = torch.tensor([x, y])
    positions = positions.to(rng.choice([torch.int32, torch.int64]))
    x = _strided(rng, _randn(rng, (b, seq_len, d), dtype, scale=3.0))
    return dict(x=x, positions_xy=_strided(rng, positions), length=length)


def _exit(rng, namespace):
    kw = _pool_inputs(rng, namespace)
    d = kw["x"].shape[2]
    kw["scale"] = rng.choice([1.0, math.sqrt(max(d, 1)), 0.5])
    if rng.random() < 0.5:
        sdt = rng.choice([torch.float32, torch.bfloat16])
        kw["std_bias"] = _strided(rng, _randn(rng, (d,), sdt))
        kw["std_scale"] = _strided(rng, _randn(rng, (d,), sdt, 0.3) + 1)
    else:
        kw["std_bias"] = kw["std_scale"] = None
    return kw


def _pool_norm(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    out_side, k = rng.randint(1, 4), rng.randint(1, 3)
    side = out_side * k
    b, d = rng.randint(0, 3), rng.randint(0, 9)
    norm = rng.choice(["scale_plus_one", "scale", "rms", "none"])
    weight = None
    if norm in ("scale", "scale_plus_one"):
        weight = _strided(rng, _randn(rng, (d,), rng.choice([torch.float32, torch.bfloat16, dtype]), 0.5))
    x = _strided(rng, _randn(rng, (b, side * side, d), dtype, scale=3.0))
    return dict(x=x, length=out_side * out_side, weight=weight, eps=rng.choice([1e-6, 1e-3, 0.0]), norm=norm)


def _qkv(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    b, length = rng.randint(0, 2), rng.randint(0, 6)
    kv = rng.randint(1, 3)
    h = kv * rng.randint(1, 2)
    ndim = rng.randint(1, 3)
    hd = 2 * ndim * rng.randint(1, 6) + 2 * rng.randint(0, 1)
    buf = _randn(rng, (b, length, (h + 2 * kv) * hd + rng.randint(0, 3)), dtype, 2.0)
    q = buf[..., : h * hd].unflatten(-1, (h, hd))
    k = buf[..., h * hd : (h + kv) * hd].unflatten(-1, (kv, hd))
    v = buf[..., (h + kv) * hd : (h + 2 * kv) * hd].unflatten(-1, (kv, hd))
    wdt = rng.choice([torch.float32, torch.bfloat16, dtype])
    qw, kw = (_randn(rng, (hd,), torch.float32, 0.3) + 1).to(wdt), (_randn(rng, (hd,), torch.float32, 0.3) + 1).to(wdt)
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    pos = torch.randint(-1, 40, (b, length, ndim), generator=g)
    pos = pos.to(rng.choice([torch.int32, torch.int64, torch.float32]))
    rope_dtype = rng.choice([None, None, torch.float32, dtype])
    case = dict(q=q, k=k, v=v, q_weight=qw, k_weight=kw, positions=pos, eps=rng.choice([1e-6, 1e-5, 0.0]),
                base_frequency=rng.choice([100.0, 10000.0, 7.0]), rope_dtype=rope_dtype,
                norm="scale", v_norm=True, pairing="half_split", rope_freqs=None, rope_cos=None, rope_sin=None,
                norm_after_rope=False, q_scale=None)
    if rng.random() < 0.5:  # the other families' options (drawn last: the Gemma 4 cases stay as they were)
        norm = rng.choice(["scale", "scale_plus_one", "rms", "none"])
        if norm in ("rms", "none"):
            case.update(q_weight=None, k_weight=None)
        freqs = None
        if rng.random() < 0.4:
            freqs = (_randn(rng, (hd // 2,), torch.float32, 0.2).abs() + 0.01).to(rng.choice([torch.float32, wdt]))
        case.update(norm=norm, v_norm=rng.random() < 0.6, pairing=rng.choice(["half_split", "interleaved"]),
                    rope_freqs=freqs)
        if not case["v_norm"] and rng.random() < 0.4:
            case["v"] = None  # attention reads v's projection itself (Llama 4, Gemma 3)
        if freqs is None and rng.random() < 0.3:  # precomputed cos/sin: batch 1 or B, any float dtype
            tb = rng.choice([1, b])
            case.update(rope_cos=_randn(rng, (tb, length, hd // 2), rng.choice([torch.float32, dtype]), 0.6),
                        rope_sin=_randn(rng, (tb, length, hd // 2), rng.choice([torch.float32, wdt]), 0.6))
        # Llama 4's orders: the norm after the rotation, NoPE (no rotation), q scaled per row
        case["norm_after_rope"] = rng.random() < 0.4
        if rng.random() < 0.25:
            case.update(pairing="none", rope_freqs=None, rope_cos=None, rope_sin=None)
        if rng.random() < 0.35:
            case["q_scale"] = (_randn(rng, (rng.choice([1, b]), length), torch.float32, 0.3) + 1).to(
                rng.choice([torch.float32, wdt]))
    return case


def _sincos(rng, namespace):
    # odd and empty grids, width 0 / 4 (one frequency) / wide, dtype from `like` or given; `like`'s
    # shape and values are never read
    out = rng.choice(_dtypes(namespace))
    given = rng.random() < 0.4
    like_dtype = rng.choice([torch.float32, torch.int64, torch.bfloat16]) if given else out
    like = _strided(rng, torch.zeros(_rand_dims(rng, rng.randint(0, 2), 0, 3), dtype=like_dtype))
    return dict(like=like, h=rng.randint(0, 9), w=rng.randint(0, 9), width=4 * rng.choice([0, 1, 2, 3, 8, 33]),
                temperature=rng.choice([10000.0, 100.0, 1.0, 0.5, 1e30]), dtype=out if given else None)


def _moe_route(rng, namespace):
    # token counts across the CUDA counting-sort chunks (256), widths 0 and odd, expert counts past a
    # warp (33, 130), logits of another dtype, tied logits (rounded) and the odd NaN logit
    dtype = rng.choice(_dtypes(namespace))
    n = rng.choice([0, 1, 2, 17, 255, 256, 257, 600, rng.randint(0, 900)])
    h, experts = rng.choice([0, 1, 7, 16, 40]), rng.choice([1, 2, 5, 16, 33, 130])
    logits = _randn(rng, (n, experts), torch.float32, 2.0)
    if rng.random() < 0.3:  # ties: the first maximum wins
        logits = logits.round()
    if n and rng.random() < 0.1:
        logits.view(-1)[rng.randrange(logits.numel())] = float("nan")
    logit_dtype = rng.choice([dtype, torch.float32] + ([torch.float64] if dtype == torch.float64 else []))
    return dict(x=_strided(rng, _randn(rng, (n, h), dtype, 2.0)), router_logits=_strided(rng, logits.to(logit_dtype)))


def _permutation_pair(rng, n):
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    order = torch.randperm(n, generator=g)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n)
    return slot, order


def _moe_combine(rng, namespace):
    dtype = rng.choice(_dtypes(namespace))
    n, h = rng.choice([0, 1, 3, 64, 257, rng.randint(0, 600)]), rng.choice([0, 1, 5, 40])
    slot, order = _permutation_pair(rng, n)
    return dict(shared=_strided(rng, _randn(rng, (n, h), dtype, 2.0)),
                expert_out=_strided(rng, _randn(rng, (n, h), dtype, 2.0)), token_slot=slot, token_order=order)


def _merge(rng, namespace):
    # [T, H] (a ragged batch) or [B, S, H]; the indices a random subset of the rows in random order
    # (unique and in range: the CPU kernels raise for the rest, the mutations below cover them) with
    # negative entries mixed in (skipped: INT32_MIN as MAX's, INT64_MIN, -1); empty T, N and H, odd H
    dtype = rng.choice(_dtypes(namespace))
    h = rng.choice([0, 1, 3, 8, 40, 64, rng.randint(1, 100)])
    if rng.random() < 0.5:
        shape = (rng.choice([0, 1, 5, 37, rng.randint(0, 300)]), h)
    else:
        shape = (rng.randint(0, 3), rng.randint(0, 40), h)
    rows = math.prod(shape[:-1])
    index_dtype = rng.choice([torch.int32, torch.int64])
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    written = torch.randperm(rows, generator=g)[: rng.randint(0, rows)].tolist()
    low = INT64_MIN if index_dtype == torch.int64 else INT32_MIN
    skipped = [rng.choice([-1, INT32_MIN, low, -rng.randint(1, 1000)]) for _ in range(rng.choice([0, 0, 1, 3, 20]))]
    entries = written + skipped
    rng.shuffle(entries)
    indices = torch.tensor(entries, dtype=index_dtype)
    return dict(inputs_embeds=_strided(rng, _randn(rng, shape, dtype, 2.0)),
                soft_tokens=_strided(rng, _randn(rng, (len(entries), h), dtype, 2.0)),
                indices=_strided(rng, indices))


GENERATORS = {
    "merge_soft_tokens": _merge,
    "moe_route": _moe_route,
    "moe_combine": _moe_combine,
    "patchify": _patchify,
    "pixel_shuffle": _pixel_shuffle,
    "factorized_posemb": _posemb,
    "apply_multidimensional_rope": _rope,
    "avg_pool_by_positions": _pool_inputs,
    "avg_pool_scale_standardize": _exit,
    "avg_pool_rms_norm": _pool_norm,
    "qkv_norm_rope": _qkv,
    "posemb_sincos_2d": _sincos,
}

# argument order of each forward schema, and the arguments autograd differentiates
SCHEMA_ARGS = {e.name: list(e.args) for e in MANIFEST}
DIFFERENTIABLE = {e.name: list(e.differentiable) for e in MANIFEST}


def reference_call(op: str, kw: dict):
    """The reference's outputs in the raw op's output layout."""
    return entry(op).reference(**kw)


def op_fn(namespace: str, op: str):
    return getattr(getattr(torch.ops, namespace), op).default


def _args(op, kw):
    return [kw[name] for name in SCHEMA_ARGS[op]]


def valid_case(op: str, seed: int, namespace: str = "vitops") -> tuple[Case, dict]:
    rng = random.Random(f"{op}/{seed}/{namespace}")
    kw = GENERATORS[op](rng, namespace)
    dtype = kw.get("dtype") or kw[SCHEMA_ARGS[op][0]].dtype  # posemb_sincos_2d's dtype argument names the output's
    case = Case(op=op, args=_args(op, kw), expect="match", reference=lambda: reference_call(op, kw),
                tolerance=_output_tol(op, dtype), describe=f"valid {op} seed={seed}")
    return case, kw


# ---------------------------------------------------------------------------------------------
# invalid cases: one mutation of a valid case
# ---------------------------------------------------------------------------------------------
def _huge_expanded(shape_with_huge, dtype):
    """An expanded (stride-0) tensor whose sizes are near int64 limits but which has no storage."""
    base = torch.empty([1] * len(shape_with_huge), dtype=dtype)
    return base.expand(*shape_with_huge)


def _mutations(op: str, kw: dict, rng: random.Random, namespace: str):
    """(description, new kwargs or a backward-op Case, meta_invalid) candidates for this case."""
    out = []
    tensors = [n for n in SCHEMA_ARGS[op] if isinstance(kw[n], torch.Tensor)]
    first = SCHEMA_ARGS[op][0]
    if op == "posemb_sincos_2d":
        tensors = []  # `like` names the device only: its own mutations below
    for name in tensors:
        t = kw[name]
        bad = rng.choice(BAD_DTYPES)
        out.append((f"{name} dtype {bad}", {**kw, name: torch.zeros(t.shape, dtype=bad)}, True))
        # one tensor on meta among others on the CPU is a device mismatch; an op whose only tensor
        # is on meta runs its meta (fake) kernel, which is valid
        if namespace == "vitops":  # (the emulator's test namespace has no meta kernels)
            out.append((f"{name} on meta", {**kw, name: t.to("meta")}, True if len(tensors) > 1 else "returns"))
        out.append((f"{name} one more dim", {**kw, name: t.unsqueeze(0).expand(2, *t.shape)}, "either"))
        if t.dim() > 0:
            fewer = t.select(0, 0) if t.shape[0] else t.sum(0).to(t.dtype)
            out.append((f"{name} one dim fewer", {**kw, name: fewer}, "either"))
    if namespace == "vitops_emu" and op == "posemb_sincos_2d":
        out.append(("float64 output on the CUDA kernels", {**kw, "dtype": torch.float64}, True))
    elif namespace == "vitops_emu":
        out.append(("float64 input on the CUDA kernels", {**kw, first: kw[first].double()}, True))
    f = float("nan")
    if op == "patchify":
        for p in (0, -1, -(2**63), 2**32, 3037000500, INT64_MAX):
            out.append((f"patch_size {p}", {**kw, "patch_size": p}, True))
        p = kw["patch_size"]
        out.append(("expanded images of 2^62 patches", {**kw, "images": _huge_expanded(
            (0, 2**31 * p, 2**31 * p, 3), kw["images"].dtype)}, True))
        if kw["patch_size"] > 1:
            img = kw["images"]
            h_dim = -2 if kw["channels_first"] else -3
            shape = list(img.shape)
            shape[h_dim] = kw["patch_size"] + 1
            out.append(("H not divisible", {**kw, "images": torch.zeros(shape, dtype=img.dtype)}, True))
    elif op == "pixel_shuffle":
        x, r = kw["input_tensor"], kw["shuffle_ratio"]
        for bad in (0.0, -0.5, 0.3, 2.0, 1.5, f, float("inf"), 1e-300):
            out.append((f"shuffle_ratio {bad}", {**kw, "shuffle_ratio": bad}, True))
        side = math.isqrt(x.shape[-2])
        # side^2 + 1 lies strictly between two squares for side >= 1; an empty L (side 0) would give 1 = 1^2
        not_square = side * side + 1 if side >= 1 else 2
        out.append(("non-square L", {**kw, "input_tensor": torch.zeros(*x.shape[:-2], not_square, x.shape[-1],
                                                                        dtype=x.dtype)}, True))
        n = round(1 / r)
        if n > 1:
            out.append(("side not a multiple of 1/ratio", {**kw, "input_tensor": torch.zeros(
                *x.shape[:-2], (n + 1) ** 2, x.shape[-1], dtype=x.dtype)}, True))
        out.append(("expanded input of 2^62 rows", {**kw, "input_tensor": _huge_expanded((0, 2**62, 2), x.dtype),
                                                    "shuffle_ratio": 0.5}, True))
    elif op == "factorized_posemb":
        d = kw["posemb"].shape[2]
        huge = _huge_expanded((0, 2**62, 2), kw["positions_xy"].dtype)
        # the output [0, 2^62, D] has a contiguous layout only for D <= 1
        out.append(("expanded positions of 2^62 patches", {**kw, "positions_xy": huge}, "returns" if d <= 1 else True))
        for td in (-1, 2, 7):
            out.append((f"table_dim {td}", {**kw, "table_dim": td}, True))
        pos = kw["positions_xy"].clone()
        n = kw["posemb"].shape[1 - kw["table_dim"]]
        if pos.numel():
            for bad in (n, -2, INT64_MAX if pos.dtype == torch.int64 else 2**31 - 1, INT64_MIN if pos.dtype == torch.int64 else -(2**31)):
                p2 = pos.clone()
                p2.view(-1)[rng.randrange(p2.numel())] = bad
                out.append((f"coordinate {bad}", {**kw, "positions_xy": p2}, "value"))
    elif op == "apply_multidimensional_rope":
        x = kw["inputs"]
        out.append(("expanded inputs of 2^62 rows", {**kw, "inputs": _huge_expanded((0, 2**62, 2, 8), x.dtype),
                                                      "positions": _huge_expanded((0, 2**62), torch.int64),
                                                      "rotary_fraction": None}, True))
        for name, vals in (("base_frequency", (0.0, -1.0, f, float("inf"))), ("scale_factor", (f, float("inf"))),
                           ("rotary_fraction", (-0.1, 1.5, f))):
            for v in vals:
                out.append((f"{name} {v}", {**kw, name: v}, True))
        pos = kw["positions"]
        if pos.numel() and kw["inputs"].numel() and pos.dtype.is_floating_point:
            for bad in (f, float("inf"), -float("inf")):
                p2 = pos.clone()
                p2.view(-1)[rng.randrange(p2.numel())] = bad
                out.append((f"position {bad}", {**kw, "positions": p2}, "value"))
        if pos.numel() and kw["inputs"].numel() and not pos.dtype.is_floating_point:
            p2 = pos.clone().long()
            p2.view(-1)[rng.randrange(p2.numel())] = rng.choice([INT64_MAX, INT64_MIN])
            # finite angles in float32 (|p| <= 2^63): valid, must match the reference
            out.append(("int64-limit position (valid)", {**kw, "positions": p2}, None))
            # the angle overflows float32 (not float64): a clear error on the CPU, NaN rows on CUDA
            out.append(("huge scale_factor with int64-limit position",
                        {**kw, "positions": p2, "scale_factor": 1e30}, "value"))
    elif op in ("avg_pool_by_positions", "avg_pool_scale_standardize"):
        for length in (0, -1, INT64_MIN, kw["length"] + 1, INT64_MAX):
            out.append((f"length {length}", {**kw, "length": length}, True))
        x = kw["x"]
        for huge in (INT64_MAX, 3037000499**2, 2**62, 2**62 + 1):
            # L = k^2 * length with k = 3037000499 and 2^31 is valid (B = 0): it must return at once
            perfect_square = math.isqrt(huge) ** 2 == huge
            out.append((f"expanded L={huge}", {**kw, "x": _huge_expanded((0, huge, x.shape[2]), x.dtype),
                                               "positions_xy": _huge_expanded((0, huge, 2), torch.int64),
                                               "length": 1}, "returns" if perfect_square else True))
        pos = kw["positions_xy"]
        if pos.numel():
            for bad in ([-2, 0], [0, -5], [2**31 - 1, 0], [0, 2**31 - 1]):
                p2 = pos.clone()
                p2.view(-1, 2)[rng.randrange(p2.numel() // 2)] = torch.tensor(bad, dtype=p2.dtype)
                out.append((f"position {bad}", {**kw, "positions_xy": p2}, "value"))
        if op == "avg_pool_scale_standardize" and kw["std_bias"] is not None:
            out.append(("std_bias alone", {**kw, "std_scale": None}, True))
            out.append(("std_scale wrong size", {**kw, "std_scale": torch.ones(x.shape[2] + 1)}, True))
    elif op == "avg_pool_rms_norm":
        x = kw["x"]
        for length in (0, -1, INT64_MIN, 2, kw["length"] * 4 + 1, INT64_MAX):
            out.append((f"length {length}", {**kw, "length": length}, True))
        for eps in (-1.0, f, float("inf")):
            out.append((f"eps {eps}", {**kw, "eps": eps}, True))
        out.append(("norm layer", {**kw, "norm": "layer"}, True))
        out.append(("non-square L", {**kw, "x": torch.zeros(x.shape[0], x.shape[1] + 2, x.shape[2], dtype=x.dtype)}, True))
        out.append(("weight wrong size", {**kw, "weight": torch.ones(x.shape[2] + 1), "norm": "scale"}, True))
        out.append(("weight with rms", {**kw, "weight": torch.ones(x.shape[2]), "norm": "rms"}, True))
        huge = 3037000499**2  # a square L of 2^63 scale, B = 0: valid, returns at once
        out.append(("expanded x of a 3037000499² grid", {**kw, "x": _huge_expanded((0, huge, 1), x.dtype), "length": 1,
                                                           "weight": None, "norm": "rms"}, "returns"))
    elif op == "posemb_sincos_2d":
        like = kw["like"]
        bad = rng.choice(BAD_DTYPES)
        out.append((f"dtype {bad}", {**kw, "dtype": bad}, True))
        out.append((f"like dtype {bad} with dtype None", {**kw, "like": torch.zeros(like.shape, dtype=bad),
                                                          "dtype": None}, True))
        if namespace == "vitops":
            out.append(("like on meta", {**kw, "like": like.to("meta")}, "returns"))
        out.append(("like one more dim (valid)", {**kw, "like": like.unsqueeze(0).expand(2, *like.shape)}, None))
        for name in ("h", "w"):
            for v in (-1, INT64_MIN):
                out.append((f"{name} {v}", {**kw, name: v}, True))
        for width in (-4, 2, 6, 4 * 3 + 1, INT64_MIN):
            out.append((f"width {width}", {**kw, "width": width}, True))
        for t in (0.0, -1.0, f, float("inf"), 1e39, 1e-50):
            out.append((f"temperature {t}", {**kw, "temperature": t}, True))
        out.append(("h * w past int64", {**kw, "h": 2**32, "w": 2**32}, True))
        out.append(("h * w * width past int64", {**kw, "h": 2**31, "w": 2**31, "width": 8}, True))
        out.append(("empty grid of huge width (valid)", {**kw, "h": 0, "w": 2**40, "width": 2**20}, "returns"))
    elif op == "qkv_norm_rope":
        for name, vals in (("eps", (-1.0, f, float("inf"))), ("base_frequency", (0.0, -2.0, f, float("inf")))):
            for v in vals:
                out.append((f"{name} {v}", {**kw, name: v}, True))
        out.append(("rope_dtype int64", {**kw, "rope_dtype": torch.int64}, True))
        big = {n: _huge_expanded((0, 2**62, kw[n].shape[2], kw[n].shape[3]), kw[n].dtype) for n in ("q", "k", "v")
               if kw[n] is not None}
        out.append(("expanded q/k/v of 2^62 rows", {**kw, **big, "positions": _huge_expanded(
            (0, 2**62, kw["positions"].shape[2]), kw["positions"].dtype)}, True))
        q = kw["q"]
        if q.shape[3] > 1:
            out.append(("q with a strided head dim", {**kw, "q": torch.zeros(*q.shape[:3], 2 * q.shape[3], dtype=q.dtype)[..., ::2]}, True))
        out.append(("k_weight wrong size", {**kw, "k_weight": torch.ones(q.shape[3] + 2)}, True))
        out.append(("v None with v_norm", {**kw, "v": None, "v_norm": True}, True))
        out.append(("rope_cos without rope_sin", {**kw, "rope_cos": torch.zeros(q.shape[0], q.shape[1], q.shape[3] // 2),
                                                  "rope_sin": None}, True))
        out.append(("rope_cos of the wrong pair count", {**kw, "rope_cos": torch.zeros(1, q.shape[1], q.shape[3] // 2 + 1),
                                                         "rope_sin": torch.zeros(1, q.shape[1], q.shape[3] // 2 + 1)},
                    True))
        out.append(("rope_sin of L + 1 rows", {**kw, "rope_cos": torch.zeros(1, q.shape[1], q.shape[3] // 2),
                                               "rope_sin": torch.zeros(1, q.shape[1] + 1, q.shape[3] // 2)}, True))
        out.append(("rope_freqs and rope_cos together", {
            **kw, "rope_freqs": torch.ones(q.shape[3] // 2), "rope_cos": torch.zeros(1, q.shape[1], q.shape[3] // 2),
            "rope_sin": torch.zeros(1, q.shape[1], q.shape[3] // 2)}, True))
        out.append(("q_scale of L + 1 rows", {**kw, "q_scale": torch.ones(1, q.shape[1] + 1)}, True))
        out.append(("q_scale of int64", {**kw, "q_scale": torch.ones(q.shape[0], q.shape[1], dtype=torch.int64)}, True))
        if namespace == "vitops":  # (the emulator's test namespace has no meta kernels)
            out.append(("q_scale on meta", {**kw, "q_scale": torch.ones(q.shape[0], q.shape[1], device="meta")},
                        True))
        out.append(("pairing none with rope_freqs", {**kw, "pairing": "none", "rope_freqs": torch.ones(q.shape[3] // 2),
                                                     "rope_cos": None, "rope_sin": None}, True))
        out.append(("pairing rotate_half", {**kw, "pairing": "rotate_half"}, True))
        pos = kw["positions"]
        # given cos/sin or no rotation: positions are not read
        if pos.numel() and q.numel() and kw["rope_cos"] is None and kw.get("pairing") != "none":
            p2 = pos.clone().float()
            p2.view(-1)[rng.randrange(p2.numel())] = rng.choice([f, float("inf")])
            out.append(("non-finite position", {**kw, "positions": p2}, "value"))
            p3 = pos.clone().long()
            p3.view(-1)[rng.randrange(p3.numel())] = rng.choice([INT64_MAX, INT64_MIN])
            p3.view(-1)[rng.randrange(p3.numel())] = rng.choice([INT64_MAX, INT64_MIN, -4, 0])
            # angles stay finite in float32: valid, must match the reference (no overflowing table)
            out.append(("int64-limit positions (valid)", {**kw, "positions": p3}, "value"))
    if op == "moe_route":
        x, logits = kw["x"], kw["router_logits"]
        out.append(("router_logits without experts", {**kw, "router_logits": torch.zeros(x.shape[0], 0)}, True))
        out.append(("router_logits of N + 1 rows", {**kw, "router_logits": torch.zeros(x.shape[0] + 1, 3)}, True))
        out.append(("x of int64", {**kw, "x": torch.zeros(x.shape, dtype=torch.int64)}, True))
        out.append(("2^31 tokens", {"x": _huge_expanded((2**31, 4), x.dtype),
                                    "router_logits": _huge_expanded((2**31, 2), logits.dtype)}, True))
    elif op == "moe_combine":
        n = kw["shared"].shape[0]
        # bad permutations: the CPU kernel raises (a value check: the fake kernel cannot see it); the
        # CUDA kernel cannot check without a host sync and must not crash (NaN rows out of range)
        flag = "raise_real" if namespace == "vitops" else "value"
        if n:
            slot = kw["token_slot"].clone()
            slot[rng.randrange(n)] = rng.choice([n, -1, INT64_MAX, INT64_MIN])
            out.append(("token_slot out of range", {**kw, "token_slot": slot}, flag))
        if n > 1:
            slot = kw["token_slot"].clone()
            slot[0] = slot[1]
            out.append(("token_slot with a duplicate", {**kw, "token_slot": slot}, flag))
            out.append(("token_order not the inverse", {**kw, "token_order": kw["token_order"].roll(1)}, flag))
        out.append(("token_slot of int32", {**kw, "token_slot": kw["token_slot"].int()}, True))
        out.append(("token_order of N + 1", {**kw, "token_order": torch.arange(n + 1)}, True))
        out.append(("expert_out of H + 1", {**kw, "expert_out": torch.zeros(n, kw["shared"].shape[1] + 1,
                                                                            dtype=kw["shared"].dtype)}, True))
    elif op == "merge_soft_tokens":
        x, soft, idx = kw["inputs_embeds"], kw["soft_tokens"], kw["indices"]
        rows, n, h = math.prod(x.shape[:-1]), idx.shape[0], x.shape[-1]
        # bad index values: the CPU kernel raises (the fake kernel cannot see values); the CUDA kernel
        # cannot raise without a host sync and must give the reference's result (skip, largest j wins)
        bad_value = "raise_real" if namespace == "vitops" else None
        if x.dim() == 3:
            # [B, S, H] -> [S, H] has fewer rows: the indices past them are a bad value, not bad metadata
            out = [m for m in out if m[0] != "inputs_embeds one dim fewer"]
            fewer = x.select(0, 0) if x.shape[0] else x.sum(0).to(x.dtype)
            past = bool((idx.long() >= fewer.shape[0]).any())
            out.append(("inputs_embeds one dim fewer", {**kw, "inputs_embeds": fewer}, bad_value if past else None))
        if n:
            j = rng.randrange(n)
            big = rng.choice([rows, rows + 1, 2**31 - 1 if idx.dtype == torch.int32 else INT64_MAX])
            oob = idx.clone()
            oob[j] = big
            out.append((f"index {big} past {rows} rows", {**kw, "indices": oob}, bad_value))
            others = [k for k in (idx >= 0).nonzero()[:, 0].tolist() if k != j]
            if others:
                dup = idx.clone()
                dup[j] = idx[rng.choice(others)]
                out.append(("two positions writing one row", {**kw, "indices": dup}, bad_value))
            skip = idx.clone()
            skip[rng.randrange(n)] = rng.choice([INT32_MIN, -1, INT64_MIN if idx.dtype == torch.int64 else INT32_MIN])
            out.append(("one more index skipped (valid)", {**kw, "indices": skip}, None))
        other = rng.choice([d for d in (torch.float32, torch.bfloat16, torch.float16) if d != x.dtype])
        out.append((f"soft_tokens of {other}", {**kw, "soft_tokens": soft.to(other)}, True))
        out.append(("indices of N + 1", {**kw, "indices": torch.cat([idx, idx.new_full((1,), -1)])}, True))
        out.append(("soft_tokens of H + 1", {**kw, "soft_tokens": torch.zeros(n, h + 1, dtype=x.dtype)}, True))
        out.append(("indices of float32", {**kw, "indices": idx.float()}, True))
        # sizes near the int64 limits: an empty [0, 2^62, H] whose output strides do not fit, N past
        # the int32 inverse map (torch itself refuses shapes whose element count overflows)
        wide = max(h, 2)
        out.append(("empty inputs_embeds [0, 2^62, H]", {
            **kw, "inputs_embeds": _huge_expanded((0, 2**62, wide), x.dtype),
            "soft_tokens": torch.zeros(0, wide, dtype=x.dtype), "indices": idx[:0]}, True))
        out.append(("2^31 soft tokens", {**kw, "soft_tokens": _huge_expanded((2**31, h), x.dtype),
                                         "indices": _huge_expanded((2**31,), idx.dtype)}, True))
        # 2^62 rows of width 0: valid and empty, returns at once (no row-sized scratch memory)
        out.append(("2^62 empty rows", {**kw, "inputs_embeds": torch.empty(2**62, 0, dtype=x.dtype),
                                        "soft_tokens": torch.zeros(n, 0, dtype=x.dtype)}, "returns"))
    return out


def _backward_mutations(op: str, kw: dict, rng: random.Random):
    """Direct calls of the backward op with bad size arguments (sizes the autograd formula never passes)."""
    out = []
    if op == "patchify":
        img = kw["images"]
        grad = torch.zeros(*img.shape[:-3], 0, 0)
        for h, w, p in ((-4, 4, 2), (4, -4, 2), (0, 0, 2**32), (0, 0, 0), (INT64_MAX, 1, 1), (2**62, 2**62, 1)):
            out.append((f"_patchify_backward(height={h}, width={w}, patch_size={p})",
                        "_patchify_backward", [grad, h, w, p], True))
    elif op == "pixel_shuffle":
        for shape in ((2, 5, 4), (2, 4, 3), (3,)):
            out.append((f"_pixel_shuffle_backward(grad_output {list(shape)})", "_pixel_shuffle_backward",
                        [torch.zeros(shape), 0.5], True))
        out.append(("_pixel_shuffle_backward(shuffle_ratio nan)", "_pixel_shuffle_backward",
                    [torch.zeros(2, 4, 8), float("nan")], True))
    elif op == "factorized_posemb":
        g = torch.zeros(*kw["positions_xy"].shape[:-1], 3)
        for n in (-1, INT64_MIN):
            out.append((f"_factorized_posemb_backward(num_positions={n})", "_factorized_posemb_backward",
                        [g, kw["positions_xy"], n, kw["table_dim"]], True))
        g0 = torch.zeros(*kw["positions_xy"].shape[:-1], 0)
        out.append(("_factorized_posemb_backward(num_positions=2^62, D=0)", "_factorized_posemb_backward",
                    [g0, kw["positions_xy"], 2**62, kw["table_dim"]], "returns"))
    elif op in ("avg_pool_by_positions", "avg_pool_scale_standardize"):
        pos, length = kw["positions_xy"], kw["length"]
        grad = torch.zeros(pos.shape[0], length, 2)
        name = f"_{op}_backward"
        extra = [1.0, None] if op == "avg_pool_scale_standardize" else []
        for seq_len in (-1, INT64_MIN, INT64_MAX):
            out.append((f"{name}(seq_len={seq_len})", name, [grad, pos, length, seq_len, *extra], True))
    elif op == "apply_multidimensional_rope":
        out.append(("_apply_multidimensional_rope_backward(base_frequency=nan)", "_apply_multidimensional_rope_backward",
                    [kw["inputs"], kw["positions"], float("nan"), kw["rotary_fraction"], kw["scale_factor"]], True))
    elif op == "avg_pool_rms_norm":
        x = kw["x"]
        g = torch.zeros(x.shape[0], kw["length"] + 1, x.shape[2], dtype=x.dtype)
        out.append(("_avg_pool_rms_norm_backward(grad_output wrong length)", "_avg_pool_rms_norm_backward",
                    [g, x, kw["length"], kw["weight"], kw["eps"], kw["norm"]], True))
    elif op == "qkv_norm_rope":
        q, k, v = kw["q"], kw["k"], kw["v"]
        gq = torch.zeros(q.shape, dtype=q.dtype)
        gk = torch.zeros(k.shape, dtype=q.dtype)
        args = [gq, gk, None if v is None else gk.clone(), *_args(op, kw)]
        bad = list(args)
        bad[2] = gk.clone() if v is None else None
        out.append(("_qkv_norm_rope_backward(grad_v given without v, or missing with it)",
                    "_qkv_norm_rope_backward", bad, True))
        bad = list(args)
        bad[1] = gk.to("meta")
        out.append(("_qkv_norm_rope_backward(grad_k on meta)", "_qkv_norm_rope_backward", bad, True))
        bad = list(args)
        bad[0] = torch.zeros(gq.shape[0], gq.shape[1] + 1, gq.shape[2], gq.shape[3], dtype=q.dtype)
        out.append(("_qkv_norm_rope_backward(grad_q wrong L)", "_qkv_norm_rope_backward", bad, True))
    elif op == "moe_route":
        x, logits = kw["x"], kw["router_logits"]
        n = x.shape[0]
        slot = reference.moe_route(x, logits)[3]
        grad = torch.zeros(x.shape, dtype=x.dtype)
        if n > 1:
            dup = slot.clone()
            dup[0] = dup[1]
            out.append(("_moe_route_backward(token_slot with a duplicate)", "_moe_route_backward",
                        [grad, None, x, logits, dup], "raise_real"))
        out.append(("_moe_route_backward(grad_scores of N + 1)", "_moe_route_backward",
                    [grad, torch.zeros(n + 1, dtype=x.dtype), x, logits, slot], True))
        out.append(("_moe_route_backward(grad_routed of H + 1)", "_moe_route_backward",
                    [torch.zeros(n, x.shape[1] + 1, dtype=x.dtype), None, x, logits, slot], True))
    elif op == "moe_combine":
        n = kw["shared"].shape[0]
        grad = torch.zeros(kw["shared"].shape, dtype=kw["shared"].dtype)
        if n:
            bad = kw["token_order"].clone()
            bad[0] = n
            out.append(("_moe_combine_backward(token_order out of range)", "_moe_combine_backward", [grad, bad],
                        "raise_real"))
        out.append(("_moe_combine_backward(token_order of N + 1)", "_moe_combine_backward",
                    [grad, torch.arange(n + 1)], True))
    elif op == "merge_soft_tokens":
        x, idx = kw["inputs_embeds"], kw["indices"]
        grad = torch.zeros(x.shape, dtype=x.dtype)
        name = "_merge_soft_tokens_backward"
        written = (idx >= 0).nonzero()[:, 0].tolist()
        if len(written) > 1:
            dup = idx.clone()
            dup[written[0]] = idx[written[1]]
            out.append((f"{name}(indices with a duplicate)", name, [grad, dup], "raise_real"))
        out.append((f"{name}(grad_output of rank 1)", name, [grad.reshape(-1), idx], True))
        out.append((f"{name}(indices of rank 2)", name, [grad, idx[None]], True))
        out.append((f"{name}(indices on meta)", name, [grad, idx.to("meta")], True))
        out.append((f"{name}(grad_output [0, 2^62, 2])", name, [_huge_expanded((0, 2**62, 2), x.dtype), idx], True))
    return out


def invalid_case(op: str, seed: int, namespace: str = "vitops") -> Case:
    rng = random.Random(f"invalid/{op}/{seed}/{namespace}")
    _, kw = valid_case(op, seed, namespace)
    candidates = [("fwd",) + m for m in _mutations(op, kw, rng, namespace)]
    if namespace == "vitops":
        candidates += [("bwd",) + m for m in _backward_mutations(op, kw, rng)]
    kind, *rest = rng.choice(candidates)
    if kind == "bwd":
        describe, target, args, flag = rest
        expect = "returns" if flag == "returns" else "raise"
        return Case(op=target, args=args, expect=expect, meta_invalid=flag is True,
                    describe=f"invalid {op} seed={seed}: {describe}")
    describe, new_kw, flag = rest
    args = _args(op, new_kw)
    out_dtype = new_kw.get("dtype") or new_kw[SCHEMA_ARGS[op][0]].dtype
    tolerance = _output_tol(op, out_dtype) if out_dtype in _TOLERANT else None
    name = f"invalid {op} seed={seed}: {describe}"
    if flag is None:  # looks extreme but is valid: must match the reference
        return Case(op=op, args=args, expect="match", reference=lambda: reference_call(op, new_kw),
                    tolerance=tolerance, describe=name)
    if flag == "either":
        return Case(op=op, args=args, expect="raise_or_match", reference=lambda: reference_call(op, new_kw),
                    tolerance=tolerance, meta_invalid=True, describe=name)
    if flag == "returns":
        return Case(op=op, args=args, expect="returns", describe=name)
    if flag == "raise_real":  # bad index values: the real kernel raises, the fake kernel cannot tell
        return Case(op=op, args=args, expect="raise", meta_invalid=False, describe=name)
    if flag == "value":  # bad tensor values: the reference decides (CUDA rules: no crash)
        if namespace == "vitops_emu":
            return Case(op=op, args=args, expect="no_crash", describe=name)
        return Case(op=op, args=args, expect="like_reference", reference=lambda: reference_call(op, new_kw),
                    tolerance=tolerance, describe=name)
    return Case(op=op, args=args, expect="raise", meta_invalid=True, describe=name)


_TOLERANT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# checking one case (run by the worker, or in-process for valid cases)
# ---------------------------------------------------------------------------------------------
def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _compare(out, ref, tolerance) -> str | None:
    outs, refs = _flat(out), _flat(ref)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.shape != r.shape or o.dtype != r.dtype:
            return f"output {i}: {o.dtype}{list(o.shape)} vs reference {r.dtype}{list(r.shape)}"
        try:
            if o.dtype in (torch.bool, torch.int64, torch.int32):
                torch.testing.assert_close(o, r, rtol=0, atol=0)
            else:
                torch.testing.assert_close(o, r, equal_nan=True, **tolerance)
        except AssertionError as e:
            return f"output {i}: {str(e)[:300]}"
    return None


def _names_an_argument(message: str, op: str) -> bool:
    base = op.lstrip("_").removesuffix("_backward")
    return message.startswith(f"vitops.{op}:") or message.startswith(f"vitops.{base}") or (
        message.startswith("vitops.") and "`" in message)


def fake_call(namespace: str, op: str, args: list):
    """Run the op's fake kernel on FakeTensor versions of the arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return op_fn(namespace, op)(*fargs)


def _fake_agrees(namespace: str, case: Case, real_error: Exception | None, out=None) -> str | None:
    """The fake kernel must reject what the real kernel rejects (metadata mutations) and give the
    real outputs' metadata where the real kernel succeeds."""
    if namespace != "vitops":
        return None
    try:
        fake = fake_call(namespace, case.op, case.args)
    except RuntimeError as fe:
        if real_error is None:
            return f"the fake kernel rejects an input the real kernel accepts: {str(fe)[:200]}"
        return None
    except Exception as fe:  # noqa: BLE001
        return f"fake kernel raised {type(fe).__name__} (not RuntimeError): {str(fe)[:200]}"
    if real_error is not None:
        if case.meta_invalid:
            return f"the fake kernel accepted an input the real kernel rejects ({str(real_error)[:200]})"
        return None
    for i, (f, o) in enumerate(zip(_flat(fake), _flat(out))):
        if f.shape != o.shape or f.dtype != o.dtype or f.device != o.device:
            return f"fake output {i}: {f.dtype}{list(f.shape)} vs real {o.dtype}{list(o.shape)}"
    return None


def run_case(case: Case, namespace: str) -> str | None:
    """None when the case behaves as required, else a description of what went wrong."""
    fn = op_fn(namespace, case.op)
    if case.expect == "like_reference":
        try:
            case.reference()
            case.expect = "match"
        except (ValueError, RuntimeError):
            case.expect = "raise"
    try:
        out = fn(*case.args)
    except Exception as e:  # noqa: BLE001 - every error is inspected below
        clear = isinstance(e, RuntimeError) and _names_an_argument(str(e), case.op)
        if case.expect in ("match", "returns"):
            return f"raised {type(e).__name__}: {str(e)[:300]}"
        if not clear:
            return f"unclear error ({type(e).__name__}): {str(e)[:300]}"
        if case.expect == "no_crash":
            return None
        return _fake_agrees(namespace, case, e) if case.meta_invalid else None
    if case.expect == "raise":
        return f"returned instead of raising (outputs {[tuple(o.shape) for o in _flat(out)]})"
    if case.expect == "no_crash":
        return None
    if case.expect in ("match", "raise_or_match"):
        try:
            ref = case.reference()
        except Exception as e:  # noqa: BLE001
            return f"the op returned but the reference rejects the input: {type(e).__name__}: {str(e)[:200]}"
        err = _compare(out, ref, case.tolerance)
        if err:
            return err
    return _fake_agrees(namespace, case, None, out)


BACKWARD_OP = {e.name: e.backward for e in MANIFEST}


def backward_args(op: str, kw: dict, outputs: list) -> list:
    """Arguments of the raw backward op for upstream gradients shaped like the forward outputs."""
    g = torch.Generator().manual_seed(99)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    return entry(op).backward_args(kw, grads)


def check_emulated_backward(op: str, kw: dict) -> str | None:
    """The emulated CUDA backward kernel against the CPU backward kernel on the same arguments."""
    if BACKWARD_OP[op] is None:
        return None  # a factory op: nothing to differentiate
    outs = [o for o in _flat(op_fn("vitops", op)(*_args(op, kw))) if o.is_floating_point()]
    args = backward_args(op, kw, outs)
    cpu = op_fn("vitops", BACKWARD_OP[op])(*args)
    emu = op_fn("vitops_emu", BACKWARD_OP[op])(*args)
    return _compare(emu, cpu, _tol(kw[SCHEMA_ARGS[op][0]].dtype))


def check_backward(op: str, kw: dict, namespace: str = "vitops") -> str | None:
    """Gradients of the op (its registered autograd) against the reference's, float32/float64 only."""
    if kw[SCHEMA_ARGS[op][0]].dtype not in (torch.float32, torch.float64):
        return None  # low-precision gradients: the dedicated tests compare them with float64 runs
    names = [n for n in DIFFERENTIABLE[op] if kw[n] is not None and kw[n].dtype in (torch.float32, torch.float64)]
    if not names:
        return None
    fn = op_fn(namespace, op)

    def run(f, use_ref):
        leaves = {}
        call_kw = dict(kw)
        if op == "qkv_norm_rope":
            # q, k, v are views of one buffer: differentiate each as its own leaf
            for n in ("q", "k", "v", "q_weight", "k_weight"):
                if kw[n] is None:  # a weightless norm
                    continue
                leaves[n] = kw[n].detach().clone().requires_grad_(kw[n].dtype in (torch.float32, torch.float64))
                call_kw[n] = leaves[n]
        else:
            for n in names:
                leaves[n] = kw[n].detach().clone().requires_grad_(True)
                call_kw[n] = leaves[n]
        outs = reference_call(op, call_kw) if use_ref else fn(*_args(op, call_kw))
        outs = [o for o in _flat(outs) if o.is_floating_point()]
        g = torch.Generator().manual_seed(1234)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        if not loss.requires_grad:
            return {}
        req = [leaves[n] for n in leaves if leaves[n].requires_grad]
        grads = torch.autograd.grad(loss, req, allow_unused=True)
        return {n: gr for n, gr in zip([n for n in leaves if leaves[n].requires_grad], grads)}

    ours, ref = run(fn, False), run(None, True)
    for n, g in ref.items():
        o = ours.get(n)
        if (g is None) != (o is None):
            if g is None and o is not None and not o.any():
                continue
            return f"grad of {n}: one side is None"
        if g is None:
            continue
        err = _compare(o, g, _output_tol(op, g.dtype))
        if err:
            return f"grad of {n}: {err}"
    return None

"""The shared op tests: every op of the op manifest (vitops/ops/_manifest.py) on its sample inputs.

Per op and device: the public wrapper against the reference in every dtype, ``torch.library.opcheck``
of the forward and backward ops, ``torch.compile(fullgraph=True)`` static and dynamic (forward and
backward), gradcheck in float64, strided (non-contiguous) and empty inputs, run-to-run bitwise
determinism, and the CUDA kernels under the CPU emulator against the CPU kernels. What is particular
to an op (its options, its bad inputs, HF parity) is tested in its own file; the fuzzer
(test_fuzz.py) draws random cases of every manifest op.
"""

from __future__ import annotations

import os

import pytest
import torch

from vitops import testing
from vitops.ops._manifest import MANIFEST

from _utils import DEVICES, device_dtypes, noncontiguous

ENTRIES = [pytest.param(e, id=e.name) for e in MANIFEST]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_matches(out, ref, tolerances, what=""):
    out, ref = _flat(out), _flat(ref)
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape and o.dtype == r.dtype, (what, i, o.shape, r.shape, o.dtype, r.dtype)
        if o.is_floating_point():
            rtol, atol = tolerances[o.dtype]
            torch.testing.assert_close(o, r, rtol=rtol, atol=atol, msg=lambda m: f"{what} output {i}: {m}")
        else:
            assert torch.equal(o, r), (what, i)


def _floating(kw, names):
    return [n for n in names if isinstance(kw[n], torch.Tensor) and kw[n].is_floating_point()]


def _grad(outputs, inputs, grad_outputs=None):
    """autograd.grad, or no gradients for an op with nothing to differentiate (a factory)."""
    return list(torch.autograd.grad(outputs, inputs, grad_outputs)) if inputs else []


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_wrapper_matches_reference(e, device, dtype):
    kw = e.sample(device, dtype, False)
    _assert_matches(e.wrapper(**kw), e.reference(**kw), e.tolerances, e.name)
    # the raw op and the wrapper are one computation
    _assert_matches(e.call(kw), e.wrapper(**kw), {d: (0, 0) for d in e.tolerances}, e.name + " raw op")


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_strided_and_empty_inputs(e, device, dtype):
    kw = e.sample(device, dtype, False)
    strided = {n: noncontiguous(t, dim=0) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1 else t
               for n, t in kw.items()}
    _assert_matches(e.wrapper(**strided), e.wrapper(**kw), {d: (0, 0) for d in e.tolerances}, e.name + " strided")
    empty = e.sample(device, dtype, True)
    _assert_matches(e.wrapper(**empty), e.reference(**empty), e.tolerances, e.name + " empty")


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_deterministic(e, device, dtype):
    kw = e.sample(device, dtype, False)
    runs = []
    for _ in range(2):
        leaves = {n: kw[n].detach().clone().requires_grad_() for n in _floating(kw, e.differentiable)}
        outs = [o for o in _flat(e.wrapper(**{**kw, **leaves})) if o.is_floating_point()]
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=g).to(o) for o in outs]
        runs.append(outs + _grad(outs, list(leaves.values()), grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b), e.name


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(e, device):
    kw = e.sample(device, torch.float32, False)
    for requires_grad in (False, True):
        args = {n: t.detach().clone().requires_grad_(requires_grad) if n in _floating(kw, e.differentiable) else t
                for n, t in kw.items()}
        torch.library.opcheck(getattr(torch.ops.vitops, e.name).default, tuple(e.positional(args)))
    if e.backward is None:
        return
    outs = [o for o in _flat(e.call(kw)) if o.is_floating_point()]
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(getattr(torch.ops.vitops, e.backward).default, tuple(e.backward_args(kw, grads)))


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(e, dynamic):
    kw = e.sample("cpu", torch.float32, False)
    names = _floating(kw, e.differentiable)
    rest = {n: t for n, t in kw.items() if n not in names}

    def f(*tensors):
        return e.wrapper(**rest, **dict(zip(names, tensors)))

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    leaves = [kw[n].detach().clone().requires_grad_() for n in names]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, ref = compiled(*leaves), e.reference(**rest, **dict(zip(names, ref_leaves)))
    _assert_matches(out, ref, e.tolerances, e.name + " compiled")
    loss = sum(o.double().square().sum() for o in _flat(out) if o.is_floating_point())
    ref_loss = sum(o.double().square().sum() for o in _flat(ref) if o.is_floating_point())
    for g, r in zip(_grad(loss, leaves), _grad(ref_loss, ref_leaves)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("e", ENTRIES)
def test_gradcheck_float64(e):
    kw = e.sample("cpu", torch.float64, False)
    # a smaller problem: gradcheck differentiates numerically element by element
    names = _floating(kw, e.differentiable)
    rest = {n: t for n, t in kw.items() if n not in names}

    def f(*tensors):
        return tuple(o for o in _flat(e.wrapper(**rest, **dict(zip(names, tensors)))) if o.is_floating_point())

    if not names:
        pytest.skip(f"{e.name} has no differentiable input (a factory op)")
    leaves = [kw[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# the CUDA kernels under the CPU emulator (bitwise under both schedules, against the CPU kernels)
# ---------------------------------------------------------------------------------------------
def _emulator():
    if testing.load_cuda_emulator():
        return True
    if os.environ.get("CI") == "true" or testing.cuda_emulator_built():
        raise RuntimeError(f"the CUDA emulator library ({testing.cuda_emulator_path()}) is missing")
    pytest.skip("the CUDA emulator library was not built (VITOPS_CUDA_EMULATION=OFF)")


@pytest.mark.parametrize("e", ENTRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emulated_cuda_matches_cpu(e, dtype):
    _emulator()
    kw = e.sample("cpu", dtype, False)
    runs = []
    for schedule in (0, 1):
        with testing.emulator_schedule(schedule):
            runs.append(_flat(e.call(kw, "vitops_emu")))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    _assert_matches(runs[0], e.call(kw), e.tolerances, e.name + " emulated")
    if e.backward is None:
        return
    outs = [o for o in _flat(e.call(kw)) if o.is_floating_point()]
    grads = [torch.randn(o.shape).to(o.dtype) for o in outs]
    args = e.backward_args(kw, grads)
    emu = _flat(getattr(torch.ops.vitops_emu, e.backward).default(*args))
    cpu = _flat(getattr(torch.ops.vitops, e.backward).default(*args))
    for a, b in zip(emu, cpu):
        rtol, atol = e.tolerances[dtype]
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1.0))

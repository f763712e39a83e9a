"""Argument checks of the fake (meta) kernels: the Python twin of ``csrc/include/vitops/common.h``.

The fake kernels validate exactly what the C++ kernels validate from metadata (dims, sizes, dtypes,
devices, scalar arguments), in the same order and with the same messages, so that a call that
fails eagerly also fails under ``torch.compile`` / FakeTensor, and one that compiles also runs.
What needs tensor *values* (positions outside the table, non-finite angles) is checked by the real
CPU kernels only. Sizes that are symbolic under ``torch.compile(dynamic=True)`` are checked with
``torch._check`` where that adds no specialising guard; value-like size relations that would
specialise a symbol (a perfect-square sequence length) are left to the real kernel at run time.

Every check raises ``RuntimeError``, as the C++ checks do.
"""

from __future__ import annotations

import torch

INT64_MAX = 2**63 - 1
MAX_PATCH_SIZE = 3037000499  # largest p with p * p <= INT64_MAX

_FLOAT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX = (torch.int32, torch.int64)


def is_concrete(*values) -> bool:
    """True when every value is a plain int (not a SymInt of a dynamic-shape trace)."""
    return all(isinstance(v, int) for v in values)


def fail_unless(cond, message) -> None:
    """Raise ``RuntimeError(message())`` unless ``cond``; ``message`` is a callable (built lazily)."""
    if isinstance(cond, bool):
        if not cond:
            raise RuntimeError(message())
        return
    torch._check(cond, message)


def static_equals(size, expected: int) -> bool:
    """``size == expected`` for a concrete size; True for a symbolic one. For the fixed-size axes of an
    op (the (x, y) axis of positions): under torch.compile(dynamic=True) dynamo gives equal sizes one
    symbol ("duck shaping"), so a first batch of 2 shares its symbol with that axis and checking the
    axis would specialise the batch size too. The real kernel checks such axes at run time."""
    return size == expected if is_concrete(size) else True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def allows_double(t: torch.Tensor) -> bool:
    """float64 kernels exist on the CPU only (meta tensors stand for any device: allowed)."""
    return t.device.type != "cuda"


def check_float(op: str, arg: str, t: torch.Tensor) -> None:
    allow_double = allows_double(t)
    ok = t.dtype in _FLOAT and (allow_double or t.dtype != torch.float64)
    fail_unless(ok, lambda: (
        f"vitops.{op}: `{arg}` must be float32, bfloat16, float16"
        f"{' or float64' if allow_double else ' (float64 is CPU only)'}, got {dtype_name(t.dtype)}"))


def check_float_table(op: str, arg: str, t: torch.Tensor, allow_double: bool) -> None:
    """csrc common.h check_float_table: a float table read in its own dtype (a norm weight, a frequency
    or standardisation table); float64 only where the kernels have it."""
    fail_unless(t.dtype in _FLOAT and (allow_double or t.dtype != torch.float64), lambda: (
        f"vitops.{op}: `{arg}` must be a float32, bfloat16 or float16{' or float64' if allow_double else ''} "
        f"tensor, got {dtype_name(t.dtype)}"))


def check_index(op: str, arg: str, t: torch.Tensor) -> None:
    fail_unless(t.dtype in _INDEX,
                lambda: f"vitops.{op}: `{arg}` must be an int64 or int32 tensor, got {dtype_name(t.dtype)}")


def check_same_device(op: str, a: str, ta: torch.Tensor, b: str, tb: torch.Tensor) -> None:
    fail_unless(ta.device == tb.device, lambda: (
        f"vitops.{op}: `{a}` and `{b}` must be on the same device, got {ta.device} and {tb.device}"))


def check_nonnegative(op: str, arg: str, value) -> None:
    fail_unless(value >= 0, lambda: f"vitops.{op}: `{arg}` must be a non-negative int, got {value}")


def checked_mul(op: str, what: str, a, b):
    """a * b, raising like the C++ ``checked_mul`` when the product does not fit int64."""
    r = a * b
    if is_concrete(a, b):
        fail_unless(-INT64_MAX - 1 <= r <= INT64_MAX,
                    lambda: f"vitops.{op}: {what} ({a} * {b}) does not fit in int64")
    return r


def is_finite_number(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))



def check_shape_fits(op: str, what: str, sizes) -> None:
    """The C++ ``check_shape_fits``: an output's contiguous strides and element count fit int64."""
    sizes = list(sizes)
    if not is_concrete(*sizes):
        return
    stride, fits = 1, True
    for s in reversed(sizes[1:]):
        stride *= max(s, 1)
        fits = fits and stride <= INT64_MAX
    if 0 not in sizes:
        numel = 1
        for s in sizes:
            numel *= s
        fits = fits and numel <= INT64_MAX
    fail_unless(fits, lambda: (
        f"vitops.{op}: {what} would have shape [{', '.join(str(s) for s in sizes)}], whose size or strides do not "
        "fit in int64"))


def checked_product(op: str, what: str, sizes):
    """Product of sizes, raising like the C++ ``checked_product`` on int64 overflow; 0 if any is 0."""
    if any(is_concrete(s) and s == 0 for s in sizes):
        return 0
    r = 1
    for s in sizes:
        r = r * s
    if is_concrete(r):
        fail_unless(r <= INT64_MAX, lambda: f"vitops.{op}: {what} does not fit in int64")
    return r

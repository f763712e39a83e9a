"""The op manifest: every vitops operator once, with what the library and its tests need of it.

An entry names the op's schema arguments (in order) and which of them are differentiable, its
backward op, the public wrapper and the pure-PyTorch reference (both called with the schema's
arguments by name and returning the raw op's outputs), a sample of realistic inputs, and the
tolerances against the reference. It feeds the op registry (``vitops.OPS``, ``build_info``), the
self-check (``python -m vitops selfcheck``), the registration test, the shared op tests
(``tests/test_ops_common.py``: reference, opcheck, torch.compile, gradcheck, strided and empty
inputs, emulated CUDA) and the fuzzer (``tests/fuzz_cases.py``). A new op is one entry here plus
its own cases (its fuzz generator and invalid-input mutations, and tests of what is particular to it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .. import reference
from .apply_multidimensional_rope import apply_multidimensional_rope
from .avg_pool_by_positions import avg_pool_by_positions
from .avg_pool_rms_norm import avg_pool_rms_norm
from .avg_pool_scale_standardize import avg_pool_scale_standardize
from .factorized_posemb import factorized_posemb
from .merge_soft_tokens import merge_soft_tokens
from .moe_combine import moe_combine
from .moe_route import moe_route
from .patchify import patchify
from .pixel_shuffle import pixel_shuffle
from .posemb_sincos_2d import posemb_sincos_2d
from .qkv_norm_rope import qkv_norm_rope

__all__ = ["DEFAULT_TOLERANCES", "MANIFEST", "OpEntry", "entry"]

# (rtol, atol) of an op against its reference (both accumulate in float32; float64 stays float64)
DEFAULT_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


@dataclasses.dataclass(frozen=True)
class OpEntry:
    name: str
    args: tuple[str, ...]  # the schema's arguments, in order
    differentiable: tuple[str, ...]  # the arguments autograd differentiates
    wrapper: Callable[..., Any]  # (**args) -> the public wrapper's outputs, in the raw op's layout
    reference: Callable[..., Any]  # (**args) -> the reference's outputs, in the raw op's layout
    sample: Callable[[torch.device | str, torch.dtype, bool], dict]  # (device, dtype, empty) -> args
    # (args, output gradients) -> the backward op's arguments; None for an op with nothing to
    # differentiate (a factory: posemb_sincos_2d), which has no backward op
    backward_args: Callable[[dict, list], list] | None
    tolerances: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_TOLERANCES))

    @property
    def backward(self) -> str | None:
        return None if self.backward_args is None else f"_{self.name}_backward"

    def positional(self, kw: dict) -> list:
        """The raw op's positional arguments from named ones."""
        return [kw[n] for n in self.args]

    def call(self, kw: dict, namespace: str = "vitops"):
        """The raw op ``torch.ops.<namespace>.<name>`` on named arguments."""
        return getattr(getattr(torch.ops, namespace), self.name).default(*self.positional(kw))


# ---------------------------------------------------------------------------------------------
# samples: small realistic shapes (two padded images of a Gemma 4 batch)
# ---------------------------------------------------------------------------------------------
def _rand(g: torch.Generator, device, dtype, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _positions(device, batch: int, length: int = 81) -> torch.Tensor:
    """Padded (x, y) patch positions of a 6x9 and a 9x6 grid (padding (-1, -1))."""
    pos = torch.full((batch, length, 2), -1, dtype=torch.int64)
    for b in range(batch):
        rows, cols = ((6, 9), (9, 6))[b % 2]
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos[b, : rows * cols] = torch.stack([xs, ys], -1).reshape(-1, 2)
    return pos.to(device)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _patchify_sample(device, dtype, empty):
    return dict(images=_rand(_generator(), device, dtype, 0 if empty else 2, 48, 96, 3), patch_size=16,
                channels_first=False)


def _pixel_shuffle_sample(device, dtype, empty):
    # Llama 4's adapter input: a 24 x 24 token grid (CLS dropped), shuffle ratio 0.5
    return dict(input_tensor=_rand(_generator(), device, dtype, 0 if empty else 2, 576, 48), shuffle_ratio=0.5)


def _posemb_sample(device, dtype, empty):
    return dict(posemb=_rand(_generator(), device, dtype, 2, 64, 40), positions_xy=_positions(device, 0 if empty else 2),
                table_dim=0)


def _rope_sample(device, dtype, empty):
    return dict(inputs=_rand(_generator(), device, dtype, 0 if empty else 2, 81, 4, 72),
                positions=_positions(device, 0 if empty else 2), base_frequency=100.0, rotary_fraction=None,
                scale_factor=1.0)


def _pool_sample(device, dtype, empty):
    return dict(x=_rand(_generator(), device, dtype, 0 if empty else 2, 81, 40), positions_xy=_positions(device, 0 if empty else 2),
                length=9)


def _exit_sample(device, dtype, empty):
    g = _generator()
    b = 0 if empty else 2
    return dict(x=_rand(g, device, dtype, b, 81, 40), positions_xy=_positions(device, b), length=9, scale=40**0.5,
                std_bias=_rand(g, device, dtype, 40), std_scale=_rand(g, device, dtype, 40))


def _pool_norm_sample(device, dtype, empty):
    g = _generator()
    return dict(x=_rand(g, device, dtype, 0 if empty else 2, 64, 40), length=16, weight=_rand(g, device, dtype, 40),
                eps=1e-6, norm="scale_plus_one")


def _sincos_sample(device, dtype, empty):
    # Gemma 3's 64 x 64 grid scaled down: an 8 x 6 grid of width 40 (10 frequencies per block)
    return dict(like=torch.empty(2, device=device, dtype=dtype), h=0 if empty else 8, w=6, width=40,
                temperature=10000.0, dtype=None)


def _qkv_sample(device, dtype, empty):
    g = _generator()
    b = 0 if empty else 2
    qkv = _rand(g, device, dtype, b, 81, 3, 4, 72)  # one fused projection; q/k/v are strided views of it
    return dict(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2], q_weight=_rand(g, device, dtype, 72),
                k_weight=_rand(g, device, dtype, 72), positions=_positions(device, b), eps=1e-6,
                base_frequency=100.0, rope_dtype=None, norm="scale", v_norm=True, pairing="half_split",
                rope_freqs=None, rope_cos=None, rope_sin=None, norm_after_rope=False, q_scale=None)


def _moe_route_sample(device, dtype, empty):
    # 600 tokens (three counting-sort chunks of 256 on CUDA, the last partial) over 6 experts, one of
    # them unused (its bucket is empty)
    g = _generator()
    n = 0 if empty else 600
    logits = _rand(g, device, torch.float32, n, 6)
    logits[:, 4] = -1e4  # expert 4 never wins
    return dict(x=_rand(g, device, dtype, n, 40), router_logits=logits.to(dtype))


def _moe_combine_sample(device, dtype, empty):
    g = _generator()
    n = 0 if empty else 300
    order = torch.randperm(n, generator=g)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n)
    return dict(shared=_rand(g, device, dtype, n, 40), expert_out=_rand(g, device, dtype, n, 40),
                token_slot=slot.to(device), token_order=order.to(device))


def _merge_sample(device, dtype, empty):
    # two sequences of 40 tokens, hidden 48: images of 9 and 6 soft tokens in the first, one of 12 in
    # the second (HF's batch-major placeholder rows, int32 as MAX's); the first image's rows were
    # processed in an earlier chunk (INT32_MIN: skipped)
    g = _generator()
    rows = [] if empty else [*range(3, 12), *range(20, 26), *range(45, 57)]
    indices = torch.tensor(rows, dtype=torch.int32)
    indices[:9] = -(2**31)
    return dict(inputs_embeds=_rand(g, device, dtype, 0 if empty else 2, 40, 48),
                soft_tokens=_rand(g, device, dtype, len(rows), 48), indices=indices.to(device))


def _image_hw(images, channels_first):
    return tuple(images.shape[-2:]) if channels_first else tuple(images.shape[-3:-1])


_TABLE_LAYOUTS = ("hf", "maxtext")  # factorized_posemb's table_dim 0 / 1


def _qkv_rows(outs, q):
    """qkv_norm_rope's [B, N, L, hd] results in the raw op's [B, L, N, hd] layout; without v the raw
    op's third output is a placeholder with no heads, [B, L, 0, hd]."""
    q_out, k_out, v_out = outs
    v_rows = q.new_empty((q.shape[0], q.shape[1], 0, q.shape[3])) if v_out is None else v_out.transpose(1, 2)
    return q_out.transpose(1, 2), k_out.transpose(1, 2), v_rows


_QKV_OPTIONS = ("eps", "base_frequency", "rope_dtype", "norm", "v_norm", "pairing", "rope_freqs", "rope_cos",
                "rope_sin", "norm_after_rope", "q_scale")

MANIFEST: tuple[OpEntry, ...] = (
    OpEntry(
        name="patchify",
        args=("images", "patch_size", "channels_first"),
        differentiable=("images",),
        wrapper=lambda images, patch_size, channels_first: patchify(images, patch_size, channels_first=channels_first),
        reference=lambda images, patch_size, channels_first: reference.patchify(images, patch_size, channels_first),
        sample=_patchify_sample,
        backward_args=lambda kw, g: [g[0], *_image_hw(kw["images"], kw["channels_first"]), kw["patch_size"],
                                     kw["channels_first"]],
    ),
    OpEntry(
        name="pixel_shuffle",
        args=("input_tensor", "shuffle_ratio"),
        differentiable=("input_tensor",),
        wrapper=lambda input_tensor, shuffle_ratio: pixel_shuffle(input_tensor, shuffle_ratio),
        reference=lambda input_tensor, shuffle_ratio: reference.pixel_shuffle(input_tensor, shuffle_ratio),
        sample=_pixel_shuffle_sample,
        backward_args=lambda kw, g: [g[0], kw["shuffle_ratio"]],
    ),
    OpEntry(
        name="factorized_posemb",
        args=("posemb", "positions_xy", "table_dim"),
        differentiable=("posemb",),
        wrapper=lambda posemb, positions_xy, table_dim: factorized_posemb(
            posemb, positions_xy, layout=_TABLE_LAYOUTS[table_dim]),
        reference=lambda posemb, positions_xy, table_dim: reference.factorized_posemb(posemb, positions_xy, table_dim),
        sample=_posemb_sample,
        backward_args=lambda kw, g: [g[0], kw["positions_xy"], kw["posemb"].shape[1 - kw["table_dim"]],
                                     kw["table_dim"]],
    ),
    OpEntry(
        name="apply_multidimensional_rope",
        args=("inputs", "positions", "base_frequency", "rotary_fraction", "scale_factor"),
        differentiable=("inputs",),
        wrapper=lambda inputs, positions, **kw: apply_multidimensional_rope(
            inputs, positions, **kw),
        reference=lambda inputs, positions, **kw: reference.apply_multidimensional_rope(inputs, positions, **kw),
        sample=_rope_sample,
        backward_args=lambda kw, g: [g[0], kw["positions"], kw["base_frequency"], kw["rotary_fraction"],
                                     kw["scale_factor"]],
    ),
    OpEntry(
        name="avg_pool_by_positions",
        args=("x", "positions_xy", "length"),
        differentiable=("x",),
        wrapper=lambda x, positions_xy, length: avg_pool_by_positions(
            x, positions_xy=positions_xy, length=length),
        reference=lambda x, positions_xy, length: reference.avg_pool_by_positions(x, positions_xy, length),
        sample=_pool_sample,
        backward_args=lambda kw, g: [g[0], kw["positions_xy"], kw["length"], kw["x"].shape[1]],
    ),
    OpEntry(
        name="avg_pool_scale_standardize",
        args=("x", "positions_xy", "length", "scale", "std_bias", "std_scale"),
        differentiable=("x",),
        wrapper=lambda **kw: avg_pool_scale_standardize(**kw),
        reference=lambda **kw: reference.avg_pool_scale_standardize(**kw),
        sample=_exit_sample,
        backward_args=lambda kw, g: [g[0], kw["positions_xy"], kw["length"], kw["x"].shape[1], kw["scale"],
                                     kw["std_scale"]],
    ),
    OpEntry(
        name="avg_pool_rms_norm",
        args=("x", "length", "weight", "eps", "norm"),
        differentiable=("x", "weight"),
        wrapper=lambda x, length, weight, eps, norm: avg_pool_rms_norm(x, length, weight, eps=eps, norm=norm),
        reference=lambda x, length, weight, eps, norm: reference.avg_pool_rms_norm(x, length, weight, eps=eps,
                                                                                   norm=norm),
        sample=_pool_norm_sample,
        # the output gradient, then the forward's arguments; returns (grad_x, grad_weight)
        backward_args=lambda kw, g: [g[0], kw["x"], kw["length"], kw["weight"], kw["eps"], kw["norm"]],
    ),
    OpEntry(
        name="posemb_sincos_2d",
        args=("like", "h", "w", "width", "temperature", "dtype"),
        differentiable=(),  # a factory: `like` names the device only
        wrapper=lambda like, h, w, width, temperature, dtype: posemb_sincos_2d(
            h, w, width, temperature, dtype=like.dtype if dtype is None else dtype, device=like.device),
        reference=lambda **kw: reference.posemb_sincos_2d(**kw),
        sample=_sincos_sample,
        backward_args=None,
        # float32 angles up to (h - 1) x f_0 = 7 rad: libm's and torch's sin/cos/pow agree to an ulp or two
        tolerances={**DEFAULT_TOLERANCES, torch.float32: (1e-6, 1e-6), torch.float64: (1e-6, 1e-6)},
    ),
    OpEntry(
        name="moe_route",
        args=("x", "router_logits"),
        differentiable=("x", "router_logits"),
        wrapper=lambda x, router_logits: moe_route(x, router_logits),
        reference=lambda x, router_logits: reference.moe_route(x, router_logits),
        sample=_moe_route_sample,
        # the gradients of routed and scores, the forward's inputs, and the forward's token_slot
        backward_args=lambda kw, g: [g[0], g[1], kw["x"], kw["router_logits"],
                                     reference.moe_route(kw["x"], kw["router_logits"])[3]],
    ),
    OpEntry(
        name="moe_combine",
        args=("shared", "expert_out", "token_slot", "token_order"),
        differentiable=("shared", "expert_out"),
        wrapper=lambda **kw: moe_combine(**kw),
        reference=lambda **kw: reference.moe_combine(**kw),
        sample=_moe_combine_sample,
        # the output gradient and token_order; returns the gradient of expert_out
        backward_args=lambda kw, g: [g[0], kw["token_order"]],
    ),
    OpEntry(
        name="merge_soft_tokens",
        args=("inputs_embeds", "soft_tokens", "indices"),
        differentiable=("inputs_embeds", "soft_tokens"),
        wrapper=lambda **kw: merge_soft_tokens(**kw),
        reference=lambda **kw: reference.merge_soft_tokens(**kw),
        sample=_merge_sample,
        # the output gradient and the indices; returns the gradients of inputs_embeds and soft_tokens
        backward_args=lambda kw, g: [g[0], kw["indices"]],
        # the op moves values and computes nothing: bitwise in every dtype
        tolerances={d: (0.0, 0.0) for d in DEFAULT_TOLERANCES},
    ),
    OpEntry(
        name="qkv_norm_rope",
        args=("q", "k", "v", "q_weight", "k_weight", "positions", *_QKV_OPTIONS),
        differentiable=("q", "k", "v", "q_weight", "k_weight"),
        # the wrapper and the reference return [B, N, L, hd] views; the raw op [B, L, N, hd]
        wrapper=lambda q, k, v, q_weight, k_weight, positions, **kw: _qkv_rows(
            qkv_norm_rope(q, k, v, q_weight, k_weight, positions, **kw), q),
        reference=lambda q, k, v, q_weight, k_weight, positions, **kw: _qkv_rows(
            reference.qkv_norm_rope(q, k, v, q_weight, k_weight, positions, **kw), q),
        sample=_qkv_sample,
        # gradients in the outputs' [B, L, N, hd] layout (none for an absent v), then the forward's arguments
        backward_args=lambda kw, g: [g[0], g[1], None if kw["v"] is None else g[2],
                                     *(kw[n] for n in ("q", "k", "v", "q_weight", "k_weight", "positions",
                                                       *_QKV_OPTIONS))],
    ),
)

_BY_NAME = {e.name: e for e in MANIFEST}


def entry(name: str) -> OpEntry:
    return _BY_NAME[name]

"""Layers every tower shares, in plain PyTorch: norms, (clipped) linears, activations, dropout,
gated MLPs and attention masks. The model families (``vitops.models.*``) build on these; the
numerics follow HF ``transformers`` (float32 math for low-precision inputs, one rounding at the
end), and ``vitops.reference`` uses the same norm for the fused ops' oracles.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "AttentionType",
    "ClippedLinear",
    "DecoderKVCache",
    "GatedMlp",
    "MODEL_MODES",
    "PackedSegments",
    "RMSNorm",
    "acc_dtype",
    "activation",
    "attention_mask",
    "broadcast_dropout",
    "check_attention_heads",
    "check_decoder_call",
    "decoder_attend",
    "decoder_attention_mask",
    "decoder_positions_for",
    "dropout",
    "dropout_active",
    "image_block_ids",
    "mask_is_redundant",
    "packed_attention",
    "rms_norm",
    "rope_inverse_frequencies",
    "run_decoder_layers",
]

NORM_KINDS = ("scale", "scale_plus_one", "rms", "scale_after_cast")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for every low-precision dtype (as HF); float64 stays float64
    (reference runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, scale: torch.Tensor | None, eps: float, kind: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, r = ``pow(mean(x^2) + eps, -0.5)`` in float32, cast back once:

    * ``"scale"``: ``(x * r) * w`` (HF Gemma4RMSNorm; Gemma 4 folded Gemma 3's ``1 + w`` into its
      checkpoints),
    * ``"scale_plus_one"``: ``(x * r) * (1 + w)`` (HF Gemma3RMSNorm, the ``1 + w`` added in float32),
    * ``"rms"``: ``x * r`` (no weight),
    * ``"scale_after_cast"``: ``(x * r).to(dtype) * w`` (Llama order: HF LlamaRMSNorm / Llama4TextRMSNorm,
      MaxText's RMSNorm; the weight multiply in the storage dtype).

    ``kind=None`` means ``"scale"`` with a weight and ``"rms"`` without. ``pow(., -0.5)`` and a
    float32 weight multiply reproduce HF's Gemma 4 norm bit for bit (``rsqrt`` equals it on the CPU).
    """
    kind = kind if kind is not None else ("rms" if scale is None else "scale")
    if kind not in NORM_KINDS:
        raise ValueError(f"rms_norm: `kind` must be one of {NORM_KINDS}, got {kind!r}")
    if (scale is None) != (kind == "rms"):
        raise ValueError(f"rms_norm: kind={kind!r} {'takes no' if kind == 'rms' else 'needs a'} scale")
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if kind == "scale_after_cast":
        return y.to(x.dtype) * scale
    if kind == "scale":
        y = y * scale.to(acc)
    elif kind == "scale_plus_one":
        y = y * (1.0 + scale.to(acc))
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (:func:`rms_norm`). ``with_scale=False`` has no parameter (Gemma 4's
    v-norm and projector norm); ``plus_one=True`` applies ``1 + scale`` (Gemma 3), initialised to 0."""

    def __init__(self, num_features: int, eps: float = 1e-6, with_scale: bool = True, *, plus_one: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if plus_one and not with_scale:
            raise ValueError("RMSNorm: plus_one needs with_scale=True")
        self.num_features = num_features
        self.eps = eps
        self.plus_one = plus_one
        init = torch.zeros if plus_one else torch.ones
        self.scale = nn.Parameter(init(num_features, device=device, dtype=dtype)) if with_scale else None

    @property
    def kind(self) -> str:
        """The norm kind of :func:`rms_norm` (and of the fused ops' ``norm`` argument)."""
        return "rms" if self.scale is None else ("scale_plus_one" if self.plus_one else "scale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps, self.kind)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, with_scale={self.scale is not None}"
                + (", plus_one=True" if self.plus_one else ""))


# ---------------------------------------------------------------------------------------------
# Linears and activations
# ---------------------------------------------------------------------------------------------
class ClippedLinear(nn.Linear):
    """Bias-free linear; with ``use_clipped_linears`` its input and output are clamped to four
    checkpoint scalars (Gemma 4 E2B/E4B). They clip activations, not weights. Bounds are buffers
    (not trained, follow ``.to(dtype)`` like HF's) initialised to +-inf, i.e. a no-op until loaded."""

    def __init__(self, in_features: int, out_features: int, use_clipped_linears: bool = False, *, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.use_clipped_linears = use_clipped_linears
        if use_clipped_linears:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value, device=device, dtype=dtype or torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_clipped_linears:
            return F.linear(x, self.weight)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(F.linear(x, self.weight), self.output_min, self.output_max)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", clipped" if self.use_clipped_linears else "")


# HF's names of the tanh-approximated GELU (Gemma's gelu_pytorch_tanh and its aliases) and the exact
# GELU. The tanh forms are one function, but HF computes the Python variants op by op in the
# activation dtype, so in bfloat16 they round differently from the fused kernel: each is reproduced
# as HF writes it. SiLU (HF "silu") for the Llama SwiGLU MLPs.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_python_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": F.gelu,
    "silu": F.silu,  # Llama 4's SwiGLU
}
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh", "gelu_fast")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation HF names ``name`` (``hidden_act`` / ``hidden_activation``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------------------------
# Dropout (MaxText's `deterministic` flag or PyTorch's train mode)
# ---------------------------------------------------------------------------------------------
def dropout_active(module: nn.Module, deterministic: bool | None) -> bool:
    """MaxText's ``deterministic`` when given (False: apply dropout), else PyTorch's train mode."""
    return module.training if deterministic is None else not deterministic


def dropout(x: torch.Tensor, rate: float, active: bool) -> torch.Tensor:
    return F.dropout(x, rate, training=True) if active and rate > 0.0 else x


def broadcast_dropout(x: torch.Tensor, rate: float, active: bool, broadcast_dim: int = -2) -> torch.Tensor:
    """Inverted dropout with one mask shared along ``broadcast_dim`` (MaxText's
    ``Dropout(broadcast_dims=(-2,))``: the same channels dropped at every sequence position)."""
    if not active or rate == 0.0:
        return x
    shape = list(x.shape)
    shape[broadcast_dim] = 1
    keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------
class GatedMlp(nn.Module):
    """Gated MLP ``wo(act(wi_0(x)) * wi_1(x))`` with bias-free (optionally clipped) linears (MaxText
    names: wi_0 = gate, wi_1 = up, wo = down); in training ``dropout_rate`` drops the gated
    activations with one mask along the sequence (MaxText's MlpBlock)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_activation: str = "gelu_pytorch_tanh",
                 dropout_rate: float = 0.0, use_clipped_linears: bool = False, *, device=None, dtype=None):
        super().__init__()
        self.dropout_rate = dropout_rate
        self.activation = hidden_activation
        activation(hidden_activation)  # unknown names fail here, not at the first call
        kw = dict(device=device, dtype=dtype)
        self.wi_0 = ClippedLinear(hidden_size, intermediate_size, use_clipped_linears, **kw)
        self.wi_1 = ClippedLinear(hidden_size, intermediate_size, use_clipped_linears, **kw)
        self.wo = ClippedLinear(intermediate_size, hidden_size, use_clipped_linears, **kw)

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
        h = ACTIVATIONS[self.activation](self.wi_0(x)) * self.wi_1(x)
        h = broadcast_dropout(h, self.dropout_rate, dropout_active(self, deterministic))
        return self.wo(h)


# ---------------------------------------------------------------------------------------------
# Attention helpers
# ---------------------------------------------------------------------------------------------
class AttentionType(enum.Enum):
    """MaxText's attention kinds (``maxtext.common_types.AttentionType``)."""

    GLOBAL = "global"  # causal over the whole sequence
    LOCAL_SLIDING = "local_sliding"  # causal within a sliding window (Gemma 3's local layers)
    CHUNK = "chunk"  # causal within fixed chunks (Llama 4's RoPE layers)
    MLA = "mla"
    FULL = "full"  # bidirectional (vision encoders)


def attention_mask(batch: int, length: int, key_mask: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The boolean SDPA mask (True = attend) of a key-padding mask ``[B, L]`` (True = valid key;
    padded queries still attend, their outputs are discarded later) and/or MaxText's
    ``decoder_segment_ids`` ``[B, L]`` (attend within a segment); None when neither is given."""
    mask = None
    if key_mask is not None:
        mask = key_mask.view(batch, 1, 1, length)  # keys only
    if segment_ids is not None:
        seg = (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)).unsqueeze(1)
        mask = seg if mask is None else mask & seg
    return mask


def mask_is_redundant(valid: torch.Tensor) -> bool:
    """True when no key is padding and finding that out costs nothing: eager mode on the CPU. SDPA's
    CPU flash kernel is ~8% slower with a mask, and HF drops an all-valid mask too. On CUDA reading
    the mask would be a host sync (the towers must stay sync-free, e.g. for CUDA-graph capture) and
    under torch.compile a data-dependent branch, so there the mask is always passed."""
    return valid.device.type == "cpu" and not torch.compiler.is_compiling() and bool(valid.all())


# ---------------------------------------------------------------------------------------------
# Packed sequences: several images back to back in one sequence, attention block diagonal
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackedSegments:
    """The lengths of sequences packed back to back along one axis, as host ints.

    A packing is decided when the batch is built (the preprocessor knows every image's patch count),
    so keeping it on the host costs nothing and no kernel has to read sizes from the device: the
    packed path never synchronises. ``runs`` groups consecutive segments of equal length, which the
    attention and pooling run as one batched call each (a video's frames are one run)."""

    lengths: tuple[int, ...]

    def __post_init__(self):
        lengths = tuple(self.lengths)
        for n in lengths:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"PackedSegments: every length must be a positive int, got {self.lengths!r}")
        object.__setattr__(self, "lengths", lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each segment, then the total (``cu_seqlens``)."""
        out, acc = [0], 0
        for n in self.lengths:
            acc += n
            out.append(acc)
        return tuple(out)

    @property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """``(start, count, length)`` of each maximal run of consecutive segments of equal length."""
        runs, start, i = [], 0, 0
        while i < len(self.lengths):
            j = i
            while j < len(self.lengths) and self.lengths[j] == self.lengths[i]:
                j += 1
            runs.append((start, j - i, self.lengths[i]))
            start += (j - i) * self.lengths[i]
            i = j
        return tuple(runs)

    def scaled_down(self, factor: int) -> "PackedSegments":
        """Each length divided by ``factor`` (exactly): the segments after a k x k pooling."""
        if any(n % factor for n in self.lengths):
            raise ValueError(f"PackedSegments: lengths {self.lengths} are not all multiples of {factor}")
        return PackedSegments(tuple(n // factor for n in self.lengths))

    def split(self, x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
        """Views of ``x`` per segment along ``dim``."""
        if x.shape[dim] != self.total:
            raise ValueError(f"PackedSegments.split: dim {dim} of {tuple(x.shape)} must be the packed length "
                             f"{self.total}")
        return torch.split(x, list(self.lengths), dim=dim)

    def cu_seqlens(self, device=None) -> torch.Tensor:
        """int32 ``[n + 1]`` segment offsets (flash-attention's varlen form)."""
        return torch.tensor(self.offsets, dtype=torch.int32, device=device)


PACKED_ATTENTION = ("sdpa", "varlen")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, *,
                     scale: float | None = None, dropout_p: float = 0.0, backend: str = "sdpa") -> torch.Tensor:
    """Block-diagonal self-attention over packed segments, with no padding FLOPs.

    ``q [1, H, L, hd]``, ``k``/``v`` ``[1, KV, L, hd]`` (the transposed views SDPA takes; GQA when
    KV < H), ``L = segments.total``; every token attends to the tokens of its own segment only.
    Returns ``[1, L, H * hd]`` (the layout the output projection takes).

    ``backend="sdpa"``: one SDPA call per run of equal-length segments, batched over the run (each
    image's attention is then the same computation as the image alone). ``backend="varlen"``: one
    ``torch.nn.attention.varlen.varlen_attn`` call (flash attention over ``cu_seqlens``; CUDA,
    float16 / bfloat16, no dropout)."""
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != segments.total:
        raise ValueError(f"packed_attention: q must be [1, H, {segments.total}, hd] (the packed length), got "
                         f"{tuple(q.shape)}")
    _, heads, length, hd = q.shape
    gqa = k.shape[1] != heads
    if backend == "varlen":
        if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or dropout_p:
            raise ValueError("packed_attention: backend='varlen' needs CUDA float16/bfloat16 inputs and no dropout, "
                             f"got {q.device.type} {q.dtype}, dropout_p={dropout_p}")
        from torch.nn.attention.varlen import varlen_attn

        cu = segments.cu_seqlens(q.device)
        longest = max(segments.lengths)
        out = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, longest, longest,
                          scale=scale, enable_gqa=gqa)
        return out.reshape(1, length, heads * hd)
    if backend != "sdpa":
        raise ValueError(f"packed_attention: backend must be one of {PACKED_ATTENTION}, got {backend!r}")
    parts = []
    for start, count, n in segments.runs:
        def run_view(t):  # [1, N, L, hd] -> this run's [count, N, n, hd] (a view)
            return t[0, :, start:start + count * n].unflatten(1, (count, n)).transpose(0, 1)

        out = F.scaled_dot_product_attention(run_view(q), run_view(k), run_view(v), dropout_p=dropout_p, scale=scale,
                                             enable_gqa=gqa)
        parts.append(out.transpose(1, 2).reshape(count * n, heads * hd))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Decoder attention: masks over absolute positions, image blocks, the KV cache
# ---------------------------------------------------------------------------------------------
MODEL_MODES = ("train", "prefill", "autoregressive")  # MaxText's MODEL_MODE_* values


def image_block_ids(bidirectional_mask: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of the contiguous image-token runs of ``bidirectional_mask [B, L]`` (True = image token):
    1, 2, ... per run in order, 0 for text (HF's ``get_block_sequence_ids_for_mask`` + 1).
    ``previous [B, S]``: the ids of the tokens before these (a KV cache), so a run that crosses
    the boundary keeps its id and new runs continue the numbering. No host synchronisation."""
    image = bidirectional_mask.to(torch.bool)
    if previous is not None and previous.shape[1] > 0:
        last = previous[:, -1:]
        before = torch.cat([last > 0, image[:, :-1]], dim=1)
        offset = previous.amax(dim=1, keepdim=True)
    else:
        before = F.pad(image, (1, 0), value=False)[:, :-1]
        offset = torch.zeros_like(image[:, :1], dtype=torch.int64)
    starts = image & ~before
    ids = torch.cumsum(starts.to(torch.int64), dim=1) + offset
    return torch.where(image, ids, torch.zeros_like(ids))


def decoder_attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, attention_type: AttentionType, *,
                           window: int | None = None, chunk: int | None = None,
                           q_segments: torch.Tensor | None = None, k_segments: torch.Tensor | None = None,
                           q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean SDPA mask ``[B, 1, Lq, Lk]`` (True = attend) of a decoder layer, over absolute
    positions (queries ``[B, Lq]``, keys ``[B, Lk]``, e.g. a KV cache's followed by the new ones):

    * causal: ``k_pos <= q_pos``; OR, for tokens of the same image block (``*_blocks`` > 0, from
      :func:`image_block_ids`), attend both ways (Gemma 3's bidirectional image tokens);
    * ``LOCAL_SLIDING``: AND ``q_pos - k_pos < window`` (HF's sliding window, self included);
    * ``CHUNK``: AND ``k_pos // chunk == q_pos // chunk`` (Llama 4's chunked attention);
    * ``GLOBAL``: nothing more;
    * segments (MaxText's ``decoder_segment_ids``, packed sequences): AND the same segment id.
    """
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    mask = kp <= qp
    if q_blocks is not None and k_blocks is not None:
        qb, kb = q_blocks[:, :, None], k_blocks[:, None, :]
        mask = mask | ((qb == kb) & (qb > 0))
    if attention_type == AttentionType.LOCAL_SLIDING:
        if window is None or window < 1:
            raise ValueError(f"decoder_attention_mask: LOCAL_SLIDING needs a window >= 1, got {window}")
        mask = mask & (qp - kp < window)
    elif attention_type == AttentionType.CHUNK:
        if chunk is None or chunk < 1:
            raise ValueError(f"decoder_attention_mask: CHUNK needs a chunk size >= 1, got {chunk}")
        mask = mask & (torch.div(kp, chunk, rounding_mode="floor") == torch.div(qp, chunk, rounding_mode="floor"))
    elif attention_type != AttentionType.GLOBAL:
        raise ValueError(f"decoder_attention_mask: unsupported attention type {attention_type}")
    if q_segments is not None and k_segments is not None:
        mask = mask & (q_segments[:, :, None] == k_segments[:, None, :])
    return mask[:, None]


@dataclasses.dataclass
class DecoderKVCache:
    """One decoder layer's cache (MaxText's ``kv_cache``, PyTorch form): keys and values as attention
    reads them (after the q/k norm and RoPE), ``[B, KV, S, hd]``, with the absolute positions
    ``[B, S]`` of the cached tokens, their segment ids and image-block ids (None when not tracked).
    Layers return a new cache; a step's outputs equal a full forward over the same tokens."""

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor | None = None
    image_blocks: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key.shape[2]

    def extend(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
               segment_ids: torch.Tensor | None, image_blocks: torch.Tensor | None) -> "DecoderKVCache":
        """The cache followed by new tokens (one concatenation per tensor)."""
        def cat(a, b, dim):
            if (a is None) != (b is None):
                raise ValueError("DecoderKVCache: segment ids / image blocks must be tracked for every step or none")
            return None if a is None else torch.cat([a, b], dim=dim)

        return DecoderKVCache(torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2),
                              torch.cat([self.positions, positions], dim=1), cat(self.segment_ids, segment_ids, 1),
                              cat(self.image_blocks, image_blocks, 1))


def decoder_positions_for(inputs: torch.Tensor, decoder_positions: torch.Tensor | None,
                          kv_cache: DecoderKVCache | None) -> torch.Tensor:
    """MaxText's ``decoder_positions [B, L]``, or positions following the cache (0, 1, ... without one)."""
    if decoder_positions is not None:
        return decoder_positions
    start = 0 if kv_cache is None else kv_cache.length
    return torch.arange(start, start + inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)


def check_decoder_call(name: str, inputs: torch.Tensor, model_mode: str, kv_cache: DecoderKVCache | None, *,
                       hidden_size: int | None = None, decoder_segment_ids: torch.Tensor | None = None,
                       decoder_positions: torch.Tensor | None = None, bidirectional_mask: torch.Tensor | None = None,
                       previous_chunk=None, page_state=None, slot=None, attention_metadata=None) -> None:
    """The argument checks every decoder layer's MaxText-style call shares: clear errors naming the
    argument and its expected form, before any kernel sees a mismatched shape, dtype or device."""
    if model_mode not in MODEL_MODES:
        raise ValueError(f"{name}: `model_mode` must be one of {MODEL_MODES}, got {model_mode!r}")
    if inputs.dim() != 3:
        raise ValueError(f"{name}: `inputs` must be [B, L, D], got {list(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"{name}: `inputs` must be a floating-point tensor (the hidden states), got {inputs.dtype}")
    if hidden_size is not None and inputs.shape[2] != hidden_size:
        raise ValueError(f"{name}: `inputs` must be [B, L, {hidden_size}] (D = the config's hidden_size), got "
                         f"{list(inputs.shape)}")
    batch, length = inputs.shape[0], inputs.shape[1]
    for arg, t in (("decoder_segment_ids", decoder_segment_ids), ("decoder_positions", decoder_positions),
                   ("bidirectional_mask", bidirectional_mask)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[0] != batch or t.shape[1] != length:
            raise ValueError(f"{name}: `{arg}` must be [B, L] = [{batch}, {length}] (one per token of `inputs`), "
                             f"got {list(t.shape)}")
        if t.device != inputs.device:
            raise ValueError(f"{name}: `{arg}` must be on the device of `inputs` ({inputs.device}), got {t.device}")
    if bidirectional_mask is not None and bidirectional_mask.dtype != torch.bool:
        raise TypeError(f"{name}: `bidirectional_mask` must be a bool tensor (True for image tokens), got "
                        f"{bidirectional_mask.dtype}")
    if model_mode == "autoregressive" and kv_cache is None:
        raise ValueError(f'{name}: model_mode="autoregressive" needs the `kv_cache` of the earlier tokens '
                         '(run model_mode="prefill" first)')
    if model_mode == "train" and kv_cache is not None:
        raise ValueError(f'{name}: model_mode="train" takes no `kv_cache` (use "autoregressive")')
    if kv_cache is not None and kv_cache.key.shape[0] != batch:
        raise ValueError(f"{name}: `kv_cache` holds {kv_cache.key.shape[0]} sequences but `inputs` has B = {batch}")
    for arg, value in (("previous_chunk", previous_chunk), ("page_state", page_state), ("slot", slot),
                       ("attention_metadata", attention_metadata)):
        if value is not None:
            raise NotImplementedError(f"{name}: `{arg}` (MaxText's paged / chunked-prefill state) is not supported; "
                                      "pass kv_cache instead")


def check_attention_heads(name: str, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """A decoder config's attention shape: GQA groups divide the heads, RoPE pairs the head dim."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{name}: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"{name}: head_dim must be even (RoPE pairs), got {head_dim}")


def rope_inverse_frequencies(head_dim: int, theta: float, *, linear_factor: float | None = None,
                             llama3_scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE inverse frequencies ``1 / theta^(arange(0, hd, 2) / hd)`` in float32, computed as HF
    computes them, with HF's rescalings as options: ``linear_factor`` divides them all (``rope_type
    "linear"``, Gemma 3's global layers); ``llama3_scaling`` (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``; Llama 4 Scout) divides wavelengths
    longer than ``original / low_freq_factor`` by ``factor``, keeps those shorter than ``original /
    high_freq_factor`` and interpolates smoothly between."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if linear_factor is not None:
        inv_freq = inv_freq / linear_factor
    if llama3_scaling is None:
        return inv_freq
    factor, low = llama3_scaling["factor"], llama3_scaling["low_freq_factor"]
    high, original = llama3_scaling["high_freq_factor"], llama3_scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def decoder_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   attention_type: AttentionType, kv_cache: DecoderKVCache | None, *, scale: float,
                   dropout_p: float = 0.0, window: int | None = None, chunk: int | None = None,
                   segment_ids: torch.Tensor | None = None, image_blocks: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, DecoderKVCache]:
    """A decoder layer's attention after its q/k preparation: ``q [B, H, L, hd]``, ``k``/``v``
    ``[B, KV, L, hd]`` of the new tokens appended to ``kv_cache``, the layer's mask
    (:func:`decoder_attention_mask`), SDPA with GQA. Returns ``(out [B, L, H * hd], cache)``."""
    cache = (DecoderKVCache(k, v, positions, segment_ids, image_blocks) if kv_cache is None
             else kv_cache.extend(k, v, positions, segment_ids, image_blocks))
    mask = decoder_attention_mask(positions, cache.positions, attention_type, window=window, chunk=chunk,
                                  q_segments=segment_ids, k_segments=cache.segment_ids, q_blocks=image_blocks,
                                  k_blocks=cache.image_blocks)
    out = F.scaled_dot_product_attention(q, cache.key, cache.value, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    b, heads, length, hd = q.shape
    return out.transpose(1, 2).reshape(b, length, heads * hd), cache


def run_decoder_layers(block: nn.Module, inputs: torch.Tensor, model_mode: str, kv_cache: list | None,
                       decoder_positions: torch.Tensor | None,
                       call: Callable[[nn.Module, torch.Tensor, "DecoderKVCache | None", torch.Tensor, "RopeTables"],
                                      tuple]):
    """A scannable block's loop over ``layers_{i}``: ``call(layer, y, cache_i, positions, rope_tables)``
    returns ``(y, cache)``; the positions (``decoder_positions``, or following the caches) and their
    cos/sin tables are computed once for all layers. The block returns ``y`` for
    ``model_mode="train"``, else ``(y, [per-layer caches])``."""
    n = block.num_of_layers
    if kv_cache is not None and len(kv_cache) != n:
        raise ValueError(f"{type(block).__name__}: `kv_cache` must hold one cache per layer ({n}), got {len(kv_cache)}")
    positions = decoder_positions_for(inputs, decoder_positions, None if not kv_cache else kv_cache[0])
    tables = RopeTables(positions)
    y, caches = inputs, []
    for i in range(n):
        y, cache = call(getattr(block, f"layers_{i}"), y, None if kv_cache is None else kv_cache[i], positions, tables)
        caches.append(cache)
    return y if model_mode == "train" else (y, caches)


class RopeTables:
    """The RoPE cos/sin of one decoder forward's positions ``[B, L]``, computed once per RoPE setting
    (head dim, theta, scaling) and shared by every layer with that setting, as HF's text models
    compute ``position_embeddings`` once per forward. Each table is float32 ``[B, L, hd / 2]``, one
    value per rotated pair: angles ``positions * inv_freq`` in float32 (HF's rotary embeddings'
    product) and torch's cos/sin; ``qkv_norm_rope`` reads them (``rope_cos`` / ``rope_sin``) and rounds
    them to its ``rope_dtype`` (Gemma 3: the activation dtype, as HF's ``cos.to(x.dtype)``)."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self._tables: dict = {}

    def get(self, head_dim: int, theta: float, *, linear_factor: float | None = None,
            llama3_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (head_dim, float(theta), linear_factor,
               None if llama3_scaling is None else tuple(sorted(llama3_scaling.items())))
        if key not in self._tables:
            freqs = rope_inverse_frequencies(head_dim, theta, linear_factor=linear_factor,
                                             llama3_scaling=llama3_scaling, device=self.positions.device)
            angle = self.positions.float()[..., None] * freqs
            self._tables[key] = (angle.cos(), angle.sin())
        return self._tables[key]

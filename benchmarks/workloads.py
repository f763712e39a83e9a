"""Registry of benchmark workloads (performance.md §8, W1-W8; W9: HF models patched by vitops.hf.patch;
W10: packed mixed-resolution encoding against HF's padded batch).

A workload is one `Workload` entry: an id (W1..W8), an op name, the shapes it runs (full and
smoke) and a `build(shape, device, dtype)` that returns a `Setup`: the input tensors, the HF
callable (the eager contender; the runner derives the torch.compile contender from the same
callable) and a factory for the vitops callable. A vitops factory raises NotImplementedCase
when the op/module it needs is not there yet, so the case is listed as "not implemented" and the
HF baselines are still measured. Adding an op or tower = one builder function + one entry in
WORKLOADS.

Every HF contender calls the installed transformers' own functions/modules (no re-implementation),
so the baseline moves with transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from harness import NotImplementedCase

try:  # the suite must still produce HF baselines when vitops is not built
    import vitops
    from vitops import _loader as _vitops_loader

    _VITOPS_ERROR = None
except Exception as e:  # noqa: BLE001
    vitops = None
    _vitops_loader = None
    _VITOPS_ERROR = str(e)


@dataclass
class Setup:
    args: tuple  # positional inputs handed to every contender
    hf: Callable  # HF eager callable(*args)
    vitops: Callable[[], Callable]  # factory -> vitops callable(*args); may raise NotImplementedCase
    grad_leaves: list  # tensors that get gradients in fwd+bwd mode
    bytes_fwd: int | None  # minimum bytes a forward must move (None: compute-bound, no % copy)
    bytes_bwd: int | None  # minimum bytes of forward+backward


@dataclass
class Workload:
    id: str
    op: str
    description: str
    shapes: list  # list of dicts (labels + parameters)
    smoke_shapes: list
    build: Callable[[dict, str, torch.dtype], Setup]
    backward: bool = True
    tags: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def require_op(name: str, device: str) -> Callable:
    """The vitops wrapper `name` if it exists and has a kernel for `device`."""
    if vitops is None:
        raise NotImplementedCase(f"vitops not importable ({_VITOPS_ERROR})")
    fn = getattr(vitops.ops, name, None)
    if fn is None:
        raise NotImplementedCase(f"vitops.ops.{name} does not exist yet")
    try:
        has = _vitops_loader.has_kernel(name, "CUDA" if device == "cuda" else "CPU")
    except Exception:  # no schema registered
        has = False
    if not has:
        raise NotImplementedCase(f"vitops::{name} has no {device} kernel in this build")
    return fn


def require_module(path: str, attr: str) -> object:
    if vitops is None:
        raise NotImplementedCase(f"vitops not importable ({_VITOPS_ERROR})")
    import importlib

    try:
        mod = importlib.import_module(path)
    except ImportError:
        raise NotImplementedCase(f"{path} does not exist yet") from None
    if not hasattr(mod, attr):
        raise NotImplementedCase(f"{path}.{attr} does not exist yet")
    return getattr(mod, attr)


def _isz(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Released Gemma 4 vision towers (performance.md §5): E2B/E4B and 26B/31B.
G4_MODELS = {
    "g4-e4b": dict(D=768, H=12, hd=64, mlp=3072, layers=16),
    "g4-31b": dict(D=1152, H=16, hd=72, mlp=4304, layers=27),
}
G4_SMOKE = dict(D=64, H=2, hd=32, mlp=128, layers=1)
POOL_K = 3  # Gemma 4 pooling kernel: L = 9 * soft tokens


def g4_config(m: dict, **kw):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    return Gemma4VisionConfig(
        hidden_size=m["D"], intermediate_size=m["mlp"], num_hidden_layers=m["layers"],
        num_attention_heads=m["H"], num_key_value_heads=m["H"], head_dim=m["hd"],
        attn_implementation="sdpa", **kw,
    )


# Aspect ratios (width / height) cycled through the images of a batch, so a batch mixes
# resolutions: the first is an exact fill at the usual budgets (e.g. 14 x 20 pooled = 280),
# the others leave padding patches (-1, -1) at the end as the HF processor does.
_ASPECTS = (0.7, 1.0, 16 / 9, 9 / 16, 4 / 3)


def g4_positions(batch: int, tokens: int, device: str, k: int = POOL_K) -> torch.Tensor:
    """[B, k*k*tokens, 2] int64 (x, y) patch coordinates, row-major, padded with (-1, -1)."""
    seq = k * k * tokens
    out = torch.full((batch, seq, 2), -1, dtype=torch.int64)
    for b in range(batch):
        a = _ASPECTS[b % len(_ASPECTS)]
        pw = max(1, min(tokens, int(math.sqrt(tokens * a))))
        ph = max(1, tokens // pw)
        ys, xs = torch.meshgrid(torch.arange(k * ph), torch.arange(k * pw), indexing="ij")
        pos = torch.stack([xs, ys], -1).reshape(-1, 2)
        out[b, : pos.shape[0]] = pos
    return out.to(device)


def _g4_shapes(batches=(1, 8, 32), tokens=(70, 280, 1120), video=False):
    shapes = [dict(model=m, T=t, B=b) for m in G4_MODELS for t in tokens for b in batches]
    if video:  # 32 video frames at 70 soft tokens each (vLLM gemma4_mm)
        shapes += [dict(model=m, T=70, B=32, video=True) for m in G4_MODELS]
    return shapes


def _g4_dims(shape):
    return G4_SMOKE if shape["model"] == "smoke" else G4_MODELS[shape["model"]]


_G4_SMOKE_SHAPES = [dict(model="smoke", T=4, B=1), dict(model="smoke", T=4, B=2)]


# ------------------------------------------------------------------------------------------------
# W1: Gemma 4 factorized 2-D position embedding (+ patch embedding)
# ------------------------------------------------------------------------------------------------
def build_g4_posemb(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPatchEmbedder

    m = _g4_dims(shape)
    emb = Gemma4VisionPatchEmbedder(g4_config(m)).to(device=device, dtype=dtype)
    torch.nn.init.normal_(emb.position_embedding_table)
    pos = g4_positions(shape["B"], shape["T"], device)
    pad = (pos == -1).all(dim=-1)  # computed once per forward by Gemma4VisionModel, not per op
    table = emb.position_embedding_table
    bsz, seq, d, ds = pos.shape[0], pos.shape[1], m["D"], _isz(dtype)
    distinct_rows = int(pos[..., 0].unique().numel() + pos[..., 1].unique().numel())
    fwd = pos.numel() * 8 + bsz * seq * d * ds + distinct_rows * d * ds
    bwd = fwd + bsz * seq * d * ds + table.numel() * ds  # + read grad_out, write the dense table grad

    def hf(pos, pad):
        return emb._position_embeddings(pos, pad)

    def vit():
        op = require_op("factorized_posemb", device)
        return lambda pos, pad: op(table, pos)

    return Setup((pos, pad), hf, vit, [table], fwd, bwd)


def build_g4_patch_embed(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPatchEmbedder

    m = _g4_dims(shape)
    emb = Gemma4VisionPatchEmbedder(g4_config(m)).to(device=device, dtype=dtype)
    pos = g4_positions(shape["B"], shape["T"], device)
    pad = (pos == -1).all(dim=-1)
    patch_dim = 3 * emb.patch_size**2
    # pixel values arrive in float32 from the image processor; HF casts them to the weight dtype
    pixels = torch.rand(pos.shape[0], pos.shape[1], patch_dim, device=device)
    bsz, seq, d, ds = pos.shape[0], pos.shape[1], m["D"], _isz(dtype)
    fwd = pixels.numel() * 4 + emb.input_proj.weight.numel() * ds + bsz * seq * d * ds + pos.numel() * 8

    def hf(pixels, pos, pad):
        return emb(pixels, pos, pad)

    def vit():
        op = require_op("patch_embed", device)  # fused GEMM + posemb epilogue (planned)
        return lambda pixels, pos, pad: op(pixels, emb.input_proj.weight, emb.position_embedding_table, pos)

    return Setup((pixels, pos, pad), hf, vit, [emb.input_proj.weight, emb.position_embedding_table], fwd, None)


# ------------------------------------------------------------------------------------------------
# W2: Gemma 4 Q/K(/V) norms + multidimensional RoPE; Q/K/V are strided views of a fused QKV
# ------------------------------------------------------------------------------------------------
def _g4_qkv(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionRotaryEmbedding

    m = _g4_dims(shape)
    cfg = g4_config(m)
    pos = g4_positions(shape["B"], shape["T"], device)
    bsz, seq, h, hd = pos.shape[0], pos.shape[1], m["H"], m["hd"]
    qkv = torch.randn(bsz, seq, 3 * h * hd, device=device, dtype=dtype)
    rotary = Gemma4VisionRotaryEmbedding(cfg).to(device)
    # cos/sin are built once per tower forward and shared by all layers, so they are inputs here
    # (not timed) rather than part of the per-layer op.
    cos, sin = rotary(qkv, pos)

    def views(qkv):
        return [qkv[..., i * h * hd : (i + 1) * h * hd].view(bsz, seq, h, hd) for i in range(3)]

    return cfg, m, pos, qkv, cos, sin, views, bsz * seq * h * hd * _isz(dtype)


def build_g4_rope(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

    cfg, m, pos, qkv, cos, sin, views, qbytes = _g4_qkv(shape, device, dtype)
    theta = cfg.rope_parameters["rope_theta"]

    def hf(qkv, cos, sin, pos):
        q, k, _ = views(qkv)
        return apply_multidimensional_rope(q, cos, sin, pos), apply_multidimensional_rope(k, cos, sin, pos)

    def vit():
        op = require_op("apply_multidimensional_rope", device)

        def f(qkv, cos, sin, pos):
            q, k, _ = views(qkv)
            return op(q, pos, base_frequency=theta), op(k, pos, base_frequency=theta)

        return f

    fwd = 4 * qbytes + pos.numel() * 8  # read Q, K; write Q, K
    return Setup((qkv, cos, sin, pos), hf, vit, [qkv], fwd, 2 * fwd)


def build_g4_qkv_norm_rope(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionAttention, apply_multidimensional_rope

    cfg, m, pos, qkv, cos, sin, views, qbytes = _g4_qkv(shape, device, dtype)
    attn = Gemma4VisionAttention(cfg, layer_idx=0).to(device=device, dtype=dtype)

    def hf(qkv, cos, sin, pos):
        # exactly the non-GEMM part of Gemma4VisionAttention.forward, using its own norm modules
        q, k, v = views(qkv)
        q = apply_multidimensional_rope(attn.q_norm(q), cos, sin, pos).transpose(1, 2)
        k = apply_multidimensional_rope(attn.k_norm(k), cos, sin, pos).transpose(1, 2)
        v = attn.v_norm(v).transpose(1, 2)
        return q, k, v

    def vit():
        op = require_op("qkv_norm_rope", device)
        eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
        return lambda qkv, cos, sin, pos: op(*views(qkv), attn.q_norm.weight, attn.k_norm.weight, pos,
                                             eps=eps, base_frequency=theta)

    fwd = 6 * qbytes + pos.numel() * 8
    return Setup((qkv, cos, sin, pos), hf, vit, [qkv, attn.q_norm.weight, attn.k_norm.weight], fwd, 2 * fwd)


# ------------------------------------------------------------------------------------------------
# W3: Gemma 4 pooler (k = 3 pooling by positions + sqrt(D) scale)
# ------------------------------------------------------------------------------------------------
def build_g4_pool(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPooler

    m = _g4_dims(shape)
    pooler = Gemma4VisionPooler(g4_config(m))
    tokens = shape["T"]
    pos = g4_positions(shape["B"], tokens, device)
    pad = (pos == -1).all(dim=-1)
    hidden = torch.randn(pos.shape[0], pos.shape[1], m["D"], device=device, dtype=dtype)
    bsz, d, ds = pos.shape[0], m["D"], _isz(dtype)
    valid = int((~pad).sum())
    # read valid rows + positions, write fp32 pooled output (HF returns float32) + mask
    fwd = valid * d * ds + pos.numel() * 8 + bsz * tokens * (d * 4 + 1)
    bwd = fwd + bsz * tokens * d * 4 + hidden.numel() * ds

    def hf(hidden, pos, pad):
        return pooler(hidden, pos, pad, output_length=tokens)

    def vit():
        # The fused exit (pooling + sqrt(D) scale; no standardize, like the HF pooler alone).
        op = require_op("avg_pool_scale_standardize", device)
        root = pooler.root_hidden_size
        return lambda hidden, pos, pad: op(hidden, pos, tokens, root)

    return Setup((hidden, pos, pad), hf, vit, [hidden], fwd, bwd)


def build_g4_pool_by_positions(shape, device, dtype):
    """The pooling alone: HF's Gemma4VisionPooler._avg_pool_by_positions vs vitops.avg_pool_by_positions."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionPooler

    m = _g4_dims(shape)
    pooler = Gemma4VisionPooler(g4_config(m))
    tokens = shape["T"]
    pos = g4_positions(shape["B"], tokens, device)
    pad = (pos == -1).all(dim=-1)
    # HF zeroes padded rows before this function; give both contenders the same zeroed input.
    hidden = torch.randn(pos.shape[0], pos.shape[1], m["D"], device=device, dtype=dtype).masked_fill(pad[..., None], 0)
    bsz, d, ds = pos.shape[0], m["D"], _isz(dtype)
    valid = int((~pad).sum())
    fwd = valid * d * ds + pos.numel() * 8 + bsz * tokens * (d * ds + 1)
    bwd = fwd + bsz * tokens * d * ds + hidden.numel() * ds

    def hf(hidden, pos):
        return pooler._avg_pool_by_positions(hidden, pos, tokens)

    def vit():
        op = require_op("avg_pool_by_positions", device)
        return lambda hidden, pos: op(hidden, positions_xy=pos, length=tokens)

    return Setup((hidden, pos), hf, vit, [hidden], fwd, bwd)


def build_g4_patchify(shape, device, dtype):
    """Images -> patches + positions: HF's PIL-backend processor step (numpy, one image at a time, as
    the processor calls it) vs vitops.patchify on the NHWC batch."""
    import numpy as np
    from transformers.models.gemma4.image_processing_pil_gemma4 import convert_image_to_patches

    p, k = 16, POOL_K
    side = int(math.sqrt(shape["T"])) * k * p  # a square image that fills the token budget
    images = torch.rand(shape["B"], side, side, 3, device=device, dtype=dtype)
    chw = [np.ascontiguousarray(img.permute(2, 0, 1).float().cpu().numpy()) for img in images]
    fwd = 2 * images.numel() * _isz(dtype)

    def hf(images):
        return [convert_image_to_patches(img, p) for img in chw]

    def vit():
        op = require_op("patchify", device)
        return lambda images: op(images, p)

    return Setup((images,), hf, vit, [], fwd, None)


# ------------------------------------------------------------------------------------------------
# W4: Gemma 3 projector (4x4 AvgPool + Gemma RMSNorm + projection to the text width)
# ------------------------------------------------------------------------------------------------
def _g3_config(smoke: bool, text_width: int):
    from transformers import Gemma3Config

    if smoke:
        vis = dict(hidden_size=32, image_size=56, patch_size=14, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, vision_use_head=False)
        return Gemma3Config(vision_config=vis, text_config=dict(hidden_size=48), mm_tokens_per_image=4)
    vis = dict(hidden_size=1152, image_size=896, patch_size=14, intermediate_size=4304, num_hidden_layers=27,
               num_attention_heads=16, vision_use_head=False)  # as Gemma 3 builds SigLIP
    return Gemma3Config(vision_config=vis, text_config=dict(hidden_size=text_width), mm_tokens_per_image=256)


def build_g3_projector(shape, device, dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = _g3_config(shape.get("smoke", False), shape.get("text", 2560))
    proj = Gemma3MultiModalProjector(cfg).to(device=device, dtype=dtype)
    torch.nn.init.normal_(proj.mm_input_projection_weight, std=0.02)
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    x = torch.randn(shape["B"], n, cfg.vision_config.hidden_size, device=device, dtype=dtype)
    ds = _isz(dtype)
    out_bytes = shape["B"] * cfg.mm_tokens_per_image * cfg.text_config.hidden_size * ds
    fwd = x.numel() * ds + proj.mm_input_projection_weight.numel() * ds + out_bytes

    def vit():
        op = require_op("avg_pool_rms_norm", device)  # the fused pool + Gemma RMSNorm; the GEMM stays a GEMM
        eps = cfg.vision_config.layer_norm_eps
        return lambda x: torch.matmul(op(x, cfg.mm_tokens_per_image, proj.mm_soft_emb_norm.weight, eps=eps),
                                      proj.mm_input_projection_weight)

    return Setup((x,), proj, vit, [x], fwd, None)


def build_g3_exit(shape, device, dtype):
    """W4's memory-bound part alone: the pooling and the soft-embedding norm before the GEMM."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = _g3_config(shape.get("smoke", False), 2560)
    proj = Gemma3MultiModalProjector(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        proj.mm_soft_emb_norm.weight.normal_(0, 0.5)  # HF initialises it to zeros
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    d = cfg.vision_config.hidden_size
    x = torch.randn(shape["B"], side * side, d, device=device, dtype=dtype)
    eps = cfg.vision_config.layer_norm_eps

    def hf(x):  # Gemma3MultiModalProjector.forward up to its matmul, through HF's own modules
        grid = x.transpose(1, 2).reshape(x.shape[0], d, side, side).contiguous()
        return proj.mm_soft_emb_norm(proj.avg_pool(grid).flatten(2).transpose(1, 2))

    def vit():
        op = require_op("avg_pool_rms_norm", device)
        return lambda x: op(x, cfg.mm_tokens_per_image, proj.mm_soft_emb_norm.weight, eps=eps)

    ds = _isz(dtype)
    out_bytes = shape["B"] * cfg.mm_tokens_per_image * d * ds
    fwd = x.numel() * ds + out_bytes
    # backward: read x and grad_output, write grad_x (the weight gradient is D floats)
    bwd = fwd + 2 * x.numel() * ds + out_bytes
    return Setup((x,), hf, vit, [x, proj.mm_soft_emb_norm.weight], fwd, bwd)


# ------------------------------------------------------------------------------------------------
# W5: Llama 4 pixel shuffle; W6: Llama 4 vision RoPE (complex multiply)
# ------------------------------------------------------------------------------------------------
def _l4_config(smoke: bool):
    from transformers import Llama4VisionConfig

    if smoke:
        return Llama4VisionConfig(hidden_size=64, num_attention_heads=4, image_size=56, patch_size=14,
                                  num_hidden_layers=1, intermediate_size=256, vision_output_dim=64,
                                  projector_input_dim=64, projector_output_dim=64)
    # Llama 4 Scout/Maverick vision tower (their released config; the class defaults differ)
    return Llama4VisionConfig(hidden_size=1408, num_attention_heads=16, image_size=336, patch_size=14,
                              num_hidden_layers=34, intermediate_size=5632, vision_output_dim=4096,
                              projector_input_dim=4096, projector_output_dim=4096, pixel_shuffle_ratio=0.5)


def build_l4_pixel_shuffle(shape, device, dtype):
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle

    cfg = _l4_config(shape.get("smoke", False))
    n = (cfg.image_size // cfg.patch_size) ** 2
    full = torch.randn(shape["tiles"], n + 1, cfg.hidden_size, device=device, dtype=dtype)
    ratio = cfg.pixel_shuffle_ratio
    fwd = 2 * shape["tiles"] * n * cfg.hidden_size * _isz(dtype)

    def hf(full):
        return pixel_shuffle(full[:, :-1], ratio)  # the CLS token is dropped first, as in HF

    def vit():
        op = require_op("pixel_shuffle", device)
        return lambda full: op(full[:, :-1], ratio)

    return Setup((full,), hf, vit, [full], fwd, 2 * fwd)


def build_l4_rope(shape, device, dtype):
    """q and k as HF's Llama4VisionAttention has them (``layout=separate``: views of the q_proj and
    k_proj outputs) or as strided views of one fused QKV projection (``layout=fused``, performance.md
    section 8: both layouts). In fwd+bwd the fused layout adds autograd's slice backward (a zero-filled
    [tiles, 577, 3 * 1408] gradient per view, then their sum) to both contenders."""
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding, vision_apply_rotary_emb

    cfg = _l4_config(shape.get("smoke", False))
    seq = (cfg.image_size // cfg.patch_size) ** 2 + 1
    h = cfg.num_attention_heads
    hd = cfg.hidden_size // h
    tiles = shape["tiles"]
    fused = shape.get("layout", "fused") == "fused"
    if fused:
        buffers = [torch.randn(tiles, seq, 3 * h * hd, device=device, dtype=dtype)]
    else:
        buffers = [torch.randn(tiles, seq, h * hd, device=device, dtype=dtype) for _ in range(2)]
    freqs = Llama4VisionRotaryEmbedding(cfg).freqs_ci.to(device)

    def views(*bufs):
        if fused:
            return [bufs[0][..., i * h * hd : (i + 1) * h * hd].view(tiles, seq, h, hd) for i in range(2)]
        return [b.view(tiles, seq, h, hd) for b in bufs]

    def hf(*args):
        *bufs, freqs = args
        return vision_apply_rotary_emb(*views(*bufs), freqs)

    def vit():
        # the one RoPE op: interleaved pairs, 1-based (column, row) positions, CLS at (0, 0), float32
        # cos/sin; v=None as Llama4VisionAttention calls it (v is not normalised, attention reads its
        # projection view), so it moves the bytes HF's rotation moves
        op = require_op("qkv_norm_rope", device)
        from vitops.models.llama4 import vision_positions

        pos = vision_positions(cfg.image_size // cfg.patch_size, device).expand(tiles, -1, -1)

        def run(*args):
            *bufs, _ = args
            q, k, _ = op(*views(*bufs), None, None, None, pos, base_frequency=cfg.rope_parameters["rope_theta"],
                         rope_dtype=torch.float32, norm="none", v_norm=False, pairing="interleaved")
            return q.transpose(1, 2), k.transpose(1, 2)  # HF's [B, L, H, hd] (views of the op's rows)

        return run

    fwd = 4 * tiles * seq * h * hd * _isz(dtype)
    return Setup((*buffers, freqs), hf, vit, buffers, fwd, 2 * fwd)


# ------------------------------------------------------------------------------------------------
# W7: generic 1-D RoPE and RMSNorm sanity shapes (Liger's)
# ------------------------------------------------------------------------------------------------
def build_rope_1d(shape, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hq, hk, hd, seq, bsz = shape["Hq"], shape["Hkv"], shape["hd"], shape["S"], shape.get("B", 1)
    cfg = LlamaConfig(hidden_size=hq * hd, num_attention_heads=hq, num_key_value_heads=hk, head_dim=hd)
    q = torch.randn(bsz, seq, hq, hd, device=device, dtype=dtype)
    k = torch.randn(bsz, seq, hk, hd, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device).expand(bsz, seq)
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(q, pos)
    theta = cfg.rope_parameters["rope_theta"]

    def hf(q, k, cos, sin, pos):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [B, S, H, hd] layout

    def vit():
        op = require_op("apply_multidimensional_rope", device)
        return lambda q, k, cos, sin, pos: (op(q, pos, base_frequency=theta), op(k, pos, base_frequency=theta))

    fwd = 2 * (q.numel() + k.numel()) * _isz(dtype)
    return Setup((q, k, cos, sin, pos), hf, vit, [q, k], fwd, 2 * fwd)


def build_g3_qk_norm_rope(shape, device, dtype):
    """Gemma 3 text attention's q/k entry (4B: 8 q heads, 4 kv heads, head_dim 256) on the q_proj /
    k_proj outputs: HF's q_norm / k_norm (Gemma3RMSNorm, x * (1 + w)) then apply_rotary_pos_emb with
    cos/sin of the global layers' table (theta 1e6, linear factor 8) in the activation dtype; cos/sin
    are precomputed (HF's model computes them once per forward for all layers) and given to both sides:
    the op reads them (``rope_cos`` / ``rope_sin``) instead of evaluating angles."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3RotaryEmbedding, apply_rotary_pos_emb

    hq, hk, hd, seq, bsz = shape["Hq"], shape["Hkv"], shape["hd"], shape["S"], shape.get("B", 1)
    cfg = Gemma3TextConfig(hidden_size=hq * hd, num_attention_heads=hq, num_key_value_heads=hk, head_dim=hd,
                           num_hidden_layers=6)
    q_norm, k_norm = (Gemma3RMSNorm(hd, cfg.rms_norm_eps).to(device=device, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        q_norm.weight.normal_(0, 0.3)
        k_norm.weight.normal_(0, 0.3)
    q = torch.randn(bsz, seq, hq * hd, device=device, dtype=dtype)
    k = torch.randn(bsz, seq, hk * hd, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device).expand(bsz, seq)
    rotary = Gemma3RotaryEmbedding(cfg).to(device)
    cos, sin = rotary(q, pos, "full_attention")

    def hf(q, k, cos, sin, pos):
        qs = q_norm(q.view(bsz, seq, hq, hd).transpose(1, 2))
        ks = k_norm(k.view(bsz, seq, hk, hd).transpose(1, 2))
        return apply_rotary_pos_emb(qs, ks, cos, sin)

    def vit():
        op = require_op("qkv_norm_rope", device)
        positions = pos[..., None]

        def run(q, k, cos, sin, pos):
            # the same precomputed cos/sin HF gets (HF's [B, S, hd] form, read through its first half)
            qo, ko, _ = op(q.view(bsz, seq, hq, hd), k.view(bsz, seq, hk, hd), None, q_norm.weight, k_norm.weight,
                           positions, eps=cfg.rms_norm_eps, norm="scale_plus_one", v_norm=False, rope_cos=cos,
                           rope_sin=sin)
            return qo, ko

        return run

    fwd = 2 * (q.numel() + k.numel()) * _isz(dtype)
    return Setup((q, k, cos, sin, pos), hf, vit, [q, k, q_norm.weight, k_norm.weight], fwd, 2 * fwd)


def build_l4_moe(shape, device, dtype):
    """Llama 4's routed + shared MoE layer (HF Llama4TextMoe: every expert on every token, the
    unselected ones on zeros) against vitops' Llama4MoEBlock (tokens bucketed by expert, two grouped
    GEMMs over the routed tokens only). Widths reduced from Scout's (5120 / 8192) so that HF's
    16-expert form fits this benchmark's time; the ratio is set by E (HF does E x the expert FLOPs)."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    hidden, inter, experts, tokens = shape["H"], shape["I"], shape["E"], shape["T"]
    tc = Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                          num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=hidden // 4)
    hf_moe = Llama4TextMoe(tc).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf_moe.parameters():  # HF initialises the experts to zeros
            p.copy_((torch.randn(p.shape, generator=g) * p.shape[-2] ** -0.5).to(dtype))
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def hf(x):
        return hf_moe(x)[0]

    def vit():
        mod = require_module("vitops.models.llama4", "Llama4MoEBlock")
        from vitops.hf.llama4 import decoder_config_from_hf

        ours = mod(decoder_config_from_hf(tc)[0], device=device, dtype=dtype)
        with torch.no_grad():
            ours.gate.weight.copy_(hf_moe.router.weight)
            ours.wi.copy_(hf_moe.experts.gate_up_proj)
            ours.wo.copy_(hf_moe.experts.down_proj)
            for a, b in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                getattr(ours.shared_experts, a).weight.copy_(getattr(hf_moe.shared_expert, b).weight)
        return ours

    return Setup((x,), hf, vit, [x], None, None)


def build_rms_norm(shape, device, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(shape["H"]).to(device=device, dtype=dtype)
    x = torch.randn(shape["M"], shape["H"], device=device, dtype=dtype)

    def vit():
        op = require_op("rms_norm", device)
        return lambda x: op(x, norm.weight, norm.variance_epsilon)

    fwd = 2 * x.numel() * _isz(dtype)
    return Setup((x,), norm, vit, [x, norm.weight], fwd, 2 * fwd)


# ------------------------------------------------------------------------------------------------
# W8: whole vision towers (random weights at the released configs; GEMM/attention dominated, so
# no bytes figure). vitops towers are looked up in vitops.models; until they exist the HF
# eager/compile numbers are still recorded as the baseline.
# ------------------------------------------------------------------------------------------------
def build_g4_tower(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    m = _g4_dims(shape)
    model = Gemma4VisionModel(g4_config(m)).to(device=device, dtype=dtype).eval()
    pos = g4_positions(shape["B"], shape["T"], device)
    pixels = torch.rand(pos.shape[0], pos.shape[1], 3 * 16 * 16, device=device)

    def hf(pixels, pos):
        return model(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state

    def vit():
        from_hf = require_module("vitops.hf", "from_hf")
        tower, _ = from_hf(model.config, model.state_dict(), projector=False, dtype=dtype, device=device)
        # HF's flattened output (padding slots stripped), like Gemma4VisionModel.
        return lambda pixels, pos: tower.forward_flat(pixels.to(dtype), pos)

    return Setup((pixels, pos), hf, vit, [], None, None)


def build_g3_tower(shape, device, dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    cfg = _g3_config(shape.get("smoke", False), 2560)
    cfg.vision_config._attn_implementation = "sdpa"
    vis = SiglipVisionModel(cfg.vision_config).to(device=device, dtype=dtype).eval()
    proj = Gemma3MultiModalProjector(cfg).to(device=device, dtype=dtype)
    size = cfg.vision_config.image_size
    pixels = torch.rand(shape["B"], 3, size, size, device=device, dtype=dtype)

    def hf(pixels):
        return proj(vis(pixel_values=pixels).last_hidden_state)

    def vit():
        require_module("vitops.hf.gemma3", "from_hf")
        require_module("vitops.models.gemma3", "encode_images")
        from vitops.hf import gemma3 as hf_gemma3
        from vitops.models.gemma3 import encode_images

        sd = {**{f"vision_tower.{k}": v for k, v in vis.state_dict().items()},
              **{f"multi_modal_projector.{k}": v for k, v in proj.state_dict().items()}}
        tower, embedder = hf_gemma3.from_hf(cfg, sd, dtype=dtype, device=device)
        # the MaxText-style tower takes NHWC images; this view of HF's NCHW pixels is undone without
        # a copy before the patch convolution; the exit pooling and the projector norm are one op
        return lambda pixels: encode_images(tower, embedder, pixels.permute(0, 2, 3, 1)[:, None])

    return Setup((pixels,), hf, vit, [], None, None)


def _l4_hf_model(shape, device, dtype):
    """``(config, HF Llama4VisionModel, tiles)`` at the shape's size, SDPA attention."""
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    cfg = _l4_config(shape.get("smoke", False))
    cfg._attn_implementation = "sdpa"
    # .float()/.bfloat16()/.half() convert the floating tensors only: .to(dtype) would also cast HF's
    # complex RoPE buffer (freqs_ci) to a real dtype, dropping its imaginary part
    model = Llama4VisionModel(cfg).to(device=device).eval()
    model = {torch.float32: model.float, torch.bfloat16: model.bfloat16, torch.float16: model.half}[dtype]()
    pixels = torch.rand(shape["tiles"], 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    return cfg, model, pixels


def build_l4_tower(shape, device, dtype):
    cfg, model, pixels = _l4_hf_model(shape, device, dtype)

    def hf(pixels):
        return model(pixels).last_hidden_state

    def vit():
        from_hf = require_module("vitops.hf.llama4", "from_hf")
        sd = {f"vision_model.{k}": v for k, v in model.state_dict().items()}
        vmodel, _ = from_hf(cfg, sd, projector=False, dtype=dtype, device=device)
        return lambda pixels: vmodel(pixels)

    return Setup((pixels,), hf, vit, [], None, None)


# ------------------------------------------------------------------------------------------------
# W9: HF models patched in place (vitops.hf.patch) against the same HF model unpatched (eager; the
# runner adds torch.compile of the unpatched model): the vision path of each tower as HF runs it.
# ------------------------------------------------------------------------------------------------
def _patched_copy(model):
    """A deep copy of the HF ``model`` with its vision classes patched (the eager one stays HF's)."""
    import copy

    patch = require_module("vitops.hf", "patch")
    patched = copy.deepcopy(model)
    patch(patched)
    return patched


def build_g4_hf_patched(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    model = Gemma4VisionModel(g4_config(_g4_dims(shape))).to(device=device, dtype=dtype).eval()
    pos = g4_positions(shape["B"], shape["T"], device)
    pixels = torch.rand(pos.shape[0], pos.shape[1], 3 * 16 * 16, device=device)

    def run(m):
        return lambda pixels, pos: m(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state

    return Setup((pixels, pos), run(model), lambda: run(_patched_copy(model)), [], None, None)


def build_g3_hf_patched(shape, device, dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    cfg = _g3_config(shape.get("smoke", False), 2560)
    cfg.vision_config._attn_implementation = "sdpa"
    model = torch.nn.ModuleDict({
        "vision": SiglipVisionModel(cfg.vision_config), "proj": Gemma3MultiModalProjector(cfg),
    }).to(device=device, dtype=dtype).eval()
    size = cfg.vision_config.image_size
    pixels = torch.rand(shape["B"], 3, size, size, device=device, dtype=dtype)

    def run(m):
        return lambda pixels: m["proj"](m["vision"](pixel_values=pixels).last_hidden_state)

    return Setup((pixels,), run(model), lambda: run(_patched_copy(model)), [], None, None)


def build_l4_hf_patched(shape, device, dtype):
    _, model, pixels = _l4_hf_model(shape, device, dtype)

    def run(m):
        return lambda pixels: m(pixels).last_hidden_state

    return Setup((pixels,), run(model), lambda: run(_patched_copy(model)), [], None, None)


# ------------------------------------------------------------------------------------------------
# W10: packed mixed-resolution encoding (vitops.serving.encode_packed) against HF's padded batch:
# images with different soft-token budgets, HF padding every image to the largest patch count
# (its processor pads a batch to one budget) vs vitops packing them into one sequence.
# ------------------------------------------------------------------------------------------------
# Patch grids (rows, cols) of a k=3 pooled image with the given soft tokens, exact fills.
_G4_GRIDS = {1120: (32, 35), 280: (14, 20), 140: (10, 14), 70: (7, 10), 4: (2, 2), 2: (1, 2)}
G4_PACK_MIXES = {"1120+280+8x70": (1120, 280) + (70,) * 8, "32x70": (70,) * 32}


def g4_mix(tokens: tuple, device: str, k: int = POOL_K):
    """HF's padded batch of images with these soft-token counts: ``(pixels [B, Lmax, 768],
    positions [B, Lmax, 2])``, every image an exact k-aligned grid, padded to the largest."""
    seq = k * k * max(tokens)
    pos = torch.full((len(tokens), seq, 2), -1, dtype=torch.int64)
    for b, t in enumerate(tokens):
        rows, cols = _G4_GRIDS[t]
        ys, xs = torch.meshgrid(torch.arange(k * rows), torch.arange(k * cols), indexing="ij")
        grid = torch.stack([xs, ys], -1).reshape(-1, 2)
        pos[b, : grid.shape[0]] = grid
    pixels = torch.rand(len(tokens), seq, 3 * 16 * 16)
    pixels[pos[..., 0] < 0] = 0.0  # the processor's zero padding pixels
    return pixels.to(device), pos.to(device)


def packed_flops(m: dict, patch_counts, padded_to: int | None = None) -> float:
    """Matmul FLOPs of a Gemma 4 tower over images of these patch counts (projections, MLP and
    attention scores + values per layer), each image alone (packed) or padded to ``padded_to``."""
    d, heads, hd, mlp, layers = m["D"], m["H"], m["hd"], m["mlp"], m["layers"]
    lengths = [padded_to or n for n in patch_counts]
    tokens = sum(lengths)
    dense = 2 * tokens * (d * 3 * heads * hd + heads * hd * d + 3 * d * mlp)
    attention = sum(2 * 2 * heads * hd * n * n for n in lengths)
    return layers * (dense + attention)


def build_g4_packed(shape, device, dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    m = dict(_g4_dims(shape), layers=shape.get("layers", _g4_dims(shape)["layers"]))
    model = Gemma4VisionModel(g4_config(m)).to(device=device, dtype=dtype).eval()
    tokens = G4_PACK_MIXES[shape["mix"]] if "mix" in shape else tuple(shape["tokens"])
    pixels, pos = g4_mix(tokens, device)

    def hf(pixels, pos):
        # HF's padded batch: every image padded to the largest; output flattened (padding slots dropped)
        return model(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state

    def vit():
        from_hf = require_module("vitops.hf", "from_hf")
        packed_images = require_module("vitops.serving.packed", "PackedImages")
        tower, _ = from_hf(model.config, model.state_dict(), projector=False, dtype=dtype, device=device)

        def run(pixels, pos):
            packed = packed_images.from_padded(pixels, pos, tokens)
            out, _ = tower.forward_packed(packed.patches, packed.positions_xy, packed.segments)
            return out

        return run

    return Setup((pixels, pos), hf, vit, [], None, None)


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
_L4_TILES = [dict(tiles=t) for t in (1, 5, 17, 136)]
_L4_SMOKE = [dict(tiles=2, smoke=True)]

WORKLOADS: list[Workload] = [
    Workload("W1", "g4_posemb", "Gemma 4 factorized 2-D position embedding (HF _position_embeddings)",
             _g4_shapes(), _G4_SMOKE_SHAPES, build_g4_posemb),
    Workload("W1", "g4_patch_embed", "Gemma 4 patch embedder: input_proj GEMM + posemb (HF forward)",
             _g4_shapes(), _G4_SMOKE_SHAPES[:1], build_g4_patch_embed, backward=False),
    Workload("W2", "g4_rope", "Gemma 4 2-D RoPE on Q and K (strided views of fused QKV)",
             _g4_shapes(video=True), _G4_SMOKE_SHAPES, build_g4_rope),
    Workload("W2", "g4_qkv_norm_rope", "Gemma 4 q/k/v RMSNorms + 2-D RoPE + attention layout",
             _g4_shapes(video=True), _G4_SMOKE_SHAPES, build_g4_qkv_norm_rope),
    Workload("W3", "g4_pool", "Gemma 4 pooler: k=3 pooling by positions + sqrt(D) scale (HF forward)",
             _g4_shapes(), _G4_SMOKE_SHAPES, build_g4_pool),
    Workload("W3", "g4_pool_by_positions", "Gemma 4 pooling by positions alone (HF _avg_pool_by_positions)",
             _g4_shapes(), _G4_SMOKE_SHAPES, build_g4_pool_by_positions),
    Workload("W1", "g4_patchify", "Gemma 4 patchify of square images filling the budget (HF processor step)",
             [dict(T=t, B=b) for t in (70, 280, 1120) for b in (1, 8)], [dict(T=4, B=1)], build_g4_patchify,
             backward=False),
    Workload("W4", "g3_projector", "Gemma 3 projector: AvgPool 4x4 + RMSNorm + projection",
             [dict(B=b, text=2560) for b in (1, 5, 32)], [dict(B=2, smoke=True)], build_g3_projector,
             backward=False),
    Workload("W4", "g3_exit", "Gemma 3 exit alone: AvgPool 4x4 + Gemma RMSNorm (the projector before its GEMM)",
             [dict(B=b) for b in (1, 5, 32)], [dict(B=2, smoke=True)], build_g3_exit),
    Workload("W5", "l4_pixel_shuffle", "Llama 4 pixel shuffle 0.5 on a CLS-dropped view",
             _L4_TILES, _L4_SMOKE, build_l4_pixel_shuffle),
    Workload("W6", "l4_rope", "Llama 4 vision 2-D RoPE (complex) on Q and K",
             [dict(tiles=t, layout=lay) for t in (1, 17, 136) for lay in ("separate", "fused")],
             [dict(s, layout=lay) for s in _L4_SMOKE for lay in ("separate", "fused")], build_l4_rope),
    Workload("W7", "rope_1d", "Generic 1-D RoPE (Llama apply_rotary_pos_emb), Liger shapes",
             [dict(Hq=32, Hkv=8, hd=128, S=s) for s in (1024, 4096, 16384)],
             [dict(Hq=2, Hkv=1, hd=16, S=8)], build_rope_1d),
    Workload("W7", "g3_qk_norm_rope", "Gemma 3 text q/k Gemma RMSNorm + rotate-half RoPE (4B heads)",
             [dict(Hq=8, Hkv=4, hd=256, S=s) for s in (1024, 4096, 16384)], [dict(Hq=2, Hkv=1, hd=16, S=8)],
             build_g3_qk_norm_rope),
    Workload("W7", "l4_moe", "Llama 4 routed + shared MoE layer, top-1 of 16 experts (HF Llama4TextMoe)",
             [dict(T=t, E=16, H=512, I=256) for t in (512, 2048, 8192)], [dict(T=8, E=4, H=16, I=8)],
             build_l4_moe, backward=False),
    Workload("W7", "rms_norm", "Generic RMSNorm (LlamaRMSNorm), M=2048",
             [dict(M=2048, H=h) for h in (1152, 4096, 32768)], [dict(M=4, H=32)], build_rms_norm),
    Workload("W8", "g4_tower", "Gemma 4 vision tower end to end (SDPA)",
             [dict(model=m, T=280, B=b) for m in G4_MODELS for b in (1, 8)], [dict(model="smoke", T=4, B=1)],
             build_g4_tower, backward=False),
    Workload("W8", "g3_tower", "Gemma 3 SigLIP tower + projector end to end (SDPA)",
             [dict(B=b) for b in (1, 8)], [dict(B=1, smoke=True)], build_g3_tower, backward=False),
    Workload("W8", "l4_tower", "Llama 4 vision encoder + pixel-shuffle adapter end to end (SDPA)",
             [dict(tiles=1), dict(tiles=17)], [dict(tiles=1, smoke=True)], build_l4_tower, backward=False),
    Workload("W10", "g4_packed", "Gemma 4 tower on mixed budgets: vitops packed (encode_packed) vs HF's padded batch",
             [dict(model="g4-e4b", layers=2, mix=mx) for mx in G4_PACK_MIXES],
             [dict(model="smoke", tokens=(4, 2, 2))], build_g4_packed, backward=False),
    Workload("W9", "g4_hf_patched", "HF Gemma4VisionModel patched by vitops.hf.patch vs unpatched (SDPA)",
             [dict(model=m, T=280, B=1) for m in G4_MODELS], [dict(model="smoke", T=4, B=1)],
             build_g4_hf_patched, backward=False),
    Workload("W9", "g3_hf_patched", "HF SigLIP + Gemma3MultiModalProjector patched by vitops.hf.patch vs unpatched",
             [dict(B=1)], [dict(B=1, smoke=True)], build_g3_hf_patched, backward=False),
    Workload("W9", "l4_hf_patched", "HF Llama4VisionModel patched by vitops.hf.patch vs unpatched (SDPA)",
             [dict(tiles=1), dict(tiles=5)], [dict(tiles=1, smoke=True)], build_l4_hf_patched, backward=False),
]


def shape_label(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items() if v is not True) + (",video" if shape.get("video") else "")

"""Parity of vitops.models.gemma4_vision with HF transformers' Gemma 4 vision tower.

HF models are built from ``Gemma4VisionConfig`` with random weights (no downloads) and run with
``config._attn_implementation = "sdpa"`` (the same torch kernel as ours; "eager" is checked once
too). Our modules get HF's weights through ``vitops.hf.load_hf_state_dict``.

Errors are relative Frobenius norms ``||ours - ref|| / ||ref||``; every measured value is printed
(``pytest -s``) with the prefix ``PARITY``.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitops
from vitops import _loader
from vitops import hf as vhf
from vitops.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector

transformers = pytest.importorskip("transformers")
from transformers import Gemma4TextConfig  # noqa: E402
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel  # noqa: E402

_OPS = ("factorized_posemb", "apply_multidimensional_rope", "avg_pool_by_positions")
requires_ops = pytest.mark.skipif(
    not all(_loader.has_kernel(op, "CPU") for op in _OPS),
    reason="CPU kernels of factorized_posemb / apply_multidimensional_rope / avg_pool_by_positions not built yet",
)
pytestmark = requires_ops

# Small configs covering both released families (and GQA, a head dim that is not a power of 2).
# Every config field differs from its default in at least one of them, and the numeric ones that
# the tower passes on (rope_theta, rms_norm_eps, pooling_kernel_size, the dropouts, which eval mode
# must ignore) in every one where the family allows: a module that ignores a field, or hard-codes
# its default, fails parity. rms_norm_eps is large enough to move the outputs past the tolerances.
SMALL = {
    "e2b-like": Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16,
                                   patch_size=4, position_embedding_size=40, use_clipped_linears=True,
                                   standardize=False, text_hidden_size=48, rope_theta=37.0, rms_norm_eps=3e-3,
                                   attention_dropout=0.2),
    "26b-like-gqa": Gemma4VisionConfig(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                                       num_kv_heads=2, head_dim=12, patch_size=4, position_embedding_size=40,
                                       use_clipped_linears=False, standardize=True, text_hidden_size=40,
                                       rope_theta=10000.0, rms_norm_eps=1e-2, dropout_rate=0.3),
    # k = 2, clipped and standardized at once, gelu_new, hidden != heads * head_dim, 3 layers
    "k2-all-fields": Gemma4VisionConfig(hidden_size=40, intermediate_size=72, num_layers=3, num_heads=3,
                                        num_kv_heads=1, head_dim=20, patch_size=3, pooling_kernel_size=2,
                                        position_embedding_size=17, use_clipped_linears=True, standardize=True,
                                        text_hidden_size=24, rope_theta=7.5, rms_norm_eps=2e-2,
                                        hidden_activation="gelu_new", attention_dropout=0.1, dropout_rate=0.1,
                                        residual_dropout=0.1),
}


def grids_for(cfg: Gemma4VisionConfig):
    """Mixed resolutions in multiples of the pooling kernel: a (k, 2k), a (2k, 2k) and a (2k, k) grid."""
    k = cfg.pooling_kernel_size
    return [(k, 2 * k), (2 * k, 2 * k), (2 * k, k)]


def num_tokens(cfg, grids) -> int:
    return sum(r * c for r, c in grids) // cfg.pooling_kernel_size**2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def report(name: str, value: float) -> None:
    print(f"PARITY {name}: {value:.3e}")


# ---------------------------------------------------------------------------------------------
# Builders shared with test_gemma4_modules.py / test_checkpoints.py
# ---------------------------------------------------------------------------------------------
def randomize_hf(model: Gemma4VisionModel, embedder: Gemma4MultimodalEmbedder | None = None, seed: int = 0,
                 round_to: torch.dtype | None = None) -> None:
    """Non-trivial random weights: norms around 1, clip bounds that actually clip, random
    standardization (HF leaves std buffers as torch.empty). ``round_to`` makes every value exactly
    representable in that dtype (so float64 / bfloat16 copies hold the same weights)."""
    g = torch.Generator().manual_seed(seed)

    def rn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention logits use scale 1.0 on normalised q, k: unit norm weights give logits
                # of size ~head_dim, a near-argmax softmax and a chaotic random network in which
                # 1-ulp differences grow layer by layer. hd**-0.25 keeps the logits O(1).
                p.copy_(rn(p.shape, 0.2, 1.0) * p.shape[0] ** -0.25)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(rn(p.shape, 0.2, 1.0))
            elif "position_embedding_table" in name:
                p.copy_(rn(p.shape, 0.5))
            else:  # linear weights [out, in]
                p.copy_(rn(p.shape, 1.0 / math.sqrt(p.shape[1])))
        for name, b in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_min", "output_min"):
                b.fill_(-float(torch.empty(()).uniform_(0.8, 2.0, generator=g)))
            elif leaf in ("input_max", "output_max"):
                b.fill_(float(torch.empty(()).uniform_(0.8, 2.0, generator=g)))
            elif leaf == "std_bias":
                b.copy_(rn(b.shape, 2.0))
            elif leaf == "std_scale":
                b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=g))
        if embedder is not None:
            w = embedder.embedding_projection.weight
            w.copy_(rn(w.shape, 1.0 / math.sqrt(w.shape[1])))
        if round_to is not None:
            for t in [*model.parameters(), *model.buffers()] + ([] if embedder is None else list(embedder.parameters())):
                if t.is_floating_point():
                    t.copy_(t.to(round_to).to(t.dtype))


def make_hf(cfg: Gemma4VisionConfig, attn: str = "sdpa", seed: int = 0, round_to=None):
    hc = vhf.to_hf_vision_config(cfg, attn_implementation=attn)
    model = Gemma4VisionModel(hc).eval()
    embedder = Gemma4MultimodalEmbedder(hc, Gemma4TextConfig(hidden_size=cfg.text_hidden_size)).eval()
    randomize_hf(model, embedder, seed, round_to)
    return model, embedder


def hf_checkpoint(model, embedder, tower_prefix="model.vision_tower.", embed_prefix="model.embed_vision."):
    sd = {tower_prefix + k: v for k, v in model.state_dict().items()}
    if embedder is not None:
        sd.update({embed_prefix + k: v for k, v in embedder.state_dict().items()})
    return sd


def make_ours(cfg, model, embedder, dtype=None):
    tower = Gemma4VisionEncoderLayer(cfg, dtype=dtype).eval()
    proj = Gemma4VisionProjector(cfg, dtype=dtype).eval()
    vhf.load_hf_state_dict((tower, proj), hf_checkpoint(model, embedder))
    return tower, proj


def image_batch(cfg: Gemma4VisionConfig, grids, length=None, seed=0):
    """Padded HF-style batch: one image per (rows, cols) patch grid (multiples of k), padded with
    zero pixels at position (-1, -1) to ``length`` patches (default: the largest grid)."""
    g = torch.Generator().manual_seed(seed)
    p = cfg.patch_size
    length = length or max(r * c for r, c in grids)
    values, positions = [], []
    for rows, cols in grids:
        img = torch.rand(rows * p, cols * p, 3, generator=g)
        patches, pos = vitops.reference.patchify(img, p)
        pad = length - rows * cols
        values.append(torch.cat([patches, torch.zeros(pad, patches.shape[1])]))
        positions.append(torch.cat([pos, torch.full((pad, 2), -1, dtype=torch.long)]))
    return torch.stack(values), torch.stack(positions)


# Mixed resolutions (k = 3): 3x6, 6x6 and 6x3 patch grids, padded to 36 patches -> 4 slots each.
GRIDS = [(3, 6), (6, 6), (6, 3)]


def hf_encoder_inputs(model, pv, pp):
    padding = (pp == -1).all(-1)
    h = model.patch_embedder(pv, pp, padding)
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=~padding)
    pe = model.encoder.rotary_emb(h, pp)
    return h, padding, mask, pe


# ---------------------------------------------------------------------------------------------
# Per-module parity, float32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
def test_modules_float32(name):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg)
    tower, proj = make_ours(cfg, model, embedder)
    pv, pp = image_batch(cfg, grids_for(cfg))
    padding = (pp == -1).all(-1)
    with torch.no_grad():
        # patch embedder
        h_ref, _, mask4, pe = hf_encoder_inputs(model, pv, pp)
        h, _ = tower.vision_entry(pv, pp)
        err = rel(h, h_ref)
        report(f"{name} float32 patch_embedder", err)
        assert err <= 1e-5
        # attention (all rows: padded queries are computed identically, only keys are masked)
        x = torch.randn_like(h_ref)
        a_ref, _ = model.encoder.layers[0].self_attn(x, position_embeddings=pe, attention_mask=mask4, position_ids=pp)
        a, _ = tower.layer_0.attention(x, inputs_positions=pp, attention_mask=~padding)
        err = rel(a, a_ref)
        report(f"{name} float32 attention", err)
        assert err <= 1e-5
        # encoder block
        b_ref = model.encoder.layers[0](x, position_embeddings=pe, attention_mask=mask4, position_ids=pp)
        b = tower.layer_0(x, pp, attention_mask=~padding)
        err = rel(b, b_ref)
        report(f"{name} float32 encoder_layer", err)
        assert err <= 1e-5
        # exit: pooler + HF's standardize (in Gemma4VisionModel.forward)
        n_out = pv.shape[1] // cfg.pooling_kernel_size**2
        p_ref, m_ref = model.pooler(x, pp, padding, n_out)
        if cfg.standardize:
            p_ref = (p_ref - model.std_bias.float()) * model.std_scale.float()
        ((p, m),) = tower.vision_exit(x, positions_xy=pp)
        assert torch.equal(m, m_ref)
        err = rel(p[m], p_ref[m_ref].to(x.dtype))
        report(f"{name} float32 exit", err)
        assert err <= 1e-5
        # projector
        y = torch.randn(5, cfg.hidden_size) * 30
        err = rel(proj(y), embedder(y))
        report(f"{name} float32 projector", err)
        assert err <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(SMALL))
def test_tower_float32(name, attn):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg, attn=attn)
    tower, proj = make_ours(cfg, model, embedder)
    grids = grids_for(cfg)
    pv, pp = image_batch(cfg, grids)
    with torch.no_grad():
        ref = model(pv, pp).last_hidden_state
        out = tower.forward_flat(pv, pp)
        assert out.shape == ref.shape == (num_tokens(cfg, grids), cfg.hidden_size)
        err = rel(out, ref)
        report(f"{name} float32 tower (HF {attn})", err)
        assert err <= 1e-4
        err = rel(proj(out), embedder(ref))
        report(f"{name} float32 tower+projector (HF {attn})", err)
        assert err <= 1e-4
        # the padded form agrees with the flat one
        padded, mask = tower(pv, image_position_ids=pp)
        assert torch.equal(padded[mask], out)
        assert mask.sum(-1).tolist() == [r * c // cfg.pooling_kernel_size**2 for r, c in grids]


def _weights_loss(tower_out, proj_out, seed=1):
    """A loss on the tower's output AND the projector's: the projector's RMSNorm hides any global
    scale of the tower output (a wrong sqrt(D), say), so gradients of the projector loss alone
    would not see it."""
    g = torch.Generator().manual_seed(seed)
    w_t = torch.randn(tower_out.shape, generator=g, dtype=torch.float64)
    w_p = torch.randn(proj_out.shape, generator=g, dtype=torch.float64)
    return (tower_out.double() * w_t).sum() + (proj_out.double() * w_p).sum()


def _grads_by_hf_name(tower, proj, model, embedder):
    """(ours, HF) gradients of every parameter, keyed by HF name (t. = tower, p. = embedder)."""
    ours_grads = {k: v.grad for k, v in [*tower.named_parameters(prefix="t"), *proj.named_parameters(prefix="p")]}
    to_hf = vhf.to_hf_state_dict((tower, proj), vision_prefix="t.", embedder_prefix="p.")
    hf_params = {**{"t." + k: v for k, v in model.named_parameters()},
                 **{"p." + k: v for k, v in embedder.named_parameters()}}
    # map our parameter names to HF names through the exporter's key order
    ours_names = [*("t." + k for k in tower.state_dict()), *("p." + k for k in proj.state_dict())]
    pairs = {}
    for ours_name, hf_name in zip(ours_names, to_hf):
        if ours_name not in ours_grads:
            continue  # buffers
        g = ours_grads[ours_name]
        if ours_name.endswith("pos_emb_param"):
            g = g.transpose(0, 1)
        pairs[hf_name] = (g, hf_params[hf_name].grad)
    assert len(pairs) == len(ours_grads)
    return pairs


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_float32(name):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg)
    tower, proj = make_ours(cfg, model, embedder)
    pv, pp = image_batch(cfg, grids_for(cfg))
    pv_ref = pv.clone().requires_grad_(True)
    pv_ours = pv.clone().requires_grad_(True)
    ref_t = model(pv_ref, pp).last_hidden_state
    out_t = tower.forward_flat(pv_ours, pp)
    _weights_loss(ref_t, embedder(ref_t)).backward()
    _weights_loss(out_t, proj(out_t)).backward()
    errs = {"pixel_values": rel(pv_ours.grad, pv_ref.grad)}
    errs.update({k: rel(ours, hf) for k, (ours, hf) in _grads_by_hf_name(tower, proj, model, embedder).items()})
    worst = max(errs, key=errs.get)
    report(f"{name} float32 gradients (worst: {worst})", errs[worst])
    assert errs[worst] <= 1e-4, errs


# ---------------------------------------------------------------------------------------------
# bfloat16 / float16: no worse than HF's own error in that dtype, both measured against a float64
# HF run of the same (dtype-representable) weights, for the tower's output and after the projector.
# One seed is noisy (per-seed ratios ours/HF of 0.8-1.3 were seen), so the bound is on the mean
# over seeds.
# ---------------------------------------------------------------------------------------------
LOW_PRECISION_SEEDS = range(6)


def _low_precision_errors(cfg, dtype, seed, autocast=False):
    """{"tower": (HF error, ours), "projector": (HF error, ours)} against float64 HF. ``autocast``:
    float32 modules run under torch.autocast("cpu", dtype) instead of modules cast to dtype."""
    model, embedder = make_hf(cfg, round_to=dtype, seed=seed)
    pv, pp = image_batch(cfg, grids_for(cfg), seed=seed)
    with torch.no_grad():
        ref_t = model.double()(pv.double(), pp).last_hidden_state
        ref_p = embedder.double()(ref_t)
        if autocast:
            model.float(), embedder.float()
            tower, proj = make_ours(cfg, model, embedder)
            with torch.autocast("cpu", dtype=dtype):
                hf_t = model(pv, pp).last_hidden_state
                hf_p = embedder(hf_t)
                out_t = tower.forward_flat(pv, pp)
                out_p = proj(out_t)
            # the dtype flow of HF under autocast: float32 residual stream, bf16 projection
            assert out_t.dtype == hf_t.dtype == torch.float32 and out_p.dtype == hf_p.dtype == dtype
        else:
            model.to(dtype), embedder.to(dtype)
            hf_t = model(pv, pp).last_hidden_state
            hf_p = embedder(hf_t)
            tower, proj = make_ours(cfg, model, embedder, dtype=dtype)
            out_t = tower.forward_flat(pv, pp)
            out_p = proj(out_t)
            assert out_p.dtype == dtype and hf_p.dtype == dtype
    assert torch.isfinite(out_p).all() and torch.isfinite(out_t).all()
    return {"tower": (rel(hf_t, ref_t), rel(out_t, ref_t)), "tower+projector": (rel(hf_p, ref_p), rel(out_p, ref_p))}


def _check_low_precision(name, label, errs):
    for part in ("tower", "tower+projector"):
        pairs = [e[part] for e in errs]
        hf_mean = sum(p[0] for p in pairs) / len(pairs)
        ours_mean = sum(p[1] for p in pairs) / len(pairs)
        report(f"{name} {label} {part} vs HF float64, mean of {len(pairs)} seeds (HF: {hf_mean:.3e})", ours_mean)
        assert ours_mean <= 1.1 * hf_mean, (part, pairs)
        assert all(ours <= 1.5 * hf for hf, ours in pairs), (part, pairs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_tower_low_precision(name, dtype):
    cfg = SMALL[name]
    errs = [_low_precision_errors(cfg, dtype, seed) for seed in LOW_PRECISION_SEEDS]
    _check_low_precision(name, str(dtype)[6:], errs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_tower_autocast(name, dtype):
    """float32 modules under torch.autocast("cpu", dtype): HF's dtype flow (float32 residual stream
    and cos/sin, low-precision matmuls), so no further from a float64 run than HF is."""
    cfg = SMALL[name]
    errs = [_low_precision_errors(cfg, dtype, seed, autocast=True) for seed in LOW_PRECISION_SEEDS]
    _check_low_precision(name, f"autocast {str(dtype)[6:]}", errs)


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_bfloat16(name):
    """Input and weight gradients in bfloat16, against float64 HF gradients: ours no worse than HF's
    own bfloat16 gradients (summed over tensors, per-tensor within 2x). The loss reads the tower's
    output and the projector's."""
    cfg = SMALL[name]
    model, embedder = make_hf(cfg, round_to=torch.bfloat16)
    pv, pp = image_batch(cfg, grids_for(cfg))

    def hf_grads(dtype):
        model.to(dtype), embedder.to(dtype)
        model.zero_grad(), embedder.zero_grad()
        x = pv.to(dtype).requires_grad_(True)
        t = model(x, pp).last_hidden_state
        _weights_loss(t, embedder(t)).backward()
        named = {"t." + k: v.grad for k, v in model.named_parameters()}
        named.update({"p." + k: v.grad for k, v in embedder.named_parameters()})
        named["pixel_values"] = x.grad
        return {k: v.clone() for k, v in named.items()}

    ref = hf_grads(torch.float64)
    hf_low = hf_grads(torch.bfloat16)
    tower, proj = make_ours(cfg, model, embedder, dtype=torch.bfloat16)
    x = pv.to(torch.bfloat16).requires_grad_(True)
    t = tower.forward_flat(x, pp)
    _weights_loss(t, proj(t)).backward()
    ours = {"pixel_values": x.grad}
    ours.update({k: g for k, (g, _) in _grads_by_hf_name(tower, proj, model, embedder).items()})
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    errs = {k: (rel(hf_low[k], ref[k]), rel(ours[k], ref[k])) for k in ref}
    total_hf = sum(e[0] for e in errs.values())
    total_ours = sum(e[1] for e in errs.values())
    report(f"{name} bfloat16 gradients vs HF float64, summed over {len(errs)} tensors (HF bf16: {total_hf:.3e})",
           total_ours)
    assert total_ours <= 1.1 * total_hf, errs
    assert all(ours <= 2 * hf + 1e-3 for hf, ours in errs.values()), errs


# ---------------------------------------------------------------------------------------------
# Released sizes with random weights (slow): one image of 280 soft tokens (42 x 60 patches)
# ---------------------------------------------------------------------------------------------
# E4B and 31B share E2B's and 26B's towers and differ in the projector's output width, so they run
# with 2 of the tower's layers (full width) to keep CI short; E2B and 26B run every layer.
@pytest.mark.slow
@pytest.mark.parametrize("preset,num_layers", [("gemma4-e2b", None), ("gemma4-26b-a4b", None),
                                               ("gemma4-e4b", 2), ("gemma4-31b", 2)])
def test_released_config_float32(preset, num_layers):
    cfg = Gemma4VisionConfig.preset(preset, **({} if num_layers is None else {"num_layers": num_layers}))
    torch.manual_seed(0)
    model, embedder = make_hf(cfg)
    tower, proj = make_ours(cfg, model, embedder)
    pv, pp = image_batch(cfg, [(42, 60)])
    with torch.no_grad():
        ref = embedder(model(pv, pp).last_hidden_state)
        del model
        out = proj(tower.forward_flat(pv, pp))
    assert out.shape == (280, cfg.text_hidden_size)
    err = rel(out, ref)
    report(f"{preset} float32 tower+projector, {cfg.num_layers} layers, 280 tokens", err)
    assert err <= 1e-4


# ---------------------------------------------------------------------------------------------
# CUDA: the same parity with the CUDA kernels (tools/gpu_check.sh runs these on a GPU machine)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SMALL))
def test_tower_cuda_float32_and_gradients(name):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg)
    tower, proj = make_ours(cfg, model, embedder)
    tower, proj = tower.cuda(), proj.cuda()
    grids = grids_for(cfg)
    pv, pp = image_batch(cfg, grids)
    pv_ref = pv.clone().requires_grad_(True)
    pv_ours = pv.cuda().requires_grad_(True)
    ref_t = model(pv_ref, pp).last_hidden_state
    out_t = tower.forward_flat(pv_ours, pp.cuda())
    err = rel(out_t.detach().cpu(), ref_t.detach())
    report(f"{name} cuda float32 tower", err)
    assert err <= 1e-4
    padded, mask = tower(pv_ours, image_position_ids=pp.cuda())
    assert torch.equal(padded[mask], out_t)
    _weights_loss(ref_t, embedder(ref_t)).backward()
    _weights_loss(out_t.cpu(), proj(out_t).cpu()).backward()
    errs = {"pixel_values": rel(pv_ours.grad.cpu(), pv_ref.grad)}
    errs.update({k: rel(o.cpu(), h) for k, (o, h) in _grads_by_hf_name(tower, proj, model, embedder).items()})
    worst = max(errs, key=errs.get)
    report(f"{name} cuda float32 gradients (worst: {worst})", errs[worst])
    assert errs[worst] <= 1e-3, errs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_tower_cuda_low_precision(name, dtype):
    """Ours on CUDA vs HF on CUDA, both in dtype, against float64 HF on the CPU (mean of 3 seeds)."""
    cfg = SMALL[name]
    pairs = []
    for seed in range(3):
        model, embedder = make_hf(cfg, round_to=dtype, seed=seed)
        pv, pp = image_batch(cfg, grids_for(cfg), seed=seed)
        with torch.no_grad():
            ref = model.double()(pv.double(), pp).last_hidden_state
            model.to(device="cuda", dtype=dtype)
            hf_low = model(pv.cuda(), pp.cuda()).last_hidden_state.cpu()
            tower, _ = make_ours(cfg, model.cpu(), embedder, dtype=dtype)
            out = tower.cuda().forward_flat(pv.cuda(), pp.cuda()).cpu()
        assert out.dtype == dtype and torch.isfinite(out).all()
        pairs.append((rel(hf_low, ref), rel(out, ref)))
    hf_mean = sum(p[0] for p in pairs) / len(pairs)
    ours_mean = sum(p[1] for p in pairs) / len(pairs)
    report(f"{name} cuda {str(dtype)[6:]} tower vs HF float64 (HF cuda: {hf_mean:.3e})", ours_mean)
    assert ours_mean <= 1.1 * hf_mean, pairs


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["gemma4-e2b", "gemma4-26b-a4b"])
def test_released_config_cuda_bfloat16(preset):
    """Full released sizes on the GPU: one 280-token image in bfloat16, ours vs HF's own bfloat16
    error against float32 HF on the GPU."""
    cfg = Gemma4VisionConfig.preset(preset)
    torch.manual_seed(0)
    model, embedder = make_hf(cfg, round_to=torch.bfloat16)
    pv, pp = image_batch(cfg, [(42, 60)])
    pv, pp = pv.cuda(), pp.cuda()
    with torch.no_grad():
        model.cuda()
        ref = model(pv, pp).last_hidden_state
        model.to(torch.bfloat16)
        hf_low = model(pv, pp).last_hidden_state
        tower, _ = make_ours(cfg, model.float().cpu(), embedder, dtype=torch.bfloat16)
        out = tower.cuda().forward_flat(pv, pp)
    assert out.shape == (280, cfg.hidden_size)
    err, hf_err = rel(out.float(), ref), rel(hf_low.float(), ref)
    report(f"{preset} cuda bfloat16 tower, 280 tokens (HF bf16: {hf_err:.3e})", err)
    assert err <= 1.25 * hf_err

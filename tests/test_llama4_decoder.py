"""Llama 4 text decoder layers (vitops.models.llama4: Llama4DecoderLayer, Llama4ScannableBlock) against
transformers 5.18's Llama4TextDecoderLayer stack (random weights, eval, SDPA): RoPE layers (interleaved
complex pairs, llama3 scaling, L2 q/k norm after RoPE, chunked attention) and NoPE layers (temperature
tuning, full causal), MoE with several experts (top-1 sigmoid router scaling the expert input, shared
expert) and dense layers, interleave steps 1 and 2, Scout- and Maverick-like settings; the KV-cache
step, packed segments, bf16, gradients, torch.compile; checkpoints."""

import pytest
import torch

from vitops.hf import CheckpointMismatchError
from vitops.hf import llama4 as llama4_hf
from vitops.models.llama4 import Llama4DecoderConfig, Llama4DecoderLayer, Llama4MoEBlock, Llama4ScannableBlock

from _utils import DEVICES, block_and_layer_by_layer, check_decoder_bad_calls, check_random_packing

transformers = pytest.importorskip("transformers")
from transformers import Llama4TextConfig  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextModel, Llama4TextMoe  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def text_config(layers=8, step=2, experts=4, qk_norm=True, rope=LLAMA3, **kw):
    args = dict(vocab_size=64, hidden_size=64, intermediate_size=48, intermediate_size_mlp=80,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                num_local_experts=experts, interleave_moe_layer_step=step, no_rope_layer_interval=4,
                attention_chunk_size=4, floor_scale=3, attn_scale=0.1, attn_temperature_tuning=True,
                use_qk_norm=qk_norm, rope_parameters=dict(rope), max_position_embeddings=64,
                attn_implementation="sdpa")
    args.update(kw)
    return Llama4TextConfig(**args)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:  # HF initialises gate_up_proj to zeros
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    return model


def build(seed=0, **kw):
    tc = text_config(**kw)
    torch.manual_seed(seed)
    hf = randomize(Llama4TextModel(tc).eval(), seed)
    return hf, tc, llama4_hf.decoder_from_hf(tc, hf.state_dict())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hidden(hf, x, **kw):
    with torch.no_grad():
        return hf(inputs_embeds=x, output_hidden_states=True, **kw).hidden_states


SETTINGS = {
    "scout-like": dict(step=1, qk_norm=True, rope=LLAMA3),  # every layer MoE, L2 norm, llama3 RoPE
    "maverick-like": dict(step=2, qk_norm=False, rope={"rope_type": "default", "rope_theta": 500000.0}),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_layer_matches_hf(setting):
    hf, tc, ours = build(**SETTINGS[setting])
    x = torch.randn(2, 11, 64)
    hs = hidden(hf, x)
    kinds = set()
    with torch.no_grad():
        for i in range(7):  # the 8th layer's HF output is normed
            layer = getattr(ours, f"layers_{i}")
            assert layer.is_nope_layer == (not tc.no_rope_layers[i])
            assert layer.is_moe_layer == (i in tc.moe_layers)
            kinds.add((layer.is_nope_layer, layer.is_moe_layer))
            got, _ = layer(hs[i])
            assert rel(got, hs[i + 1]) < 1e-5, i
    assert len(kinds) >= 2


@pytest.mark.parametrize("seed", range(2))
def test_stack_matches_hf(seed):
    hf, tc, ours = build(seed=seed)
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(seed))
    hs = hidden(hf, x)
    with torch.no_grad():
        y = ours(x)
        assert rel(hf.norm(y), hs[-1]) < 1e-4


def test_moe_block_equals_hf_all_experts_form():
    tc = text_config(experts=8)
    torch.manual_seed(3)
    hf_moe = randomize(Llama4TextMoe(tc).eval(), 3)
    ours = Llama4MoEBlock(llama4_hf.decoder_config_from_hf(tc)[0]).eval()
    ours.gate.weight.data.copy_(hf_moe.router.weight)
    ours.wi.data.copy_(hf_moe.experts.gate_up_proj)
    ours.wo.data.copy_(hf_moe.experts.down_proj)
    for a, b in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        getattr(ours.shared_experts, a).weight.data.copy_(getattr(hf_moe.shared_expert, b).weight)
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        want, _ = hf_moe(x)
        got = ours(x)
        compiled = torch.compile(ours, fullgraph=True)(x)  # every expert on every token: the same values
    torch.testing.assert_close(got, want.view(got.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled, got, rtol=1e-5, atol=1e-6)


def _copy_moe_from_hf(ours, hf_moe):
    ours.gate.weight.data.copy_(hf_moe.router.weight)
    ours.wi.data.copy_(hf_moe.experts.gate_up_proj)
    ours.wo.data.copy_(hf_moe.experts.down_proj)
    for a, b in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        getattr(ours.shared_experts, a).weight.data.copy_(getattr(hf_moe.shared_expert, b).weight)


@pytest.mark.parametrize("seed", range(6))
def test_moe_grouped_gemm_path_equals_per_expert_gemms_and_hf_with_gradients(seed):
    """The eager path's grouped GEMMs (bucket ends as a device tensor) against the per-expert GEMM
    loop and HF's all-experts form, forward and backward, on seeded random expert and token counts
    (experts with no tokens, a single token, no tokens at all)."""
    g = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(1, 17, (1,), generator=g))
    tokens = [0, 1, 5, 23, 64, 97][seed]
    tc = text_config(experts=experts)
    torch.manual_seed(seed)
    hf_moe = randomize(Llama4TextMoe(tc), seed)
    ours = Llama4MoEBlock(llama4_hf.decoder_config_from_hf(tc)[0])
    _copy_moe_from_hf(ours, hf_moe)
    x = torch.randn(tokens, 64, generator=g)
    assert ours._grouped_gemm_ok(x)
    results = {}
    for name, run in (("hf", lambda x: hf_moe(x)[0]), ("grouped", ours), ("loop", None)):
        xi = x.clone().requires_grad_(True)
        if run is None:  # the per-expert fallback, forced
            ours._grouped_gemm_ok = lambda x: False
            y = ours(xi)
            del ours._grouped_gemm_ok
        else:
            y = run(xi).view(tokens, 64)
        params = [hf_moe.experts.gate_up_proj, hf_moe.router.weight] if name == "hf" else [ours.wi, ours.gate.weight]
        grads = torch.autograd.grad(y, [xi, *params], torch.randn(y.shape, generator=torch.Generator().manual_seed(9)),
                                    allow_unused=True)
        results[name] = (y.detach(), *[torch.zeros_like(p) if gr is None else gr for p, gr in zip([xi, *params], grads)])
    for name in ("grouped", "loop"):
        for got, want in zip(results[name], results["hf"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_moe_cpu_bf16_padded_batched_path_equals_the_grouped_path_and_hf(seed):
    """CPU bf16: the buckets padded to the largest and run as batched GEMMs, against the grouped
    GEMMs and HF (all in bf16; GEMM accumulation orders differ), forward and backward, on seeded
    expert and token counts (empty experts, one token, no tokens)."""
    g = torch.Generator().manual_seed(40 + seed)
    experts = int(torch.randint(1, 17, (1,), generator=g))
    tokens = [0, 1, 37, 300][seed]
    tc = text_config(experts=experts)
    torch.manual_seed(seed)
    hf_moe = randomize(Llama4TextMoe(tc), seed).to(torch.bfloat16)
    ours = Llama4MoEBlock(llama4_hf.decoder_config_from_hf(tc)[0]).to(torch.bfloat16)
    _copy_moe_from_hf(ours, hf_moe)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16)
    calls = []
    padded = ours._padded_batched_experts
    ours._padded_batched_experts = lambda *a: calls.append(1) or padded(*a)
    outs = {}
    for name in ("padded", "grouped", "hf"):
        xi = x.clone().requires_grad_(True)
        if name == "grouped":  # the grouped GEMMs, the CPU bf16 padded path bypassed
            ours._routed_experts = ours._grouped_experts
            y = ours(xi)
            del ours._routed_experts
        elif name == "hf":
            y = hf_moe(xi)[0]
        else:
            y = ours(xi)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
        outs[name] = (y.detach().float(), torch.autograd.grad(y, xi, gy)[0].float()) if tokens else (y.float(),)
    assert calls or not tokens
    for got, want in zip(outs["padded"], outs["grouped"]):  # the same routing, other GEMM orders
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # against HF on tokens whose bf16 router logits have a single maximum (HF's topk orders ties
    # its own way; moe_route takes the first)
    with torch.no_grad():
        logits = ours.gate(x)
    untied = (logits == logits.max(-1, keepdim=True).values).sum(-1) == 1
    for name in ("padded", "grouped"):
        torch.testing.assert_close(outs[name][0][untied], outs["hf"][0][untied], rtol=3e-2, atol=3e-2)


def test_moe_unaligned_widths_and_float64_use_the_per_expert_path():
    tc = text_config(experts=3, hidden_size=66, intermediate_size=30, head_dim=22)
    ours = Llama4MoEBlock(llama4_hf.decoder_config_from_hf(tc)[0])
    assert not ours._grouped_gemm_ok(torch.empty(0))
    assert not Llama4MoEBlock(llama4_hf.decoder_config_from_hf(text_config())[0]).double()._grouped_gemm_ok(
        torch.empty(0, dtype=torch.float64))
    x = torch.randn(9, 66)
    got = ours(x)
    with torch.no_grad():
        ref = ours.shared_experts(x)
        top, e = ours.gate(x).topk(1, dim=-1)
        xs = x * torch.sigmoid(top)
        ref = ref + torch.stack([ours._expert(xs[i:i + 1], int(e[i]), ours.wi, ours.wo) for i in range(9)]).view(9, 66)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)


def test_temperature_tuning_uses_absolute_positions_past_floor():
    """NoPE layers: with floor_scale 3 the factor steps at positions 2, 5, 8, ...; a cached step at
    positions past the prefill must see the same factors as the full forward."""
    hf, tc, ours = build()
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        full = ours(x)
        y1, caches = ours(x[:, :7], model_mode="prefill")
        y2, _ = ours(x[:, 7:], model_mode="autoregressive", kv_cache=caches)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [(5, 1, 1, 1, 1, 1, 1), (4, 3, 2)])
def test_kv_cache_steps_equal_full_forward_and_hf_cache(steps):
    hf, tc, ours = build()
    total = sum(steps)
    x = torch.randn(2, total, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(x)
        caches, outs, start = None, [], 0
        for n in steps:
            y, caches = ours(x[:, start:start + n], model_mode="prefill" if caches is None else "autoregressive",
                             kv_cache=caches)
            outs.append(y)
            start += n
        first = hf(inputs_embeds=x[:, :steps[0]], use_cache=True)
        step = hf(inputs_embeds=x[:, steps[0]:steps[0] + steps[1]], past_key_values=first.past_key_values,
                  use_cache=True)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert rel(hf.norm(outs[1]), step.last_hidden_state) < 1e-5


def test_packed_segments_equal_separate_sequences():
    hf, tc, ours = build()
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(1, 7, 64, generator=g), torch.randn(1, 6, 64, generator=g)
    segments = torch.tensor([[1] * 7 + [2] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        y = ours(torch.cat([a, b], 1), segments, positions)
        ya, yb = ours(a), ours(b)
    torch.testing.assert_close(y[:, :7], ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 7:], yb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_against_float64_no_worse_than_hf(dtype):
    ours_err, hf_err = [], []
    for seed in range(3):
        hf, tc, _ = build(seed=seed)
        sd = hf.state_dict()
        x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(20 + seed))
        ref = hidden(hf.double(), x.double())[-2]
        hf.to(dtype)
        hf_out = hidden(hf, x.to(dtype))[-2]
        ours = llama4_hf.decoder_from_hf(tc, sd, dtype=dtype)
        with torch.no_grad():
            y = x.to(dtype)
            for i in range(7):
                y, _ = getattr(ours, f"layers_{i}")(y)
        assert y.dtype == dtype
        ours_err.append(rel(y, ref))
        hf_err.append(rel(hf_out, ref))
    assert sum(ours_err) / 3 <= 1.05 * sum(hf_err) / 3, (ours_err, hf_err)


def test_gradients_match_hf():
    hf, tc, ours = build(layers=5)
    x = torch.randn(2, 9, 64, requires_grad=True)
    g = torch.randn(2, 9, 64)
    out = hf(inputs_embeds=x, output_hidden_states=True).hidden_states[-2]
    params = [hf.layers[0].self_attn.q_proj.weight, hf.layers[1].feed_forward.experts.gate_up_proj,
              hf.layers[1].feed_forward.router.weight, hf.layers[3].input_layernorm.weight]
    want = torch.autograd.grad((out * g).sum(), [x, *params])
    x2 = x.detach().clone().requires_grad_()
    y = x2
    for i in range(4):
        y, _ = getattr(ours, f"layers_{i}")(y)
    mine = [ours.layers_0.self_attention.query.weight, ours.layers_1.Llama4MoEBlock_0.wi,
            ours.layers_1.Llama4MoEBlock_0.gate.weight, ours.layers_3.pre_self_attention_layer_norm.scale]
    got = torch.autograd.grad((y * g).sum(), [x2, *mine])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


def test_compile_fullgraph_dynamic_no_recompile():
    import torch._dynamo.testing

    _, tc, ours = build(layers=4, step=2)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        for b, length in ((2, 7), (3, 10), (4, 5)):
            x = torch.randn(b, length, 64)
            torch.testing.assert_close(compiled(x), ours(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_scannable_block_patterns_and_moe_block_property():
    cfg = Llama4DecoderConfig(hidden_size=32, intermediate_size=16, intermediate_size_mlp=24, num_heads=4,
                              num_kv_heads=2, head_dim=8, num_experts=2)
    block = Llama4ScannableBlock(cfg, nope_layer_interval=4, interleave_moe_layer_step=2)
    assert block.num_of_layers == 4
    assert [block.get_submodule(f"layers_{j}").is_nope_layer for j in range(4)] == [False, False, False, True]
    assert [block.get_submodule(f"layers_{j}").is_moe_layer for j in range(4)] == [False, True, False, True]
    assert block.layers_1.moe_block is block.layers_1.Llama4MoEBlock_0 and block.layers_0.moe_block is None
    defaults = Llama4ScannableBlock(cfg)  # MaxText's constructor defaults: every layer NoPE and MoE
    assert defaults.num_of_layers == 1 and defaults.layers_0.is_nope_layer and defaults.layers_0.is_moe_layer
    with pytest.raises(ValueError, match='model_mode="train" takes no `kv_cache`'):
        Llama4DecoderLayer(cfg)(torch.randn(1, 3, 32), kv_cache=object())


def test_dropout_in_train_mode_only():
    cfg = Llama4DecoderConfig(hidden_size=32, intermediate_size=16, intermediate_size_mlp=24, num_heads=4,
                              num_kv_heads=2, head_dim=8, num_experts=2, dropout_rate=0.3)
    layer = Llama4DecoderLayer(cfg, is_moe_layer=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        a, _ = layer(x)
        assert torch.equal(a, layer(x, deterministic=True)[0])
        assert not torch.equal(a, layer(x, deterministic=False)[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs
# ---------------------------------------------------------------------------------------------
def test_full_model_key_forms_round_trip_and_mismatch(tmp_path):
    from transformers import Llama4ForCausalLM

    hf, tc, _ = build()
    causal = Llama4ForCausalLM(tc).eval()
    causal.model.load_state_dict(hf.state_dict())
    x = torch.randn(1, 9, 64)
    want = hidden(hf, x)[-1]
    forms = {"Llama4ForCausalLM (model.)": causal.state_dict(),
             "Llama4ForConditionalGeneration (language_model.model.)":
                 {f"language_model.{k}": v for k, v in causal.state_dict().items()},
             "Llama4TextModel ('')": hf.state_dict()}
    for name, sd in forms.items():
        block = llama4_hf.decoder_from_hf(tc)
        report = llama4_hf.load_hf_decoder_state_dict(block, sd)
        assert not report.missing and not report.unexpected, name
        with torch.no_grad():
            assert rel(hf.norm(block(x)), want) < 1e-4, name
    exported = llama4_hf.decoder_to_hf_state_dict(block)
    assert set(exported) == {k for k in forms["Llama4ForConditionalGeneration (language_model.model.)"]
                             if ".layers." in k}
    bad = dict(exported)
    del bad["language_model.model.layers.1.feed_forward.experts.down_proj"]
    bad["language_model.model.layers.0.feed_forward.router.weight"] = torch.zeros(4, 64)  # layer 0 is dense
    bad["language_model.model.layers.3.self_attn.q_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointMismatchError) as e:
        llama4_hf.load_hf_decoder_state_dict(llama4_hf.decoder_from_hf(tc), bad)
    for part in ("layers.1.feed_forward.experts.down_proj", "layers.0.feed_forward.router.weight",
                 "layers.3.self_attn.q_proj.weight"):
        assert part in str(e.value)


def test_config_from_hf_forms():
    tc = text_config()
    config, nope, step, layers = llama4_hf.decoder_config_from_hf(tc)
    assert (nope, step, layers) == (4, 2, 8)
    assert config.rope_scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)
    assert config.floor_scale == 3.0 and config.attention_chunk_size == 4 and config.use_qk_norm
    # an older file: attn_temperature_tuning as an int
    older = dict(tc.to_dict(), attn_temperature_tuning=4)
    assert llama4_hf.decoder_config_from_hf(older)[0].attn_temperature_tuning is True
    with pytest.raises(ValueError, match="not every n-th layer"):
        llama4_hf.decoder_config_from_hf(dict(tc.to_dict(), moe_layers=[0, 2, 3]))
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        llama4_hf.decoder_config_from_hf(dict(tc.to_dict(), rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))


@pytest.mark.parametrize("device", DEVICES)
def test_stack_on_each_device(device):
    hf, tc, _ = build(layers=4)
    sd = hf.state_dict()
    x = torch.randn(2, 9, 64)
    ref = hidden(hf.double(), x.double())[-1]
    for dtype in (torch.float32, torch.bfloat16):
        ours = llama4_hf.decoder_from_hf(tc, sd, dtype=dtype, device=device)
        hf_d = Llama4TextModel(tc).eval()
        hf_d.load_state_dict(sd)
        hf_d.to(device=device, dtype=dtype)
        with torch.no_grad():
            got = hf_d.norm(ours(x.to(device=device, dtype=dtype)))
            want = hidden(hf_d, x.to(device=device, dtype=dtype))[-1]
        assert got.device.type == device and got.dtype == dtype
        if dtype == torch.float32:
            assert rel(got.cpu(), want.cpu()) < 1e-4
        else:
            assert rel(got.cpu(), ref) <= 1.1 * rel(want.cpu(), ref) + 1e-3


@pytest.mark.slow
def test_released_scout_width_layers_short_sequence():
    """Scout's widths (hidden 5120, 40 / 8 heads of 128, experts and shared expert 8192, dense 16384,
    llama3 RoPE, L2 q/k norm) with 2 experts instead of 16 (memory): a dense RoPE layer and an MoE
    NoPE layer, each against HF on HF's own input."""
    tc = text_config(layers=3, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                     num_attention_heads=40, num_key_value_heads=8, head_dim=128, experts=2, step=2,
                     no_rope_layers=[1, 0, 1], attention_chunk_size=8192, floor_scale=2,
                     rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    hf = randomize(Llama4TextModel(tc).eval())
    ours = llama4_hf.decoder_from_hf(tc, hf.state_dict())
    assert not ours.layers_0.is_nope_layer and ours.layers_1.is_nope_layer and ours.layers_1.is_moe_layer
    x = torch.randn(1, 7, 5120)
    hs = hidden(hf, x)
    with torch.no_grad():
        for i in (0, 1):
            got, _ = getattr(ours, f"layers_{i}")(hs[i])
            assert rel(got, hs[i + 1]) < 1e-5, i


def test_block_shares_rope_tables_and_equals_layer_by_layer():
    """The block's layers read one RopeTables (computed once per forward); the result equals its
    layers run one by one (each computing its own); the tables equal HF's freqs_cis (llama3 scaling)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    from vitops.layers import RopeTables

    hf, tc, ours = build()
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(5))
    positions = torch.arange(3, 14).expand(2, 11)
    block_out, y, seen = block_and_layer_by_layer(ours, x, positions)
    rope_layers = sum(not getattr(ours, f"layers_{i}").is_nope_layer for i in range(ours.num_of_layers))
    assert len(seen) == rope_layers and len(set(seen)) == 1
    assert torch.equal(block_out, y)
    freqs_cis = Llama4TextRotaryEmbedding(tc)(x, positions)
    cos, sin = RopeTables(positions).get(24, 500000.0, llama3_scaling=ours.config.rope_scaling)
    torch.testing.assert_close(cos, freqs_cis.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, freqs_cis.imag, rtol=0, atol=1e-6)


def _cached_in_chunks(ours, x, bounds):
    """ours over x in the calls x[:, a:b] for consecutive bounds (prefill, then autoregressive steps)."""
    caches, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, caches = ours(x[:, a:b], model_mode="prefill" if caches is None else "autoregressive", kv_cache=caches)
        outs.append(y)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("seed", range(24))
def test_seeded_random_configs_match_hf_per_layer_stack_and_cache(seed):
    """Configs the fixed tests do not use, drawn per seed: heads / KV heads / head dim / widths, expert
    count, interleave step 1-3, NoPE interval 2-4, chunk sizes shorter and longer than the sequence,
    temperature on or off, q/k norm on or off, llama3 or default RoPE, batch 1-3, length 1-40.
    Per layer <= 1e-5 and the stack <= 1e-4 against HF; prefill + autoregressive chunks at random
    boundaries equal the full forward."""
    import random

    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4, 6])
    kv = rng.choice([h for h in (1, 2, 3, 6) if heads % h == 0])
    layers, width = rng.randint(2, 6), rng.choice([32, 48, 96])
    rope = rng.choice([LLAMA3, {"rope_type": "default", "rope_theta": rng.choice([1e4, 5e5])}])
    hf, tc, ours = build(seed=seed, layers=layers, hidden_size=width, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=rng.choice([8, 12, 16, 40]),
                         intermediate_size=rng.choice([16, 40]), intermediate_size_mlp=rng.choice([24, 80]),
                         experts=rng.randint(1, 9), step=rng.choice([1, 2, 3]),
                         no_rope_layer_interval=rng.choice([2, 3, 4]), attention_chunk_size=rng.choice([3, 5, 64]),
                         floor_scale=rng.choice([2, 3, 8192]), attn_temperature_tuning=rng.random() < 0.7,
                         qk_norm=rng.random() < 0.5, rope=rope)
    b, length = rng.randint(1, 3), rng.randint(1, 40)
    x = torch.randn(b, length, width, generator=torch.Generator().manual_seed(seed))
    hs = hidden(hf, x)
    with torch.no_grad():
        for i in range(layers - 1):  # the last layer's HF output is normed
            assert rel(getattr(ours, f"layers_{i}")(hs[i])[0], hs[i + 1]) < 1e-5, i
        full = ours(x)
        assert rel(hf.norm(full), hs[-1]) < 1e-4
        cuts = sorted(rng.sample(range(1, length), min(length - 1, rng.randint(1, 4)))) if length > 1 else []
        cached = _cached_in_chunks(ours, x, [0, *cuts, length])
    # other attention shapes, so other float32 rounding: within 1e-5 of the output's scale (these
    # random MoE stacks reach |y| ~ 10), and 1e-6 in norm
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
    assert rel(cached, full) < 1e-6


@pytest.mark.parametrize("seed", range(8))
def test_seeded_random_packings_equal_separate_sequences(seed):
    """1-4 packed sequences per row of random lengths (windows / chunks shorter and longer than them),
    padded rows: each sequence's rows equal the sequence run alone."""
    _, _, ours = build(seed=seed, step=1 + seed % 2, attention_chunk_size=(3, 4, 64)[seed % 3])
    check_random_packing(ours, 64, seed)


@pytest.mark.parametrize("seed", [1, 2])
def test_autocast_bitwise_equal_to_hf_and_gradients_no_worse(seed):
    """CPU autocast (bf16) over the float32 model, as in mixed-precision fine-tuning: the router Linear
    gives bf16 logits while x is the float32 residual; HF's bf16 router score scales the float32 row
    and its expert bmm runs in bf16. The output equals HF's bitwise (seeds without tied bf16 router
    logits, checked: ties go to the lowest expert here, HF's topk leaves them open), and the input
    gradient's error against float64 is no worse than HF's own."""
    from unittest import mock

    import vitops.models.llama4 as llama4_module
    from _utils import autocast_against_hf

    hf, tc, ours = build(seed=seed)
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(seed))
    tied, original = [], llama4_module.moe_route

    def route(flat, logits):
        top2 = logits.float().topk(2, dim=-1).values
        tied.append(int((top2[:, 0] == top2[:, 1]).sum()))
        return original(flat, logits)

    with mock.patch.object(llama4_module, "moe_route", side_effect=route):
        want, got, hf_err, ours_err = autocast_against_hf(hf, ours, x)
    assert len(tied) == len(tc.moe_layers) and not any(tied), tied  # one routing per MoE layer, no ties
    assert torch.equal(got, want)
    assert ours_err <= 1.05 * hf_err + 1e-4, (ours_err, hf_err)


def test_mismatched_call_arguments_get_clear_errors():
    _, _, ours = build()
    check_decoder_bad_calls(ours, 64)

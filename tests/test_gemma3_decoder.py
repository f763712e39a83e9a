"""Gemma 3 text decoder layers (vitops.models.gemma3: Gemma3DecoderLayer, Gemma3ScannableBlock) against
transformers 5.18's Gemma3DecoderLayer stack (random weights, eval, SDPA): sliding and global layers,
linear RoPE scaling, head_dim != hidden / heads, GQA, image-token blocks (token_type_ids), padding,
packed segments, the KV-cache step, bf16, gradients, torch.compile; and the checkpoint key forms."""

import pytest
import torch

from vitops.hf import CheckpointMismatchError
from vitops.hf import gemma3 as gemma3_hf
from vitops.layers import AttentionType, image_block_ids
from vitops.models.gemma3 import Gemma3DecoderConfig, Gemma3DecoderLayer, Gemma3ScannableBlock

from _utils import DEVICES, block_and_layer_by_layer, check_decoder_bad_calls, check_random_packing

transformers = pytest.importorskip("transformers")
from transformers import Gemma3Config, Gemma3TextConfig  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3Model, Gemma3TextModel  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             query_pre_attn_scalar=24, sliding_window=4)


def text_config(layers=7, **kw):
    args = dict(SMALL, **kw)
    return Gemma3TextConfig(
        vocab_size=64, num_hidden_layers=layers, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
        attn_implementation="sdpa", **args)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises the (1 + w) norms to zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def multimodal_hf(layers=7, seed=0, **kw):
    """Gemma3Model (text + a tiny vision tower) so that token_type_ids build HF's image-block masks."""
    tc = text_config(layers, **kw)
    vc = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, vision_use_head=False)
    cfg = Gemma3Config(text_config=tc.to_dict(), vision_config=vc, mm_tokens_per_image=1)
    cfg.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return randomize(Gemma3Model(cfg).eval(), seed), cfg


def ours_from(hf_model, hf_config, dtype=None):
    return gemma3_hf.decoder_from_hf(hf_config, hf_model.state_dict(), dtype=dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_hidden(hf, x, **kw):
    with torch.no_grad():
        return hf(inputs_embeds=x, output_hidden_states=True, **kw).hidden_states


@pytest.mark.parametrize("seed", range(3))
def test_stack_matches_hf_with_image_blocks_and_padding(seed):
    hf, cfg = multimodal_hf(seed=seed)
    ours = ours_from(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    b, length = 2, 13
    x = torch.randn(b, length, 64, generator=g)
    token_type = torch.zeros(b, length, dtype=torch.long)
    token_type[0, 2:6] = 1  # one image block of 4 tokens (longer than the window of 4)
    token_type[1, 1:3] = 1
    token_type[1, 7:12] = 1  # two blocks in the second row
    pad = torch.ones(b, length, dtype=torch.long)
    pad[1, -1] = 0  # right padding
    hs = hf_hidden(hf, x, token_type_ids=token_type, attention_mask=pad)
    with torch.no_grad():
        y = x
        for i in range(7):
            y, _ = getattr(ours, f"layers_{i}")(y, decoder_segment_ids=pad, bidirectional_mask=token_type == 1)
            want = hs[i + 1] if i < 6 else None
            if want is not None:
                valid = pad.bool()
                assert rel(y[valid], want[valid]) < 1e-5 * (i + 1), i
        final = hf.language_model.norm(y)
    valid = pad.bool()
    assert rel(final[valid], hs[-1][valid]) < 1e-4


def test_each_layer_type_within_1e5_per_layer():
    """Layer-by-layer from HF's own inputs: a sliding layer and the global layer, each <= 1e-5."""
    hf, cfg = multimodal_hf()
    ours = ours_from(hf, cfg)
    x = torch.randn(2, 17, 64)
    hs = hf_hidden(hf, x)
    with torch.no_grad():
        for i in range(6):
            layer = getattr(ours, f"layers_{i}")
            assert layer.attention_type == (AttentionType.GLOBAL if i == 5 else AttentionType.LOCAL_SLIDING)
            got, _ = layer(hs[i])
            assert rel(got, hs[i + 1]) < 1e-5, i


def _released_layers_match(hidden, inter, heads, kv, hd, scalar, length):
    """A sliding and a global layer at full width: HF built with layer_types [sliding, full] (two
    layers, not six), each of ours loaded from its HF layer and run on HF's own input."""
    tc = text_config(layers=2, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=hd, query_pre_attn_scalar=scalar, sliding_window=1024,
                     layer_types=["sliding_attention", "full_attention"])
    tc.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    hf = randomize(Gemma3TextModel(tc).eval())
    hf.norm.weight.data.zero_()
    cfg = gemma3_hf.decoder_config_from_hf(dict(tc.to_dict(), layer_types=None))
    sd = hf.state_dict()
    x = torch.randn(1, length, hidden)
    hs = hf_hidden(hf, x)
    for i, kind in enumerate((AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)):
        layer = Gemma3DecoderLayer(cfg, kind).eval()
        block = Gemma3ScannableBlock.__new__(Gemma3ScannableBlock)
        torch.nn.Module.__init__(block)
        block.num_of_layers = 1
        block.add_module("layers_0", layer)
        layer_sd = {k.replace(f"layers.{i}.", "layers.0."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        gemma3_hf.load_hf_decoder_state_dict(block, layer_sd)
        with torch.no_grad():
            got, _ = layer(hs[i])
        want = hs[i + 1] if i == 0 else None
        if want is None:  # the last hidden state is normed: undo nothing, compare through the same norm
            want, got = hs[-1], hf.norm(got)
        assert rel(got, want) < 1e-5, kind


def test_released_4b_layers_full_width_short_sequence():
    _released_layers_match(2560, 10240, 8, 4, 256, 256, 9)


@pytest.mark.slow
def test_released_27b_layers_full_width_short_sequence():
    """27B: head_dim 128 with query_pre_attn_scalar 168 = hidden / heads (not head_dim)."""
    _released_layers_match(5376, 21504, 32, 16, 128, 168, 7)


def test_packed_segments_equal_separate_sequences():
    hf, cfg = multimodal_hf()
    ours = ours_from(hf, cfg)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, 64, generator=g), torch.randn(1, 9, 64, generator=g)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[1] * 6 + [2] * 9])
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    with torch.no_grad():
        y = ours(packed, segments, positions)
        ya, yb = ours(a), ours(b)
    torch.testing.assert_close(y[:, :6], ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 6:], yb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [(5, 1, 1, 1, 1, 1), (3, 2, 4, 1)])
def test_kv_cache_steps_equal_the_full_forward(steps):
    """Prefill then autoregressive chunks (image tokens in the prefill, a block crossing the first
    boundary) against one full forward; every layer's window and pattern is exercised."""
    hf, cfg = multimodal_hf()
    ours = ours_from(hf, cfg)
    total = sum(steps)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, total, 64, generator=g)
    # image blocks inside the first call: a block split across calls cannot see its later tokens
    # before they exist (HF likewise builds the block mask at the first step only)
    image = torch.zeros(2, total, dtype=torch.bool)
    image[0, 1:3] = True
    image[1, 0:3] = True
    with torch.no_grad():
        full = ours(x, bidirectional_mask=image)
        caches, outs, start = None, [], 0
        for n in steps:
            mode = "prefill" if caches is None else "autoregressive"
            y, caches = ours(x[:, start:start + n], model_mode=mode, bidirectional_mask=image[:, start:start + n],
                             kv_cache=caches)
            outs.append(y)
            start += n
    assert caches[0].length == total
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cached_step_matches_hf_with_its_cache():
    tc = text_config()
    torch.manual_seed(1)
    hf = randomize(Gemma3TextModel(tc).eval(), 1)
    ours = gemma3_hf.decoder_from_hf(tc, hf.state_dict())
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        first = hf(inputs_embeds=x[:, :7], use_cache=True)
        step = hf(inputs_embeds=x[:, 7:], past_key_values=first.past_key_values, use_cache=True)
        _, caches = ours(x[:, :7], model_mode="prefill")
        y, _ = ours(x[:, 7:], model_mode="autoregressive", kv_cache=caches)
    assert rel(hf.norm(y), step.last_hidden_state) < 1e-5


def test_image_block_ids_continue_across_a_cache():
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    ids = image_block_ids(mask)
    assert ids.tolist() == [[0, 1, 1, 0, 2, 2, 2, 0]]
    first, second = image_block_ids(mask[:, :5]), None
    second = image_block_ids(mask[:, 5:], first)
    assert torch.cat([first, second], 1).tolist() == ids.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_against_float64_no_worse_than_hf(dtype):
    ours_err, hf_err = [], []
    for seed in range(3):
        hf, cfg = multimodal_hf(seed=seed)
        x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(10 + seed))
        token_type = torch.zeros(2, 12, dtype=torch.long)
        token_type[:, 3:7] = 1
        sd = hf.state_dict()
        ref = hf_hidden(hf.double(), x.double(), token_type_ids=token_type)[-2]  # before the final norm
        ours64 = gemma3_hf.decoder_from_hf(cfg, sd, dtype=torch.float64)
        with torch.no_grad():
            ours_ref = ours64(x.double(), bidirectional_mask=token_type == 1)
        hf.to(dtype)
        hf_out = hf_hidden(hf, x.to(dtype), token_type_ids=token_type)
        ours = gemma3_hf.decoder_from_hf(cfg, sd, dtype=dtype)
        with torch.no_grad():
            out = ours(x.to(dtype), bidirectional_mask=token_type == 1)
        assert out.dtype == dtype
        # the stack's output before the final norm: HF's hidden_states[-1] is normed, so compare
        # the 6th layer's output with HF's and the full stack with our float64 run
        with torch.no_grad():
            y6 = x.to(dtype)
            for i in range(6):
                y6, _ = getattr(ours, f"layers_{i}")(y6, bidirectional_mask=token_type == 1)
        ours_err.append(rel(y6, ref))
        hf_err.append(rel(hf_out[-2], ref))
        assert rel(out, ours_ref) < 0.1
    assert sum(ours_err) / 3 <= 1.05 * sum(hf_err) / 3, (ours_err, hf_err)


def test_gradients_match_hf():
    hf, cfg = multimodal_hf(layers=6)
    ours = ours_from(hf, cfg)
    x = torch.randn(2, 9, 64, requires_grad=True)
    token_type = torch.zeros(2, 9, dtype=torch.long)
    token_type[1, 2:5] = 1
    g = torch.randn(2, 9, 64)
    hf_out = hf(inputs_embeds=x, token_type_ids=token_type, output_hidden_states=True).hidden_states[-2]
    want = torch.autograd.grad((hf_out * g).sum(), [x, hf.language_model.layers[0].self_attn.q_proj.weight,
                                                     hf.language_model.layers[2].self_attn.k_norm.weight,
                                                     hf.language_model.layers[4].mlp.gate_proj.weight])
    x2 = x.detach().clone().requires_grad_()
    y = x2
    for i in range(5):
        y, _ = getattr(ours, f"layers_{i}")(y, bidirectional_mask=token_type == 1)
    got = torch.autograd.grad((y * g).sum(), [x2, ours.layers_0.self_attention.query.weight,
                                              ours.layers_2.self_attention.key_norm.scale, ours.layers_4.mlp.wi_0.weight])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-5


def test_compile_fullgraph_dynamic_no_recompile():
    import torch._dynamo.testing

    cfg = Gemma3DecoderConfig(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                              query_pre_attn_scalar=8.0, sliding_window=3)
    block = Gemma3ScannableBlock(cfg, 6).eval()
    randomize(block)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        for b, length in ((2, 7), (3, 11), (4, 5)):
            x = torch.randn(b, length, 32)
            image = torch.zeros(b, length, dtype=torch.bool)
            image[:, 1:3] = True
            torch.testing.assert_close(compiled(x, bidirectional_mask=image), block(x, bidirectional_mask=image))
    assert counter.frame_count == 1


def test_dropout_in_train_mode_only():
    cfg = Gemma3DecoderConfig(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                              query_pre_attn_scalar=8.0, sliding_window=3, dropout_rate=0.3)
    layer = Gemma3DecoderLayer(cfg).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        a, _ = layer(x)
        assert torch.equal(a, layer(x)[0]) and torch.equal(a, layer(x, deterministic=True)[0])
        assert not torch.equal(a, layer(x, deterministic=False)[0])
        layer.train()
        assert not torch.equal(a, layer(x)[0])
        assert torch.equal(a, layer(x, deterministic=True)[0])


def test_call_errors():
    cfg = Gemma3DecoderConfig(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                              query_pre_attn_scalar=8.0, sliding_window=3)
    layer = Gemma3DecoderLayer(cfg)
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="`model_mode` must be one of"):
        layer(x, model_mode="decode")
    with pytest.raises(ValueError, match='model_mode="autoregressive" needs the `kv_cache`'):
        layer(x, model_mode="autoregressive")
    with pytest.raises(NotImplementedError, match="`page_state`"):
        layer(x, page_state=object())
    with pytest.raises(ValueError, match="attention_type must be LOCAL_SLIDING or GLOBAL"):
        Gemma3DecoderLayer(cfg, AttentionType.CHUNK)
    with pytest.raises(ValueError, match="num_heads 5 is not a multiple of num_kv_heads 2"):
        cfg.replace(num_heads=5)


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs
# ---------------------------------------------------------------------------------------------
def _full_state_dicts():
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    hf, cfg = multimodal_hf(layers=6)
    cg = Gemma3ForConditionalGeneration(cfg).eval()
    cg.model.load_state_dict(hf.state_dict())
    causal = Gemma3ForCausalLM(cfg.text_config).eval()
    causal.model.load_state_dict(hf.language_model.state_dict())
    layers = {k: v for k, v in hf.language_model.state_dict().items()}
    return cfg, {
        "5.18 in memory (model.language_model.)": cg.state_dict(),
        "hub / save_pretrained (language_model.model.)": {
            k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.",
                                                                                  "vision_tower.vision_model."): v
            for k, v in cg.state_dict().items()},
        "Gemma3ForCausalLM (model.)": causal.state_dict(),
        "Gemma3TextModel ('')": layers,
    }, hf


def test_every_key_form_loads_and_round_trips(tmp_path):
    cfg, forms, hf = _full_state_dicts()
    x = torch.randn(1, 8, 64)
    want = hf_hidden(hf, x)[-1]  # after the final norm
    for name, sd in forms.items():
        block = Gemma3ScannableBlock(gemma3_hf.decoder_config_from_hf(cfg), 6).eval()
        report = gemma3_hf.load_hf_decoder_state_dict(block, sd)
        assert not report.missing and not report.unexpected, name
        with torch.no_grad():
            assert rel(hf.language_model.norm(block(x)), want) < 1e-5, name
    exported = gemma3_hf.decoder_to_hf_state_dict(block)
    assert set(exported) == {k for k in forms["hub / save_pretrained (language_model.model.)"]
                             if k.startswith("language_model.model.layers.")}
    from safetensors.torch import save_file
    save_file(exported, str(tmp_path / "decoder.safetensors"))
    again = Gemma3ScannableBlock(gemma3_hf.decoder_config_from_hf(cfg), 6).eval()
    gemma3_hf.load_hf_decoder_state_dict(again, tmp_path / "decoder.safetensors")
    for k, v in again.state_dict().items():
        assert torch.equal(v, block.state_dict()[k]), k


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    cfg, forms, _ = _full_state_dicts()
    sd = dict(forms["5.18 in memory (model.language_model.)"])
    del sd["model.language_model.layers.1.mlp.up_proj.weight"]
    sd["model.language_model.layers.9.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.language_model.layers.2.self_attn.q_norm.weight"] = torch.zeros(25)
    block = Gemma3ScannableBlock(gemma3_hf.decoder_config_from_hf(cfg), 6)
    with pytest.raises(CheckpointMismatchError) as e:
        gemma3_hf.load_hf_decoder_state_dict(block, sd)
    msg = str(e.value)
    for part in ("layers.1.mlp.up_proj.weight", "layers.9.mlp.up_proj.weight", "layers.2.self_attn.q_norm.weight"):
        assert part in msg


def test_config_forms_and_errors():
    tc = text_config()
    c = gemma3_hf.decoder_config_from_hf(tc)
    assert (c.rope_local_base_freq, c.rope_theta, c.rope_linear_factor) == (10000.0, 1000000.0, 8.0)
    assert (c.head_dim, c.query_pre_attn_scalar, c.sliding_window) == (24, 24.0, 4)
    legacy = dict(tc.to_dict(), rope_parameters=None, rope_theta=1e6, rope_local_base_freq=1e4,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert gemma3_hf.decoder_config_from_hf(legacy) == c
    with pytest.raises(ValueError, match="differ from Gemma 3's 5:1 pattern"):
        gemma3_hf.decoder_config_from_hf(dict(tc.to_dict(), layer_types=["full_attention"] * 7))
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        bad = tc.to_dict()
        bad["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0}}
        gemma3_hf.decoder_config_from_hf(bad)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_on_each_device(device):
    """fp32 parity and bf16 against float64, per device (CUDA in tools/gpu_check.sh)."""
    tc = text_config(layers=6)
    torch.manual_seed(2)
    hf = randomize(Gemma3TextModel(tc).eval())
    sd = hf.state_dict()
    x = torch.randn(2, 10, 64)
    ref = hf_hidden(hf.double(), x.double())
    for dtype in (torch.float32, torch.bfloat16):
        ours = gemma3_hf.decoder_from_hf(tc, sd, dtype=dtype, device=device)
        hf_d = Gemma3TextModel(tc).eval()
        hf_d.load_state_dict(sd)
        hf_d.to(device=device, dtype=dtype)
        with torch.no_grad():
            got = ours(x.to(device=device, dtype=dtype))
            want = hf_hidden(hf_d, x.to(device=device, dtype=dtype))[-1]
            normed = hf_d.norm(got)
        assert got.device.type == device and got.dtype == dtype
        if dtype == torch.float32:
            assert rel(normed.cpu(), want.cpu()) < 1e-4
        else:
            assert rel(normed.cpu(), ref[-1]) <= 1.1 * rel(want.cpu(), ref[-1]) + 1e-3


def test_block_computes_rope_tables_once_and_equals_layer_by_layer():
    """A scannable block computes the cos/sin once per RoPE setting (local and global) for all its
    layers; the result equals running its layers one by one, each computing its own tables; the
    tables equal HF's Gemma3RotaryEmbedding output (its first half) bit for bit."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from vitops.layers import RopeTables

    hf, cfg = multimodal_hf()
    ours = ours_from(hf, cfg)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(2, 11).expand(2, 9)
    block_out, y, seen = block_and_layer_by_layer(ours, x, positions)
    assert len(set(seen)) == 1 and len(seen) == ours.num_of_layers  # one RopeTables, shared
    assert torch.equal(block_out, y)
    tables = RopeTables(positions)
    rotary = Gemma3RotaryEmbedding(cfg.text_config)
    for layer_type, theta, factor in (("sliding_attention", 10000.0, None), ("full_attention", 1e6, 8.0)):
        hf_cos, hf_sin = rotary(x, positions, layer_type)
        cos, sin = tables.get(24, theta, linear_factor=factor)
        assert torch.equal(cos, hf_cos[..., :12]) and torch.equal(sin, hf_sin[..., :12]), layer_type


@pytest.mark.parametrize("seed", range(24))
def test_seeded_random_configs_match_hf_per_layer_stack_and_cache(seed):
    """Configs the fixed tests do not use, drawn per seed: heads / KV heads / head dim (often not
    hidden / heads), widths, sliding windows of 2 to 512, query_pre_attn_scalar, global linear
    factor 1 or 8, 1-7 layers (so the global layer is present or not), batch 1-3, length 1-40.
    Per layer <= 1e-5 and the stack <= 1e-4 against HF's Gemma3TextModel; prefill + autoregressive
    chunks at random boundaries equal the full forward."""
    import random

    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    hd = rng.choice([8, 12, 16, 40])
    layers, hidden = rng.randint(1, 7), rng.choice([32, 48, 64])
    tc = text_config(layers, hidden_size=hidden, intermediate_size=rng.choice([16, 40, 96]), num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=hd, query_pre_attn_scalar=rng.choice([hd, 256, 17]),
                     sliding_window=rng.choice([2, 3, 7, 512]))
    tc.rope_parameters["full_attention"]["factor"] = float(rng.choice([1, 8]))
    torch.manual_seed(seed)
    hf = randomize(Gemma3TextModel(tc).eval(), seed)
    ours = gemma3_hf.decoder_from_hf(tc, hf.state_dict())
    b, length = rng.randint(1, 3), rng.randint(1, 40)
    x = torch.randn(b, length, hidden, generator=torch.Generator().manual_seed(seed))
    hs = hf_hidden(hf, x)
    with torch.no_grad():
        y = x
        for i in range(layers):
            layer = getattr(ours, f"layers_{i}")
            if i < layers - 1:  # the last layer's HF output is normed
                assert rel(layer(hs[i])[0], hs[i + 1]) < 1e-5, i
            y, _ = layer(y)
        assert rel(hf.norm(y), hs[-1]) < 1e-4
        full = ours(x)
        cuts = sorted(rng.sample(range(1, length), min(length - 1, rng.randint(1, 4)))) if length > 1 else []
        caches, outs, bounds = None, [], [0, *cuts, length]
        for a, e in zip(bounds[:-1], bounds[1:]):
            out, caches = ours(x[:, a:e], model_mode="prefill" if caches is None else "autoregressive",
                               kv_cache=caches)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_seeded_random_packings_equal_separate_sequences(seed):
    """1-4 packed sequences per row of random lengths (windows / chunks shorter and longer than them),
    padded rows: each sequence's rows equal the sequence run alone."""
    hf, cfg = multimodal_hf(seed=seed, sliding_window=(2, 4, 64)[seed % 3])
    ours = ours_from(hf, cfg)
    check_random_packing(ours, 64, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_autocast_bitwise_equal_to_hf_and_gradients_no_worse(seed):
    """CPU autocast (bf16) over the float32 model: q/k come out of their Linear in bf16, the norms
    return bf16, cos/sin stay float32 (computed from the float32 residual) so HF's rotation runs in
    float32 and SDPA in bf16. The output equals HF's bitwise; the input gradient's error against
    float64 is no worse than HF's own."""
    from _utils import autocast_against_hf

    tc = text_config()
    torch.manual_seed(seed)
    hf = randomize(Gemma3TextModel(tc).eval(), seed)
    ours = gemma3_hf.decoder_from_hf(tc, hf.state_dict())
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(seed))
    want, got, hf_err, ours_err = autocast_against_hf(hf, ours, x)
    assert torch.equal(got, want)
    assert ours_err <= 1.05 * hf_err + 1e-4, (ours_err, hf_err)


def test_mismatched_call_arguments_get_clear_errors():
    hf, cfg = multimodal_hf()
    ours = ours_from(hf, cfg)
    check_decoder_bad_calls(ours, 64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`bidirectional_mask` must be \[B, L\] = \[2, 5\]"):
        ours(x, bidirectional_mask=torch.ones(2, 4, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(TypeError, match="`bidirectional_mask` must be a bool tensor"):
        ours(x, bidirectional_mask=torch.ones(2, 5, dtype=torch.long))

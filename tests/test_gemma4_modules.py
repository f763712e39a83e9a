"""vitops.models.gemma4_vision and vitops.keras_hub: configs, shapes, contracts, torch.compile.

HF parity lives in test_gemma4_parity.py; checkpoint loading in test_checkpoints.py.
"""

from __future__ import annotations

import pytest
import torch

import vitops
from vitops import keras_hub
from vitops.models import gemma4_vision as g4
from vitops.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector

from test_gemma4_parity import GRIDS, SMALL, image_batch, make_hf, make_ours, rel, requires_ops

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_presets_match_released_sizes():
    e2b, e4b = Gemma4VisionConfig.preset("e2b"), Gemma4VisionConfig.preset("gemma4-e4b")
    big, b31 = Gemma4VisionConfig.preset("gemma4-26b-a4b"), Gemma4VisionConfig.preset("gemma4_31b")
    for c in (e2b, e4b):
        assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
            768, 3072, 16, 12, 12, 64)
        assert c.use_clipped_linears and not c.standardize
    for c in (big, b31):
        assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
            1152, 4304, 27, 16, 16, 72)
        assert not c.use_clipped_linears and c.standardize
    assert [c.text_hidden_size for c in (e2b, e4b, big, b31)] == [1536, 2560, 2816, 5376]
    for c in (e2b, big):
        assert (c.patch_size, c.pooling_kernel_size, c.position_embedding_size, c.rope_theta) == (16, 3, 10240, 100.0)
    with pytest.raises(ValueError, match="unknown Gemma 4 vision preset"):
        Gemma4VisionConfig.preset("gemma4-2b")


def test_config_from_hf():
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig as HFVision

    hv = HFVision(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=20, use_clipped_linears=True, standardize=True,
                  position_embedding_size=123, rope_parameters={"rope_type": "axial", "rope_theta": 50.0})
    full = Gemma4Config(text_config=Gemma4TextConfig(hidden_size=64, num_hidden_layers=1), vision_config=hv)
    for src in (full, full.to_dict(), hv, hv.to_dict()):
        c = Gemma4VisionConfig.from_hf(src)
        assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
            96, 160, 3, 6, 3, 20)
        assert (c.use_clipped_linears, c.standardize, c.position_embedding_size, c.rope_theta) == (
            True, True, 123, 50.0)
        assert c.text_hidden_size == (64 if src in (full,) or "text_config" in src else None)
    # defaults of the installed HF config (rope_type "axial") == E2B tower
    c = vitops.hf.config_from_hf(HFVision())
    assert c.replace(use_clipped_linears=True, text_hidden_size=1536) == Gemma4VisionConfig.preset("e2b")
    # round trip through the HF config
    # (dropout_rate / residual_dropout are MaxText's and KerasHub's, not HF config fields)
    assert Gemma4VisionConfig.from_hf(vitops.hf.to_hf_vision_config(SMALL["26b-like-gqa"])) == SMALL[
        "26b-like-gqa"].replace(text_hidden_size=None, dropout_rate=0.0, residual_dropout=0.0)
    with pytest.raises(ValueError, match="axial"):
        Gemma4VisionConfig.from_hf({"model_type": "gemma4_vision", "hidden_size": 64, "num_attention_heads": 4,
                                    "rope_parameters": {"rope_type": "linear", "rope_theta": 100.0}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=18), "divisible by 4"),
    (dict(num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(hidden_activation="relu"), "tanh-approximated GELU"),
    (dict(output_length=0), "output_length"),
])
def test_config_errors(kwargs, match):
    base = dict(hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=match):
        Gemma4VisionConfig(**{**base, **kwargs})


def test_module_names_and_buffers():
    cfg = SMALL["e2b-like"]
    tower = Gemma4VisionEncoderLayer(cfg)
    names = set(tower.state_dict())
    assert "vision_entry.pos_emb_param" in names and tower.vision_entry.pos_emb_param.shape == (40, 2, 64)
    assert "layer_1.attention.query.input_min" in names and "layer_1.mlp.wo.output_max" in names
    assert tower.layer_0.attention.query.input_min.dim() == 0
    assert "layer_0.attention.value_norm.scale" not in names  # v norm has no scale
    assert not any(n.endswith(".bias") for n in names) and tower.std_bias is None
    big = Gemma4VisionEncoderLayer(SMALL["26b-like-gqa"])
    assert {"vision_exit.std_bias", "vision_exit.std_scale"} <= set(big.state_dict())
    assert not any("input_min" in n for n in big.state_dict())
    assert not any(n in dict(big.named_parameters()) for n in ("vision_exit.std_bias", "vision_exit.std_scale"))
    assert len(tower.layers) == 2
    with pytest.raises(ValueError, match="text_hidden_size"):
        Gemma4VisionProjector(cfg.replace(text_hidden_size=None))
    # the functional ops are re-exported like in MaxText
    assert g4.apply_multidimensional_rope is vitops.apply_multidimensional_rope
    assert g4.patchify is vitops.patchify and g4.avg_pool_by_positions is vitops.avg_pool_by_positions


# ---------------------------------------------------------------------------------------------
# Contracts (need the op kernels)
# ---------------------------------------------------------------------------------------------
@requires_ops
def test_images_path_equals_patches_path():
    """MaxText contract (A) images [B, N, H, W, 3] == contract (B) with the same patches, unpadded."""
    cfg = SMALL["26b-like-gqa"]
    tower = Gemma4VisionEncoderLayer(cfg).eval()
    images = torch.rand(2, 3, 12, 36, 3)  # 3 x 9 patches -> 3 slots
    with torch.no_grad():
        out_a = tower(images)
        assert out_a.shape == (2, 3, 3, cfg.hidden_size)
        patches, pos = vitops.patchify(images, cfg.patch_size)
        out_b, mask = tower(patches, image_position_ids=pos)
        assert out_b.shape == (2, 3, 3, cfg.hidden_size) and mask.shape == (2, 3, 3) and bool(mask.all())
        torch.testing.assert_close(out_a, out_b, rtol=1e-6, atol=1e-6)
        assert tower(images[0]).shape == (3, 1, 3, cfg.hidden_size)  # [B, H, W, 3]


@requires_ops
def test_padding_does_not_change_valid_outputs():
    cfg = SMALL["e2b-like"]
    tower = Gemma4VisionEncoderLayer(cfg).eval()
    pv, pp = image_batch(cfg, GRIDS)
    with torch.no_grad():
        batched = tower.forward_flat(pv, pp)
        alone = torch.cat([tower.forward_flat(*image_batch(cfg, [grid], seed=0)) for grid in GRIDS[:1]])
        more_pad = tower.forward_flat(*image_batch(cfg, GRIDS, length=45))
    torch.testing.assert_close(batched[: alone.shape[0]], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(more_pad, batched, rtol=1e-5, atol=1e-5)


@requires_ops
def test_clipping_and_standardize_are_active():
    """The random bounds of the parity tests really clip, and std buffers really apply."""
    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    tower, _ = make_ours(cfg, model, embedder)
    pv, pp = image_batch(cfg, GRIDS)
    loose = Gemma4VisionEncoderLayer(cfg).eval()
    loose.load_state_dict(tower.state_dict())
    for name, b in loose.named_buffers():
        if name.endswith(("_min", "_max")):
            b.fill_(float("inf") if name.endswith("_max") else -float("inf"))
    with torch.no_grad():
        assert rel(loose.forward_flat(pv, pp), tower.forward_flat(pv, pp)) > 1e-2
    cfg = SMALL["26b-like-gqa"]
    tower = Gemma4VisionEncoderLayer(cfg).eval()
    x = torch.randn(3, 36, cfg.hidden_size)
    with torch.no_grad():
        ((plain, mask),) = tower.vision_exit(x, positions_xy=pp)
        tower.vision_exit.std_bias.normal_()
        tower.vision_exit.std_scale.uniform_(0.5, 1.5)
        ((std, _),) = tower.vision_exit(x, positions_xy=pp)
    torch.testing.assert_close(std, (plain - tower.std_bias) * tower.std_scale, rtol=1e-5, atol=1e-5)


@requires_ops
def test_vision_exit_lengths_and_k1_mask():
    exit_ = g4.VisionExit(16, output_length=None, pooling_kernel_size=3)
    x = torch.randn(2, 36, 16)
    _, pos = image_batch(SMALL["e2b-like"], [(3, 6), (6, 6)])
    ((out, mask),) = exit_(x, positions_xy=pos)
    assert out.shape == (2, 4, 16) and mask.tolist() == [[True, True, False, False], [True] * 4]
    # several lengths at once (MaxText output_length_overrides); k = 1 keeps the patches and the
    # mask is True for real patches (HF's k == 1 branch returns it inverted)
    (a, _), (b, mask1) = exit_(x, positions_xy=pos, output_length_overrides=(4, 36))
    torch.testing.assert_close(a, out)
    assert torch.equal(mask1, ~(pos == -1).all(-1))
    torch.testing.assert_close(b[mask1], (x * 16**0.5)[mask1])
    # no positions: square grid (MaxText's legacy branch)
    ((sq, m),) = g4.VisionExit(16, output_length=4)(x)
    assert sq.shape == (2, 4, 16) and bool(m.all())
    # float16 scaling does not overflow in float32 before standardize... and the output dtype is kept
    ((h, _),) = exit_(x.half(), positions_xy=pos)
    assert h.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# torch.compile: no graph break, one compile for several image sizes
# ---------------------------------------------------------------------------------------------
@requires_ops
def test_compile_fullgraph_dynamic_no_recompile():
    """One compile for two image sizes; the compiled tower matches HF (the oracle), not only eager vitops."""
    import torch._dynamo.testing

    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    tower, _ = make_ours(cfg, model, embedder)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(tower, fullgraph=True, dynamic=True, backend=counter)
    batches = [image_batch(cfg, GRIDS), image_batch(cfg, [(6, 9), (9, 6), (9, 9)], length=81)]
    for pv, pp in batches:
        g4.mark_static_axes(pv, pp)
    with torch.no_grad():
        compiled(batches[0][0], image_position_ids=batches[0][1])
        with torch._dynamo.config.patch(error_on_recompile=True):
            out2, mask2 = compiled(batches[1][0], image_position_ids=batches[1][1])
        ref2 = model(*batches[1]).last_hidden_state
    assert counter.frame_count == 1
    assert out2.shape == (3, 9, cfg.hidden_size) and mask2.sum(-1).tolist() == [6, 6, 9]
    assert rel(out2[mask2], ref2) <= 1e-5


@requires_ops
def test_compile_inductor_matches_hf():
    cfg = SMALL["26b-like-gqa"]
    model, embedder = make_hf(cfg)
    tower, _ = make_ours(cfg, model, embedder)
    pv, pp = image_batch(cfg, GRIDS)
    compiled = torch.compile(tower, fullgraph=True, dynamic=True)
    with torch.no_grad():
        out, mask = compiled(pv, image_position_ids=pp)
        ref = model(pv, pp).last_hidden_state
    assert mask.sum(-1).tolist() == [r * c // 9 for r, c in GRIDS]
    assert rel(out[mask], ref) <= 1e-4


@pytest.mark.cuda
def test_cuda_padded_forward_does_not_sync():
    cfg = SMALL["e2b-like"]
    tower = Gemma4VisionEncoderLayer(cfg).eval().cuda()
    pv, pp = image_batch(cfg, GRIDS)
    pv, pp = pv.cuda(), pp.cuda()
    with torch.no_grad():
        tower(pv, image_position_ids=pp)  # warm-up (lazy init may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, mask = tower(pv, image_position_ids=pp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        flat = tower.forward_flat(pv, pp)
    assert torch.equal(out[mask], flat)


# ---------------------------------------------------------------------------------------------
# KerasHub-style encoder
# ---------------------------------------------------------------------------------------------
KH_ARGS = dict(image_size=24, patch_size=4, num_heads=4, hidden_dim=48, num_layers=2, intermediate_dim=64,
               head_dim=16, output_dim=40)


@pytest.mark.parametrize("changes, match", [
    (dict(head_dim=18), "head_dim must be divisible by 4"),
    (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(dtype="int8"), "dtype must be"),
    (dict(dtype="mixed_bfloat16"), "dtype must be"),
    (dict(dtype=torch.float64), "dtype must be"),
    (dict(num_layers=0), "num_layers"),
    (dict(patch_size=2.0), "patch_size"),
    (dict(dropout=1.5), "dropout"),
    (dict(layer_norm_epsilon=-1e-6), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon"),
    (dict(rope_max_wavelength=-1), "rope_max_wavelength"),
])
def test_keras_hub_argument_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        keras_hub.Gemma4VisionEncoder(**{**KH_ARGS, **changes})


def test_keras_hub_arguments_ok():
    # hidden_dim != num_heads * head_dim is allowed in Gemma 4
    enc = keras_hub.Gemma4VisionEncoder(**KH_ARGS, num_key_value_heads=2, dtype="bfloat16")
    assert enc.config.num_kv_heads == 2 and enc.num_vision_tokens_per_image == 4
    assert enc.projector.projection.weight.dtype == torch.bfloat16
    assert keras_hub.Gemma4VisionEncoder(**KH_ARGS, dtype=torch.float16).encoder.layer_0.mlp.wo.weight.dtype == torch.float16
    assert keras_hub.Gemma4VisionEncoder(**KH_ARGS, dtype="float32").config.use_clipped_linears  # KH default
    with pytest.raises(TypeError, match="unexpected arguments"):
        keras_hub.Gemma4VisionEncoder(**KH_ARGS, bogus=1)


@requires_ops
def test_keras_hub_output_shape_and_parity():
    cfg = SMALL["26b-like-gqa"]
    kh = keras_hub.Gemma4VisionEncoder(image_size=24, patch_size=4, num_heads=4, hidden_dim=48, num_layers=2,
                                       intermediate_dim=80, head_dim=12, output_dim=40, num_key_value_heads=2,
                                       position_embedding_size=40, use_clipped_linears=False, standardize=True,
                                       rope_max_wavelength=cfg.rope_theta, layer_norm_epsilon=cfg.rms_norm_eps).eval()
    model, embedder = make_hf(cfg)
    vitops.hf.load_hf_state_dict(kh, vitops.hf.to_hf_state_dict(make_ours(cfg, model, embedder)))
    pv, pp = image_batch(cfg, GRIDS + [(6, 6)])  # 4 images -> B=2, I=2
    inputs = {"pixel_values": pv.view(2, 2, 36, -1), "pixel_position_ids": pp.view(2, 2, 36, 2)}
    with torch.no_grad():
        out, mask = kh(inputs, return_mask=True)
        ref = embedder(model(pv, pp).last_hidden_state)
    assert out.shape == (2, 2, 4, 40) and mask.shape == (2, 2, 4)
    assert rel(out[mask], ref) <= 1e-4
    with pytest.raises(ValueError, match="pixel_values"):
        kh({"pixel_values": pv})
    with pytest.raises(ValueError, match="patch_dim"):
        kh({"pixel_values": pv.view(2, 2, 36, -1)[..., :10], "pixel_position_ids": inputs["pixel_position_ids"]})


# ---------------------------------------------------------------------------------------------
# KerasHub-style encoder: what KerasHub accepts, its config round trip, training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, patch_size, pool_size, pos", [
    (896, 16, 3, 10240),  # every released checkpoint as KerasHub's HF converter builds it (896 % 48 != 0)
    (20, 4, 3, 40),
    (33, 5, 2, 3),  # image_size nominal; a table smaller than image_size // patch_size
    (7, 16, 4, 1024),  # image_size smaller than a patch: no tokens per nominal image
])
def test_keras_hub_accepts_what_keras_hub_accepts(image_size, patch_size, pool_size, pos):
    enc = keras_hub.Gemma4VisionEncoder(image_size=image_size, patch_size=patch_size, num_heads=2, hidden_dim=16,
                                        num_layers=1, intermediate_dim=32, head_dim=8, output_dim=12,
                                        pool_size=pool_size, position_embedding_size=pos)
    assert enc.num_vision_tokens_per_image == (image_size // patch_size // pool_size) ** 2
    assert enc.config.pooling_kernel_size == pool_size and enc.config.position_embedding_size == pos


def test_keras_hub_get_config_round_trip_and_attributes():
    args = dict(KH_ARGS, num_key_value_heads=None, pool_size=3, position_embedding_size=50, rope_max_wavelength=37.0,
                layer_norm_epsilon=1e-5, dropout=0.25, use_clipped_linears=False, standardize=True)
    enc = keras_hub.Gemma4VisionEncoder(**args)
    config = enc.get_config()
    # KerasHub's 16 keys, num_key_value_heads resolved, values as given
    assert list(config) == ["image_size", "patch_size", "num_heads", "hidden_dim", "num_layers", "intermediate_dim",
                            "head_dim", "output_dim", "num_key_value_heads", "pool_size", "position_embedding_size",
                            "rope_max_wavelength", "layer_norm_epsilon", "dropout", "use_clipped_linears",
                            "standardize"]
    assert config == {**args, "num_key_value_heads": args["num_heads"]}
    for name, value in config.items():
        assert getattr(enc, name) == value
    again = keras_hub.Gemma4VisionEncoder.from_config(config)
    assert again.get_config() == config and again.config == enc.config
    assert set(again.state_dict()) == set(enc.state_dict())


@requires_ops
def test_keras_hub_training_applies_dropout():
    enc = keras_hub.Gemma4VisionEncoder(**dict(KH_ARGS, dropout=0.3))
    pv, pp = image_batch(SMALL["e2b-like"], GRIDS)
    inputs = {"pixel_values": pv.view(1, 3, 36, -1), "pixel_position_ids": pp.view(1, 3, 36, 2)}
    enc.eval()
    with torch.no_grad():
        a, b = enc(inputs), enc(inputs)
        c, d = enc(inputs, training=True), enc(inputs, training=True)
        enc.train()
        e, f = enc(inputs), enc(inputs)
        g = enc(inputs, training=False)
    assert torch.equal(a, b) and torch.equal(a, g)  # eval and training=False: deterministic
    assert not torch.equal(c, d) and not torch.equal(e, f)  # training=True / train(): dropout
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# MaxText modules: dropout in train mode, VisionExit's unpooled case, positions forms
# ---------------------------------------------------------------------------------------------
@requires_ops
@pytest.mark.parametrize("field", ["attention_dropout", "dropout_rate", "residual_dropout"])
def test_tower_dropout_train_mode_differs_eval_does_not(field):
    no_dropout = SMALL["e2b-like"].replace(attention_dropout=0.0, dropout_rate=0.0, residual_dropout=0.0)
    cfg = no_dropout.replace(**{field: 0.4})
    tower = Gemma4VisionEncoderLayer(cfg)
    pv, pp = image_batch(cfg, GRIDS)
    with torch.no_grad():
        tower.eval()
        e1, _ = tower(pv, image_position_ids=pp)
        e2, _ = tower(pv, image_position_ids=pp)
        explicit1, _ = tower(pv, False, image_position_ids=pp)  # MaxText: deterministic=False drops
        explicit2, _ = tower(pv, False, image_position_ids=pp)
        tower.train()
        t1, _ = tower(pv, image_position_ids=pp)
        t2, _ = tower(pv, image_position_ids=pp)
        kept, _ = tower(pv, True, image_position_ids=pp)  # deterministic=True: no dropout in train mode
        images = torch.rand(2, 12, 24, 3)
        r1, r2 = tower(images), tower(images)
    assert torch.equal(e1, e2) and torch.equal(kept, e1)
    assert not torch.equal(t1, t2) and not torch.equal(explicit1, explicit2)
    assert not torch.equal(r1, r2)
    # a zero rate never drops, in train mode too
    plain = Gemma4VisionEncoderLayer(no_dropout).train()
    with torch.no_grad():
        assert torch.equal(plain(pv, image_position_ids=pp)[0], plain(pv, image_position_ids=pp)[0])


def test_mlp_dropout_shares_its_mask_along_the_sequence():
    """MaxText's MlpBlock dropout has broadcast_dims=(-2,): one mask for every position."""
    from vitops.layers import broadcast_dropout

    cfg = SMALL["e2b-like"].replace(dropout_rate=0.5)
    x = torch.ones(2, 7, cfg.intermediate_size)
    y = broadcast_dropout(x, 0.5, True)
    assert torch.equal(y, y[:, :1].expand_as(y)) and not torch.equal(y[0], y[1])
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(broadcast_dropout(x, 0.5, False), x)


@requires_ops
@pytest.mark.parametrize("k", [2, 3])
def test_vision_exit_keeps_input_order_when_nothing_is_pooled(k):
    """length == L with a pooling kernel k != 1: HF and MaxText return the patches unpooled in input
    order (scaled, padding zeroed), not reordered by position."""
    exit_ = g4.VisionExit(16, pooling_kernel_size=k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 9, 16, generator=g)
    _, pos = image_batch(SMALL["e2b-like"], [(3, 3), (3, 1)], length=9)
    perm = torch.randperm(9, generator=g)
    pos = pos[:, perm]  # patches in an order that differs from their positions' order
    ((out, mask),) = exit_(x, positions_xy=pos, output_length_overrides=(9,))
    padding = (pos == -1).all(-1)
    assert torch.equal(mask, ~padding)
    torch.testing.assert_close(out, (x * 4.0).masked_fill(padding.unsqueeze(-1), 0.0))


@requires_ops
def test_vision_exit_default_positions_are_a_row_major_grid():
    """No positions: MaxText's square grid, x = column and y = row, against the reference pooling."""
    exit_ = g4.VisionExit(8, output_length=4, pooling_kernel_size=2)
    x = torch.randn(3, 16, 8)
    ((out, mask),) = exit_(x)
    _, pos = vitops.reference.patchify(torch.zeros(4, 4, 1), 1)  # (x, y) of a 4 x 4 grid, row-major
    ref, ref_mask = vitops.reference.avg_pool_scale_standardize(x, pos.expand(3, 16, 2), 4, 8**0.5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(mask, ref_mask)
    # the swapped grid would pool other patches together: the test can tell them apart
    swapped, _ = vitops.reference.avg_pool_scale_standardize(x, pos.flip(-1).expand(3, 16, 2), 4, 8**0.5)
    assert (swapped - ref).abs().max() > 0.1


@requires_ops
def test_tower_accepts_shared_positions_and_rejects_bad_ones():
    cfg = SMALL["e2b-like"]
    tower = Gemma4VisionEncoderLayer(cfg).eval()
    pv, pp = image_batch(cfg, [(6, 6), (6, 6)])
    with torch.no_grad():
        out, mask = tower(pv, image_position_ids=pp)
        shared, shared_mask = tower(pv, image_position_ids=pp[0])  # [L, 2] for every image
        torch.testing.assert_close(shared, out, rtol=0, atol=0)
        assert torch.equal(shared_mask, mask)
        for bad in (pp[:1], pp[..., :1], pp[:, :5], pp.unsqueeze(0)):
            with pytest.raises(ValueError, match="image_position_ids must be"):
                tower(pv, image_position_ids=bad)


# ---------------------------------------------------------------------------------------------
# torch.compile(dynamic=True): one graph for every batch size after the first
# ---------------------------------------------------------------------------------------------
def _count_compiles(call, batch_sizes):
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    counts = []
    with torch.no_grad():
        for b in batch_sizes:
            call(counter, b)
            counts.append(counter.frame_count)
    return counts


@requires_ops
@pytest.mark.parametrize("first", [1, 2, 3])
@pytest.mark.parametrize("path", ["padded", "images"])
@pytest.mark.parametrize("how", ["module.compile", "torch.compile+mark_static_axes"])
def test_compile_dynamic_first_batch_is_general(first, path, how):
    """A first batch of 2 (padded: the size of the (x, y) axis) or 3 (images: the channels) used to be
    duck-shaped with that axis, so every other batch size recompiled. Now the first graph serves every
    batch size >= 2; torch always compiles size 1 apart (its 0/1 specialisation)."""
    cfg = SMALL["e2b-like"]
    tower = Gemma4VisionEncoderLayer(cfg).eval()
    grids = [(3, 6), (6, 6), (6, 3), (3, 3), (6, 6)]
    state = {}

    def call(counter, b):
        if "fn" not in state:
            if how == "module.compile":
                tower.compile(fullgraph=True, dynamic=True, backend=counter)
                state["fn"] = tower
            else:
                state["fn"] = torch.compile(tower, fullgraph=True, dynamic=True, backend=counter)
        if path == "padded":
            pv, pp = image_batch(cfg, grids[:b])
            if how != "module.compile":
                g4.mark_static_axes(pv, pp)
            out, mask = state["fn"](pv, image_position_ids=pp)
            ref, ref_mask = Gemma4VisionEncoderLayer.forward(tower, pv, image_position_ids=pp)
            assert torch.equal(mask, ref_mask)
        else:
            images = torch.rand(b, 12, 24, 3)
            if how != "module.compile":
                g4.mark_static_axes(images)
            out = state["fn"](images)
            ref = Gemma4VisionEncoderLayer.forward(tower, images)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    sizes = [first] + [b for b in (2, 3, 4, 5) if b != first]
    counts = _count_compiles(call, sizes)
    assert counts == [1] * len(sizes) if first > 1 else counts == [1] + [2] * (len(sizes) - 1), (sizes, counts)


def test_processor_outputs_keep_their_fixed_axes_static():
    from vitops.preprocess import Gemma4ImageProcessor

    batch = Gemma4ImageProcessor(max_soft_tokens=70)([torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)] * 2)
    for t in (batch.pixel_values, batch.pixel_position_ids, batch.to("cpu").pixel_position_ids):
        assert t._dynamo_static_indices == {t.dim() - 1}

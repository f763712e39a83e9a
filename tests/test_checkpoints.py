"""vitops.hf checkpoint loading: HF key layouts and prefixes, safetensors round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from vitops import hf as vhf
from vitops import keras_hub
from vitops.models.gemma4_vision import Gemma4VisionEncoderLayer, Gemma4VisionProjector

from test_gemma4_parity import GRIDS, SMALL, hf_checkpoint, image_batch, make_hf, rel, requires_ops

safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("transformers")


def fresh(cfg, dtype=None):
    return Gemma4VisionEncoderLayer(cfg, dtype=dtype).eval(), Gemma4VisionProjector(cfg, dtype=dtype).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("tower_prefix, embed_prefix", [
    ("model.vision_tower.", "model.embed_vision."),  # Gemma4ForConditionalGeneration
    ("vision_tower.", "embed_vision."),
    ("model.vision_model.", "model.multi_modal_projector."),
])
def test_prefixes_and_full_checkpoint(name, tower_prefix, embed_prefix, tmp_path):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg)
    sd = hf_checkpoint(model, embedder, tower_prefix, embed_prefix)
    # other parts of a full checkpoint are ignored, including an audio embedder
    sd["model.language_model.embed_tokens.weight"] = torch.zeros(3, 4)
    sd["model.embed_audio.embedding_projection.weight"] = torch.zeros(cfg.text_hidden_size, 7)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    tower, proj = fresh(cfg)
    report = vhf.load_hf_state_dict((tower, proj), path)
    assert report == vhf.LoadReport([], [], [])
    torch.testing.assert_close(tower.vision_entry.pos_emb_param, model.patch_embedder.position_embedding_table.transpose(0, 1))
    torch.testing.assert_close(proj.projection.weight, embedder.embedding_projection.weight)
    # export -> load again gives identical weights, and HF keys / layouts
    exported = vhf.to_hf_state_dict((tower, proj))
    assert set(exported) == set(hf_checkpoint(model, embedder))
    for k, v in hf_checkpoint(model, embedder).items():
        assert torch.equal(exported[k], v), k
    tower2, proj2 = fresh(cfg)
    vhf.load_hf_state_dict((tower2, proj2), exported)
    assert_same_weights(tower, tower2)


@pytest.mark.parametrize("name", list(SMALL))
def test_standalone_vision_model_and_embedder(name):
    cfg = SMALL[name]
    model, embedder = make_hf(cfg)
    tower, proj = fresh(cfg)
    vhf.load_hf_state_dict(tower, model.state_dict())  # Gemma4VisionModel keys, no prefix
    vhf.load_hf_state_dict(proj, embedder.state_dict())  # Gemma4MultimodalEmbedder keys
    ref_tower, ref_proj = fresh(cfg)
    vhf.load_hf_state_dict((ref_tower, ref_proj), hf_checkpoint(model, embedder))
    assert_same_weights(tower, ref_tower)
    assert_same_weights(proj, ref_proj)
    # exported HF keys load strictly into a fresh HF model
    fresh_hf, _ = make_hf(cfg, seed=1)
    fresh_hf.load_state_dict(vhf.to_hf_state_dict(tower, vision_prefix=""), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_hf.state_dict()[k], v), k


@requires_ops
def test_round_trip_outputs_bfloat16_and_sharded_dir(tmp_path):
    """HF bf16 checkpoint written as two safetensors shards + index -> our bf16 modules -> same
    output as HF in bf16; keras_hub loads the same directory."""
    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    model.to(torch.bfloat16), embedder.to(torch.bfloat16)
    sd = {k: v.contiguous() for k, v in hf_checkpoint(model, embedder).items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        safetensors_torch.save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tower, proj = vhf.from_hf(model.config, tmp_path, dtype=torch.bfloat16, text_hidden_size=cfg.text_hidden_size)
    assert tower.layer_0.attention.query.input_min.dtype == torch.bfloat16
    pv, pp = image_batch(cfg, GRIDS)
    with torch.no_grad():
        ref_t = model(pv, pp).last_hidden_state
        out_t = tower.forward_flat(pv, pp)
        ref, out = embedder(ref_t).float(), proj(out_t).float()
    # the tower's output too: the projector's RMSNorm would hide a wrong global scale (sqrt(D)).
    # Same bf16 weights on both sides: measured 4.8e-3 (tower) and 5.2e-3; a 1 % scale error adds 1e-2.
    assert rel(out_t, ref_t) <= 8e-3
    assert rel(out, ref) <= 1e-2
    kh = keras_hub.Gemma4VisionEncoder(image_size=24, patch_size=4, num_heads=4, hidden_dim=64, num_layers=2,
                                       intermediate_dim=128, head_dim=16, output_dim=48, position_embedding_size=40,
                                       dtype="bfloat16")
    vhf.load_hf_state_dict(kh, tmp_path)
    assert_same_weights(kh.encoder, tower)


def test_errors_list_missing_unexpected_and_shapes():
    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    sd = hf_checkpoint(model, embedder)
    del sd["model.vision_tower.encoder.layers.1.mlp.down_proj.linear.weight"]
    del sd["model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max"]
    sd["model.vision_tower.encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    sd["model.vision_tower.patch_embedder.input_proj.weight"] = torch.zeros(64, 12)
    tower, proj = fresh(cfg)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with pytest.raises(vhf.CheckpointMismatchError) as e:
        vhf.load_hf_state_dict((tower, proj), sd)
    msg = str(e.value)
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg and "shape mismatches (1)" in msg
    for key in ("model.vision_tower.encoder.layers.1.mlp.down_proj.linear.weight",
                "model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max",
                "model.vision_tower.encoder.layers.0.self_attn.bogus.weight",
                "model.vision_tower.patch_embedder.input_proj.weight: checkpoint (64, 12) vs module (64, 48)"):
        assert key in msg, msg
    # nothing was copied on failure
    for k, v in tower.state_dict().items():
        assert torch.equal(v, before[k]), k
    # non-strict: loads what matches and reports the rest
    report = vhf.load_hf_state_dict((tower, proj), sd, strict=False)
    assert len(report.missing) == 2 and len(report.unexpected) == 1 and len(report.mismatched) == 1


def test_errors_config_mismatch():
    """A clipped (E2B-like) checkpoint into an unclipped config: the clip scalars are unexpected;
    the reverse reports them missing; a missing embedder is reported."""
    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    tower, _ = fresh(cfg.replace(use_clipped_linears=False))
    with pytest.raises(vhf.CheckpointMismatchError, match=r"unexpected keys \(56\)"):
        vhf.load_hf_state_dict(tower, model.state_dict())
    unclipped, _ = make_hf(cfg.replace(use_clipped_linears=False))
    tower, proj = fresh(cfg)
    with pytest.raises(vhf.CheckpointMismatchError) as e:
        vhf.load_hf_state_dict((tower, proj), unclipped.state_dict())
    assert "missing keys (57)" in str(e.value) and "embedding_projection.weight" in str(e.value)
    with pytest.raises(vhf.CheckpointMismatchError, match="std_bias"):
        vhf.load_hf_state_dict(Gemma4VisionEncoderLayer(cfg.replace(standardize=True)), model.state_dict())
    with pytest.raises(TypeError, match="cannot load"):
        vhf.load_hf_state_dict(torch.nn.Linear(2, 2), model.state_dict())
    with pytest.raises(FileNotFoundError):
        vhf.load_hf_state_dict(tower, "/nonexistent/model.safetensors")


@requires_ops
def test_from_hf_on_meta_loads_the_checkpoint(tmp_path):
    """device="meta" skips the random init; the checkpoint's tensors are then assigned (loaded for
    real), and a checkpoint that lacks some leaves a clear error, never meta tensors."""
    cfg = SMALL["26b-like-gqa"]
    model, embedder = make_hf(cfg)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf_checkpoint(model, embedder).items()}, str(path))
    for dtype in (None, torch.bfloat16):
        tower, proj = vhf.from_hf(model.config, path, device="meta", dtype=dtype, text_hidden_size=cfg.text_hidden_size)
        for t in [*tower.state_dict().values(), *proj.state_dict().values()]:
            assert not t.is_meta and t.device.type == "cpu" and t.dtype == (dtype or torch.float32)
        assert all(p.requires_grad for p in tower.parameters())
        ref_tower, ref_proj = vhf.from_hf(model.config, path, dtype=dtype, text_hidden_size=cfg.text_hidden_size)
        assert_same_weights(tower, ref_tower)
        assert_same_weights(proj, ref_proj)
    pv, pp = image_batch(cfg, GRIDS)
    with torch.no_grad():
        tower, proj = vhf.from_hf(model.config, path, device="meta", text_hidden_size=cfg.text_hidden_size)
        assert rel(proj(tower.forward_flat(pv, pp)), embedder(model(pv, pp).last_hidden_state)) <= 1e-4
    partial = {k: v for k, v in hf_checkpoint(model, embedder).items() if "layers.1." not in k}
    with pytest.raises(vhf.CheckpointMismatchError, match="missing keys"):
        vhf.from_hf(model.config, partial, device="meta", text_hidden_size=cfg.text_hidden_size)
    with pytest.raises(vhf.CheckpointMismatchError, match="meta device and the checkpoint does not provide"):
        vhf.from_hf(model.config, partial, device="meta", strict=False, text_hidden_size=cfg.text_hidden_size)
    # no checkpoint: meta modules on request (for to_empty / a later load)
    tower, _ = vhf.from_hf(model.config, None, device="meta", text_hidden_size=cfg.text_hidden_size)
    assert all(p.is_meta for p in tower.parameters())


def test_missing_keys_are_listed_in_full():
    cfg = SMALL["e2b-like"]
    model, embedder = make_hf(cfg)
    # the patch embedder's key (the usual prefix anchor) is the one missing: the prefix still shows
    sd = hf_checkpoint(model, None)
    del sd["model.vision_tower.patch_embedder.input_proj.weight"]
    tower, proj = fresh(cfg)
    with pytest.raises(vhf.CheckpointMismatchError) as e:
        vhf.load_hf_state_dict((tower, proj), sd)
    msg = str(e.value)
    assert "missing keys (2)" in msg and "model.vision_tower.patch_embedder.input_proj.weight" in msg
    # no embedder at all: its key under the conditional-generation prefix, and a note saying so
    assert "model.embed_vision.embedding_projection.weight" in msg and "no vision embedder key was found" in msg
    # a whole config's worth of missing keys: every one listed (layer indices grouped), none dropped
    unclipped, _ = make_hf(cfg.replace(use_clipped_linears=False))
    with pytest.raises(vhf.CheckpointMismatchError) as e:
        vhf.load_hf_state_dict((tower, proj), unclipped.state_dict())
    msg = str(e.value)
    assert "more" not in msg and "encoder.layers.{0-1}.mlp.down_proj.input_max" in msg
    for name in ("input_min", "input_max", "output_min", "output_max"):
        for proj_name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert f"{proj_name}.{name}" in msg

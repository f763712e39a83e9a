"""vitops.hf.patch / unpatch: HF's own Gemma 4, Gemma 3 and Llama 4 vision classes routed through
vitops ops, against the same models unpatched (tiny random conditional-generation models)."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import vitops  # noqa: E402
from vitops.hf import _patch  # noqa: E402

import _hf_tiny as tiny  # noqa: E402

FAMILIES = tiny.FAMILIES
# Every site each family's tiny model exercises (all flags on).
EXPECTED_SITES = {
    "gemma4": {"Gemma4VisionPatchEmbedder._position_embeddings", "Gemma4VisionAttention.forward",
               "Gemma4VisionPooler.forward"},
    "gemma3": {"SiglipVisionEmbeddings.forward", "Gemma3MultiModalProjector.forward"},
    "llama4": {"Llama4UnfoldConvolution.forward", "Llama4VisionAttention.forward",
               "Llama4VisionPixelShuffleMLP.forward"},
}


@pytest.fixture(autouse=True)
def _no_class_patch_leaks():
    yield
    vitops.hf.unpatch()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _features(model, inputs, dtype=None):
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return tiny.image_features(model, inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_unpatched_float32(family):
    model, inputs = tiny.build(family)
    ref = _features(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    children = [(n, type(m)) for n, m in model.named_modules()]
    report = vitops.hf.patch(model)
    assert {entry.split(" (")[0] for entry in report.patched} == EXPECTED_SITES[family]
    assert set(vitops.hf.is_patched(model)) == EXPECTED_SITES[family]
    # weights, names and children (nn.Linear included) untouched
    assert [(n, type(m)) for n, m in model.named_modules()] == children
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    out = _features(model, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) <= 1e-5
    # patching again is a no-op; unpatching restores HF's code bitwise
    again = vitops.hf.patch(model)
    assert again.patched == () and set(again.skipped) == EXPECTED_SITES[family]
    vitops.hf.unpatch(model)
    assert vitops.hf.is_patched(model) == []
    assert torch.equal(_features(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_bfloat16_no_worse_than_hf(family):
    model, inputs = tiny.build(family)
    exact = _features(tiny.cast(copy.deepcopy(model), torch.float64), inputs, torch.float64)
    model = tiny.cast(model, torch.bfloat16)
    hf_err = _rel(_features(model, inputs, torch.bfloat16), exact)
    vitops.hf.patch(model)
    ours_err = _rel(_features(model, inputs, torch.bfloat16), exact)
    # the ops round once where HF rounds after every step; allow HF's own error plus a margin
    assert ours_err <= 1.25 * hf_err + 2e-3, (ours_err, hf_err)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_backward(family):
    """Fine-tuning through a patched model: every parameter's gradient equals the unpatched one's."""
    model, inputs = tiny.build(family)
    weights = None

    def grads(m):
        nonlocal weights
        m.zero_grad(set_to_none=True)
        feats = tiny.image_features(m, inputs)
        if weights is None:
            weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1))
        (feats * weights).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(model)
    vitops.hf.patch(model)
    out = grads(model)
    assert set(out) == set(ref) and len(ref) > 0
    vision = {n for n in ref if "vision" in n or "projector" in n or "embed_vision" in n}
    assert vision, "the vision parameters must receive gradients"
    # relative to each gradient, with a floor at the model's gradient scale: some gradients are
    # rounding noise around an exact zero (a key bias does not change a softmax)
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        err = (out[name] - ref[name]).abs().max().item()
        assert err <= 1e-4 * max(ref[name].abs().max().item(), 1e-3 * scale), (name, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_same_tokens(family):
    model, inputs = tiny.build(family, seed=3)
    want = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    vitops.hf.patch(model)
    got = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_class_patch_covers_models_built_later(family, caplog):
    model, inputs = tiny.build(family)
    ref = _features(model, inputs)
    with caplog.at_level(logging.INFO, logger="vitops.hf"):
        report = vitops.hf.patch()
    assert report.target == "classes"
    assert any("vitops.hf.patch classes" in r.getMessage() for r in caplog.records)
    assert EXPECTED_SITES[family] <= set(vitops.hf.is_patched())
    # the model built before and one built after both run patched code
    later, _ = tiny.build(family)
    for m in (model, later):
        assert set(vitops.hf.is_patched(m)) == EXPECTED_SITES[family]
        assert _rel(_features(m, inputs), ref) <= 1e-5
    assert vitops.hf.patch().patched == ()  # idempotent
    # an instance patch on top of the class patch is a no-op
    assert vitops.hf.patch(later).patched == ()
    vitops.hf.unpatch()
    assert vitops.hf.is_patched() == [] and vitops.hf.is_patched(model) == []
    assert torch.equal(_features(model, inputs), ref)


def test_flags_select_sites():
    model, inputs = tiny.build("gemma4")
    report = vitops.hf.patch(model, posemb=False, pooler=False)
    assert [entry.split(" (")[0] for entry in report.patched] == ["Gemma4VisionAttention.forward"]
    with pytest.raises(TypeError, match="unknown option.*'ropes'.*posemb"):
        vitops.hf.patch(model, ropes=True)
    with pytest.raises(ValueError, match="`families` must name some of"):
        vitops.hf.patch(families=("gemma5",))
    vitops.hf.patch(families=("llama4",))
    assert all(name.startswith("Llama4") for name in vitops.hf.is_patched())


def test_unknown_models_get_a_clear_error():
    with pytest.raises(TypeError, match=r"Linear \(model_type=None\) holds no vision tower"):
        vitops.hf.patch(torch.nn.Linear(2, 2))
    import transformers as t

    text_only = t.Gemma3ForCausalLM(t.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, head_dim=8))
    with pytest.raises(TypeError, match=r"Gemma3ForCausalLM \(model_type='gemma3_text'\) holds no vision tower"):
        vitops.hf.patch(text_only)
    with pytest.raises(TypeError, match="must be a transformers model"):
        vitops.hf.patch("gemma4")


def test_changed_transformers_code_is_refused(monkeypatch):
    """A release whose code differs from what the replacements reproduce: a clear error naming the
    functions, and nothing patched (not even the sites whose code still matches)."""
    from transformers.models.gemma4 import modeling_gemma4 as hf

    model, _ = tiny.build("gemma4")

    def apply_multidimensional_rope(x, cos, sin, position_ids, unsqueeze_dim=2):
        return x  # a "newer release" with other math

    monkeypatch.setattr(hf, "apply_multidimensional_rope", apply_multidimensional_rope)
    with pytest.raises(vitops.hf.UnsupportedTransformersError,
                       match=r"differs from the releases vitops supports \(5\.17\.0, 5\.18\.0\) in "
                             r"apply_multidimensional_rope \(fingerprint"):
        vitops.hf.patch(model)
    assert vitops.hf.is_patched(model) == []
    with pytest.raises(vitops.hf.UnsupportedTransformersError, match="apply_multidimensional_rope"):
        vitops.hf.patch()
    assert vitops.hf.is_patched() == []
    monkeypatch.undo()

    original = hf.Gemma4VisionPooler.forward

    def forward(self, hidden_states, pixel_position_ids, padding_positions, output_length=None):
        return original(self, hidden_states, pixel_position_ids, padding_positions, output_length)

    monkeypatch.setattr(hf.Gemma4VisionPooler, "forward", forward)
    with pytest.raises(vitops.hf.UnsupportedTransformersError, match=r"Gemma4VisionPooler\.forward"):
        vitops.hf.patch(model)
    # the other pieces can still be patched on their own
    assert vitops.hf.patch(model, pooler=False).patched


def test_fingerprints_ignore_docs_not_code(tmp_path):
    sources = {
        "documented": 'def f(x):\n    """doc"""\n    # a comment\n\n    return x + 1\n',
        "plain": "def f(x):\n    return x + 1\n",
        "changed": "def f(x):\n    return x + 2\n",
    }
    prints = {}
    for name, src in sources.items():
        path = tmp_path / f"{name}.py"
        path.write_text(src)
        namespace = {}
        exec(compile(src, str(path), "exec"), namespace)
        prints[name] = _patch.fingerprint(namespace["f"])
    assert prints["documented"] == prints["plain"] != prints["changed"]


def test_gemma4_pooler_mask_and_padding_only_images():
    """HF's pooler quirk kept: padding coordinates clamp to (0, 0), so slot 0 counts as filled for an
    image with padding, even one that is all padding (the batch padding of a serving engine)."""
    model, inputs = tiny.build("gemma4")
    pooler = tiny.vision_module(model).pooler
    x = torch.randn(3, 64, 32)
    pos = inputs["image_position_ids"]
    pos = torch.cat([pos, torch.full((1, 64, 2), -1)])
    pad = (pos == -1).all(-1)
    want = pooler(x, pos, pad, 16)
    vitops.hf.patch(model)
    got = pooler(x, pos, pad, 16)
    assert torch.equal(got[1], want[1])
    assert _rel(got[0], want[0]) <= 1e-6 and got[0].dtype == torch.float32
    # as many slots as patches, or more: HF's own code (and its error)
    patched_full = pooler(x, pos, pad, 64)
    vitops.hf.unpatch(model)
    hf_full = pooler(x, pos, pad, 64)
    assert all(torch.equal(a, b) for a, b in zip(patched_full, hf_full))
    vitops.hf.patch(model)
    with pytest.raises(ValueError, match="Cannot output more soft tokens"):
        pooler(x, pos, pad, 65)


def _vision_path(model, family):
    """The vision path as a function of the image tensors: Gemma 4's tower + embedder as vLLM calls
    them (HF's get_image_features splits per image with a host list, specialising on the batch)."""
    if family == "gemma4":
        inner = model.model
        return lambda pixel_values, image_position_ids: inner.embed_vision(
            inputs_embeds=inner.vision_tower(pixel_values, image_position_ids).last_hidden_state)
    return lambda pixel_values: tiny.image_features(model, {"pixel_values": pixel_values})


def _shapes(family, inputs):
    """Image batches of several sizes (and for Gemma 4 several numbers of patches)."""
    images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_position_ids")}
    out = [{k: v.repeat(3, *[1] * (v.dim() - 1))[:batch] for k, v in images.items()} for batch in (3, 4, 2, 5)]
    if family == "gemma4":
        for side, batch in ((6, 3), (4, 2), (10, 4)):
            pos = tiny._grid_positions(side, batch)
            pos[1:, side * side * 2 // 3:] = -1  # padded images beside a full one
            out.append({"pixel_values": torch.rand(batch, side * side, 48), "image_position_ids": pos})
    return out


def _compiles(fn, shapes):
    torch._dynamo.reset()
    count = {"n": 0}

    def backend(gm, example_inputs):
        count["n"] += 1
        return gm.forward

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for images in shapes:
            assert _rel(compiled(**images), fn(**images)) <= 1e-6
    return count["n"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_tower_compiles_without_graph_breaks(family):
    """The patched vision path under torch.compile(fullgraph=True, dynamic=True): no graph break, and
    batch size and number of patches dynamic, with no more compiles than HF's unpatched code (one
    retrace when a size first changes, then none)."""
    model, inputs = tiny.build(family)
    shapes = _shapes(family, inputs)
    unpatched = _compiles(_vision_path(model, family), shapes)
    vitops.hf.patch(model)
    patched = _compiles(_vision_path(model, family), shapes)
    assert patched <= min(unpatched, 2), (patched, unpatched, len(shapes))


def test_vllm_entry_point_applies_the_class_patch(caplog):
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vitops"]
    register = ep.load()
    with caplog.at_level(logging.INFO, logger="vitops.hf"):
        register()
        register()  # every vLLM process calls it; twice is harmless
    assert set().union(*EXPECTED_SITES.values()) <= set(vitops.hf.is_patched())
    assert any("vitops vLLM plugin" in r.getMessage() for r in caplog.records)


def test_vllm_entry_point_without_transformers():
    code = ("import sys, logging; sys.modules['transformers'] = None; logging.basicConfig(level=logging.INFO); "
            "from vitops.hf.vllm_plugin import register; register(); print('returned')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "returned" in out.stdout and "transformers is not installed" in out.stderr


def _second_release() -> Path | None:
    path = os.environ.get("VITOPS_TRANSFORMERS_517")
    venv = Path(sys.executable).parent.parent
    for candidate in ([Path(path)] if path else []) + [venv / "transformers-5.17.0"]:  # tools/setup.sh
        if (candidate / "transformers").is_dir():
            return candidate
    return None


def test_supported_release_5_17():
    """The same checks under transformers 5.17.0 (tools/setup.sh unpacks it beside the venv)."""
    where = _second_release()
    if where is None:
        if os.environ.get("CI") == "true":
            pytest.fail("transformers 5.17.0 is not unpacked beside the venv (tools/setup.sh does it)")
        pytest.skip("transformers 5.17.0 not unpacked (tools/setup.sh puts it in <venv>/transformers-5.17.0)")
    env = dict(os.environ, PYTHONPATH=str(where))
    worker = Path(__file__).with_name("hf_patch_worker.py")
    out = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "5.17.0"
    for family, r in result["families"].items():
        assert {entry.split(" (")[0] for entry in r["patched"]} == EXPECTED_SITES[family]
        assert r["rel_err"] <= 1e-5 and r["same_tokens"], (family, r)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_patched_equals_unpatched(family, dtype):
    model, inputs = tiny.build(family)
    model = tiny.cast(model, dtype).cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    ref = _features(model, inputs, dtype)
    vitops.hf.patch(model)
    out = _features(model, inputs, dtype)
    assert out.dtype == ref.dtype
    assert _rel(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.cuda
def test_cuda_gemma4_patched_methods_never_sync_and_capture_in_a_cuda_graph():
    """The patched Gemma 4 methods (what vLLM's encoder CUDA graph captures) with sync debugging set
    to error, then captured and replayed in a CUDA graph."""
    model, inputs = tiny.build("gemma4")
    model = model.cuda()
    vitops.hf.patch(model)
    tower = tiny.vision_module(model)
    pixels, pos = inputs["pixel_values"].cuda(), inputs["image_position_ids"].cuda()
    pad = (pos == -1).all(-1)
    attn = tower.encoder.layers[0].self_attn
    x = torch.randn(pixels.shape[0], pixels.shape[1], tower.config.hidden_size, device="cuda")
    cos_sin = tower.encoder.rotary_emb(x, pos)

    def step():
        emb = tower.patch_embedder(pixels, pos, pad)
        out, _ = attn(emb, position_embeddings=cos_sin, attention_mask=None, position_ids=pos)
        return tower.pooler(out, pos, pad, pixels.shape[1] // 4)

    with torch.no_grad():
        eager = step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on a side stream, as torch.cuda.graph requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured[1], eager[1])
    assert _rel(captured[0], eager[0]) <= 1e-6

"""torch.export of each vitops tower with the vitops ops in the graph, and an AOTInductor package of
it that loads and runs in a fresh process importing only vitops (and torch), equal to eager."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vitops.models import gemma3, gemma4_vision, llama4

# Run in a fresh interpreter: load the package and the inputs, print the max relative error.
_LOADER = """
import sys, torch, vitops
cases = torch.load(sys.argv[2])
runner = torch._inductor.aoti_load_package(sys.argv[1])
err = 0.0
for inputs, want in cases:
    got = runner(*inputs)
    got = got if isinstance(got, (tuple, list)) else [got]
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want], (
        [tuple(g.shape) for g in got], [tuple(w.shape) for w in want])
    err = max([err] + [((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
                       if g.is_floating_point() else float(not torch.equal(g, w)) for g, w in zip(got, want)])
print(f"max_rel_err {err}")
"""


class _Gemma4(torch.nn.Module):
    """The Gemma 4 tower on HF's padded patches + (x, y) positions ((-1, -1) = padding)."""

    def __init__(self):
        super().__init__()
        cfg = gemma4_vision.Gemma4VisionConfig(
            hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
            patch_size=4, pooling_kernel_size=2, position_embedding_size=32, standardize=True)
        self.tower = gemma4_vision.Gemma4VisionEncoderLayer(cfg).eval()
        self.config = cfg

    def forward(self, patches, positions):
        return self.tower(patches, image_position_ids=positions)

    def example(self, batch, side):
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        pos = torch.stack([xs.flatten(), ys.flatten()], -1)[None].repeat(batch, 1, 1)
        pos[1:, side * side // 2:] = -1  # padded images after a full one
        return torch.rand(batch, side * side, 3 * self.config.patch_size ** 2), pos


class _Gemma3(torch.nn.Module):
    """The Gemma 3 SigLIP tower + projector on NHWC images [B, N, S, S, 3]."""

    def __init__(self):
        super().__init__()
        cfg = gemma3.Gemma3VisionConfig(hidden_size=32, intermediate_size=40, num_layers=2, num_heads=2,
                                        image_size=28, patch_size=7, mm_tokens_per_image=4, text_hidden_size=16)
        self.tower, self.embedder = gemma3.Gemma3VisionEncoderLayer(cfg).eval(), gemma3.VisionEmbedder(cfg).eval()
        self.config = cfg

    def forward(self, images):
        return gemma3.encode_images(self.tower, self.embedder, images)

    def example(self, batch, crops):
        return (torch.rand(batch, crops, 28, 28, 3),)


class _Llama4(torch.nn.Module):
    """The Llama 4 vision model on NCHW tiles."""

    def __init__(self):
        super().__init__()
        cfg = llama4.Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_layers=2, num_heads=2,
                                        image_size=28, patch_size=7, vision_output_dim=32,
                                        projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
        self.model = llama4.Llama4VisionModel(cfg).eval()
        self.config = cfg

    def forward(self, tiles):
        return self.model(tiles)

    def example(self, tiles, _):
        return (torch.rand(tiles, 3, 28, 28),)


TOWERS = {"gemma4": (_Gemma4, (3, 8), (4, 6)), "gemma3": (_Gemma3, (2, 3), (3, 2)),
          "llama4": (_Llama4, (2, 0), (5, 0))}


def _vitops_ops(graph_module) -> set[str]:
    return {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function" and "vitops" in str(n.target)}


def _dynamic_dims(family, args):
    """Every size dynamic but the channel / (x, y) axes (Gemma 3: batch and crops)."""
    return tuple({i: torch.export.Dim.AUTO for i in range(a.dim() - (1 if a.dtype == torch.int64 else 0))}
                 if family != "gemma3" else {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for a in args)


@pytest.mark.parametrize("family", list(TOWERS))
def test_export_keeps_vitops_ops_and_dynamic_sizes(family):
    cls, first, second = TOWERS[family]
    torch.manual_seed(0)
    module = cls()
    args = module.example(*first)
    dims = _dynamic_dims(family, args)
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dims)
    ops = _vitops_ops(ep.graph_module)
    assert ops, "the exported graph must call the vitops ops"
    other = module.example(*second)
    with torch.no_grad():
        got, want = ep.module()(*other), module(*other)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.equal(g, w) if not g.is_floating_point() else torch.allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(TOWERS))
def test_aoti_package_runs_in_a_fresh_process(family, tmp_path):
    """One package with dynamic sizes, run on the example's sizes and on others."""
    cls, first, second = TOWERS[family]
    torch.manual_seed(0)
    module = cls()
    args = module.example(*first)
    cases = []
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=_dynamic_dims(family, args))
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"{family}.pt2"))
        for inputs in (args, module.example(*second)):
            want = module(*inputs)
            cases.append((inputs, list(want) if isinstance(want, tuple) else [want]))
    torch.save(cases, tmp_path / "io.pt")
    out = subprocess.run([sys.executable, "-c", _LOADER, package, str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(out.stdout.split("max_rel_err")[-1])
    assert err <= 1e-5, out.stdout

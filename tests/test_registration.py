"""The library surface: schemas, kernels per backend, fake kernels, autograd, build info, loader errors."""

import importlib

import pytest
import torch

import vitops
from vitops import _build_info, _loader
from vitops.ops._manifest import MANIFEST

GOLDEN_SCHEMAS = {
    "patchify": "vitops::patchify(Tensor images, SymInt patch_size, bool channels_first=False) -> (Tensor patches, Tensor positions_xy)",
    "_patchify_backward": "vitops::_patchify_backward(Tensor grad_patches, SymInt height, SymInt width, SymInt patch_size, bool channels_first=False) -> Tensor",
    "pixel_shuffle": "vitops::pixel_shuffle(Tensor input_tensor, float shuffle_ratio) -> Tensor",
    "_pixel_shuffle_backward": "vitops::_pixel_shuffle_backward(Tensor grad_output, float shuffle_ratio) -> Tensor",
    "factorized_posemb": "vitops::factorized_posemb(Tensor posemb, Tensor positions_xy, int table_dim) -> Tensor",
    "_factorized_posemb_backward": "vitops::_factorized_posemb_backward(Tensor grad_output, Tensor positions_xy, SymInt num_positions, int table_dim) -> Tensor",
    "apply_multidimensional_rope": "vitops::apply_multidimensional_rope(Tensor inputs, Tensor positions, float base_frequency, float? rotary_fraction=None, float scale_factor=1.) -> Tensor",
    "_apply_multidimensional_rope_backward": "vitops::_apply_multidimensional_rope_backward(Tensor grad_output, Tensor positions, float base_frequency, float? rotary_fraction, float scale_factor) -> Tensor",
    "avg_pool_by_positions": "vitops::avg_pool_by_positions(Tensor x, Tensor positions_xy, SymInt length) -> (Tensor output, Tensor mask)",
    "_avg_pool_by_positions_backward": "vitops::_avg_pool_by_positions_backward(Tensor grad_output, Tensor positions_xy, SymInt length, SymInt seq_len) -> Tensor",
    "avg_pool_rms_norm": "vitops::avg_pool_rms_norm(Tensor x, SymInt length, Tensor? weight, float eps, str norm=\"scale_plus_one\") -> Tensor",
    "_avg_pool_rms_norm_backward": "vitops::_avg_pool_rms_norm_backward(Tensor grad_output, Tensor x, SymInt length, Tensor? weight, float eps, str norm=\"scale_plus_one\") -> (Tensor grad_x, Tensor grad_weight)",
    "moe_route": "vitops::moe_route(Tensor x, Tensor router_logits) -> (Tensor routed, Tensor scores, Tensor token_order, Tensor token_slot, Tensor expert_ends)",
    "_moe_route_backward": "vitops::_moe_route_backward(Tensor grad_routed, Tensor? grad_scores, Tensor x, Tensor router_logits, Tensor token_slot) -> (Tensor grad_x, Tensor grad_router_logits)",
    "moe_combine": "vitops::moe_combine(Tensor shared, Tensor expert_out, Tensor token_slot, Tensor token_order) -> Tensor",
    "_moe_combine_backward": "vitops::_moe_combine_backward(Tensor grad_output, Tensor token_order) -> Tensor",
    "merge_soft_tokens": "vitops::merge_soft_tokens(Tensor inputs_embeds, Tensor soft_tokens, Tensor indices) -> Tensor",
    "_merge_soft_tokens_backward": "vitops::_merge_soft_tokens_backward(Tensor grad_output, Tensor indices) -> (Tensor grad_inputs_embeds, Tensor grad_soft_tokens)",
    "qkv_norm_rope": "vitops::qkv_norm_rope(Tensor q, Tensor k, Tensor? v, Tensor? q_weight, Tensor? k_weight, Tensor positions, float eps, float base_frequency, ScalarType? rope_dtype=None, str norm=\"scale\", bool v_norm=True, str pairing=\"half_split\", Tensor? rope_freqs=None, Tensor? rope_cos=None, Tensor? rope_sin=None, bool norm_after_rope=False, Tensor? q_scale=None) -> (Tensor q_out, Tensor k_out, Tensor v_out)",
    "_qkv_norm_rope_backward": "vitops::_qkv_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor? grad_v, Tensor q, Tensor k, Tensor? v, Tensor? q_weight, Tensor? k_weight, Tensor positions, float eps, float base_frequency, ScalarType? rope_dtype=None, str norm=\"scale\", bool v_norm=True, str pairing=\"half_split\", Tensor? rope_freqs=None, Tensor? rope_cos=None, Tensor? rope_sin=None, bool norm_after_rope=False, Tensor? q_scale=None) -> (Tensor grad_q_in, Tensor grad_k_in, Tensor grad_v_in, Tensor grad_q_weight, Tensor grad_k_weight)",
    "avg_pool_scale_standardize": "vitops::avg_pool_scale_standardize(Tensor x, Tensor positions_xy, SymInt length, float scale, Tensor? std_bias=None, Tensor? std_scale=None) -> (Tensor output, Tensor mask)",
    "posemb_sincos_2d": "vitops::posemb_sincos_2d(Tensor like, SymInt h, SymInt w, SymInt width, float temperature=10000., ScalarType? dtype=None) -> Tensor",
    "_avg_pool_scale_standardize_backward": "vitops::_avg_pool_scale_standardize_backward(Tensor grad_output, Tensor positions_xy, SymInt length, SymInt seq_len, float scale, Tensor? std_scale) -> Tensor",
}

FORWARD_OPS = [e.name for e in MANIFEST]  # the op manifest


def test_manifest_lists_every_op_and_its_backward():
    assert set(GOLDEN_SCHEMAS) == {n for e in MANIFEST for n in (e.name, e.backward) if n is not None}
    assert vitops.OPS == tuple(FORWARD_OPS)
    for e in MANIFEST:
        schema = getattr(torch.ops.vitops, e.name).default._schema
        assert tuple(a.name for a in schema.arguments) == e.args, e.name


@pytest.mark.parametrize("name", sorted(GOLDEN_SCHEMAS))
def test_schema_is_golden(name):
    assert str(getattr(torch.ops.vitops, name).default._schema) == GOLDEN_SCHEMAS[name]


def test_no_unexpected_ops():
    registered = {
        s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("vitops::")
    }
    assert registered == set(GOLDEN_SCHEMAS)


@pytest.mark.parametrize("name", sorted(GOLDEN_SCHEMAS))
def test_cpu_kernel_and_fake_kernel(name):
    assert _loader.has_kernel(name, "CPU")
    entry = torch._library.simple_registry.singleton.find(f"vitops::{name}")
    assert entry.fake_impl.kernel is not None, f"{name} has no fake kernel"


@pytest.mark.parametrize("name", sorted(GOLDEN_SCHEMAS))
def test_cuda_kernel_registered_when_built(name):
    if not (_build_info.with_cuda and _loader.HAS_CUDA_KERNELS):
        pytest.skip("vitops was built without CUDA kernels, or torch is CPU-only")
    assert _loader.has_kernel(name, "CUDA")


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_autograd_registered(name):
    assert _loader.has_kernel(name, "Autograd") or _loader.has_kernel(name, "AutogradCPU")


def test_build_info():
    info = vitops.build_info()
    assert info["version"] == vitops.__version__
    assert info["stable_abi_target"] == "2.10"
    assert info["built_with_torch"] == _build_info.torch_version
    assert info["torch_runtime"] == torch.__version__
    for op in FORWARD_OPS:
        assert "CPU" in info["backends"][op]
        assert ("CUDA" in info["backends"][op]) == (_build_info.with_cuda and _loader.HAS_CUDA_KERNELS)


def test_loader_names_the_torch_it_was_built_for(monkeypatch):
    """A torch older than the stable-ABI target gets an error that says what to do."""
    monkeypatch.setattr(_build_info, "torch_target_version", "99.0")
    with pytest.raises(ImportError, match=r"(?s)built for torch .* needs torch >= 99\.0.*Rebuild vitops"):
        _loader.load()
    monkeypatch.undo()
    _loader.load()  # loading again is harmless
    assert _loader.HAS_C_OPS


def test_main_job_selfcheck(capsys):
    from vitops import _selfcheck

    assert _selfcheck.run()
    out = capsys.readouterr().out
    assert "all ops match their references" in out

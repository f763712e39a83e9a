// Every vitops operator schema, in one place. Kernels register their implementations with
// STABLE_TORCH_LIBRARY_IMPL(vitops, CPU|CUDA, m) next to their code in csrc/ops/<op>/.
// Fake (meta) kernels and autograd live in python/vitops/ops/<op>.py.
//
// Conventions: functional ops only (fresh outputs, no aliasing); sizes that may be symbolic under
// torch.compile(dynamic=True) are SymInt; backward ops are named _<op>_backward.
#include "vitops/common.h"

// The CUDA emulator library (test tool) compiles this file again with
// -DVITOPS_OPS_NAMESPACE=vitops_emu, so its namespace gets exactly these schemas.
#ifndef VITOPS_OPS_NAMESPACE
#define VITOPS_OPS_NAMESPACE vitops
#endif
// One more expansion step, so STABLE_TORCH_LIBRARY pastes the namespace's value, not its macro name.
#define VITOPS_STABLE_TORCH_LIBRARY(ns, m) STABLE_TORCH_LIBRARY(ns, m)

VITOPS_STABLE_TORCH_LIBRARY(VITOPS_OPS_NAMESPACE, m) {
  // images[..., H, W, C] -> patches[..., N, p*p*C] in (row, col, channel) order and
  // positions_xy[..., N, 2] int64 (x = column, y = row, patch units, row-major patch order);
  // channels_first: images[..., C, H, W], patches in (channel, row, col) order (Llama 4's unfold).
  m.def("patchify(Tensor images, SymInt patch_size, bool channels_first=False) -> (Tensor patches, Tensor positions_xy)");
  m.def("_patchify_backward(Tensor grad_patches, SymInt height, SymInt width, SymInt patch_size, bool channels_first=False) -> Tensor");

  // input_tensor[..., L, C] (a square token grid) -> [..., L r², C / r²] for shuffle_ratio r = 1/n:
  // n x n token blocks in (dh, dw, c) channel order (HF / MaxText / Meta Llama 4 pixel_shuffle).
  m.def("pixel_shuffle(Tensor input_tensor, float shuffle_ratio) -> Tensor");
  m.def("_pixel_shuffle_backward(Tensor grad_output, float shuffle_ratio) -> Tensor");

  // posemb: [2, N_pos, D] (table_dim=0, HF) or [N_pos, 2, D] (table_dim=1, MaxText), any strides.
  // out[..., D] = posemb[x] (x table) + posemb[y] (y table); a coordinate of -1 contributes zero.
  m.def("factorized_posemb(Tensor posemb, Tensor positions_xy, int table_dim) -> Tensor");
  m.def("_factorized_posemb_backward(Tensor grad_output, Tensor positions_xy, SymInt num_positions, int table_dim) -> Tensor");

  // inputs[..., L, H, hd] rotated by positions [..., L] (1-D) or [..., L, ndim] (N-D).
  m.def("apply_multidimensional_rope(Tensor inputs, Tensor positions, float base_frequency, float? rotary_fraction=None, float scale_factor=1.0) -> Tensor");
  m.def("_apply_multidimensional_rope_backward(Tensor grad_output, Tensor positions, float base_frequency, float? rotary_fraction, float scale_factor) -> Tensor");

  // x[B, L, D], positions_xy[B, L, 2] -> (output[B, length, D], mask[B, length] bool).
  m.def("avg_pool_by_positions(Tensor x, Tensor positions_xy, SymInt length) -> (Tensor output, Tensor mask)");
  m.def("_avg_pool_by_positions_backward(Tensor grad_output, Tensor positions_xy, SymInt length, SymInt seq_len) -> Tensor");

  // Fused attention entry: q[B, L, H, hd], k/v[B, L, KV, hd] (any strides, contiguous head dim, e.g.
  // views of one fused QKV projection) -> per-head RMSNorm (q/k with weights [hd], v without), then
  // N-D RoPE of q and k by positions[B, L, ndim]; outputs contiguous [B, L, H, hd] / [B, L, KV, hd]
  // (the Python wrapper returns their [B, H, L, hd] transposes, the layout SDPA takes). cos/sin are
  // rounded to rope_dtype (None: q's dtype), the dtype HF's rotary embedding casts them to.
  // norm: "scale" (x * w, Gemma 4), "scale_plus_one" (x * (1 + w), Gemma 3), "rms" (no weight,
  // q_weight/k_weight None), "none"; v_norm: v's weightless RMS norm (Gemma 4) or v copied; pairing:
  // "half_split" (rotate_half) or "interleaved" (complex pairs); rope_freqs: one inverse frequency
  // per rotated pair (None: HF's 1 / base^(2i / chunk width)). The backward takes the gradients of
  // the outputs as they are ([B, L, N, hd]) and returns [0]-sized weight gradients without weights.
  m.def("avg_pool_rms_norm(Tensor x, SymInt length, Tensor? weight, float eps, str norm=\"scale_plus_one\") -> Tensor");
  m.def("_avg_pool_rms_norm_backward(Tensor grad_output, Tensor x, SymInt length, Tensor? weight, float eps, str norm=\"scale_plus_one\") -> (Tensor grad_x, Tensor grad_weight)");
  m.def("qkv_norm_rope(Tensor q, Tensor k, Tensor? v, Tensor? q_weight, Tensor? k_weight, Tensor positions, float eps, float base_frequency, ScalarType? rope_dtype=None, str norm=\"scale\", bool v_norm=True, str pairing=\"half_split\", Tensor? rope_freqs=None, Tensor? rope_cos=None, Tensor? rope_sin=None, bool norm_after_rope=False, Tensor? q_scale=None) -> (Tensor q_out, Tensor k_out, Tensor v_out)");
  m.def("_qkv_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor? grad_v, Tensor q, Tensor k, Tensor? v, Tensor? q_weight, Tensor? k_weight, Tensor positions, float eps, float base_frequency, ScalarType? rope_dtype=None, str norm=\"scale\", bool v_norm=True, str pairing=\"half_split\", Tensor? rope_freqs=None, Tensor? rope_cos=None, Tensor? rope_sin=None, bool norm_after_rope=False, Tensor? q_scale=None) -> (Tensor grad_q_in, Tensor grad_k_in, Tensor grad_v_in, Tensor grad_q_weight, Tensor grad_k_weight)");

  // MaxText's sincos2d position table [1, h * w, width] (ops/posemb_sincos_2d), float32 math rounded
  // to dtype (None: like's). A factory: `like` only names the device (its shape and values are not
  // read), because the dispatcher picks the CPU or CUDA kernel from a tensor argument. No backward:
  // the table is a constant.
  m.def("posemb_sincos_2d(Tensor like, SymInt h, SymInt w, SymInt width, float temperature=10000.0, ScalarType? dtype=None) -> Tensor");

  // Fused exit: avg_pool_by_positions, pooled rounded to x's dtype, * scale (sqrt(D)) in float32,
  // optional standardize (y - std_bias) * std_scale in float32 -> (output[B, length, D], mask[B, length]).
  m.def("avg_pool_scale_standardize(Tensor x, Tensor positions_xy, SymInt length, float scale, Tensor? std_bias=None, Tensor? std_scale=None) -> (Tensor output, Tensor mask)");
  m.def("_avg_pool_scale_standardize_backward(Tensor grad_output, Tensor positions_xy, SymInt length, SymInt seq_len, float scale, Tensor? std_scale) -> Tensor");

  // Llama 4's top-1 MoE routing (ops/moe_route): x[N, H], router_logits[N, E] -> rows of x scaled
  // by their score, bucketed by expert (stable: experts ascending, tokens in order), the scores [N]
  // (float32 sigmoid of the top logit, rounded to x's dtype), token_order [N] (token of each bucketed
  // row), token_slot [N] (row of each token) and expert_ends [E] int32 (grouped_mm's offs). Ties:
  // the first maximal logit (torch.argmax). The backward reaches x and the selected logits only.
  m.def("moe_route(Tensor x, Tensor router_logits) -> (Tensor routed, Tensor scores, Tensor token_order, Tensor token_slot, Tensor expert_ends)");
  m.def("_moe_route_backward(Tensor grad_routed, Tensor? grad_scores, Tensor x, Tensor router_logits, Tensor token_slot) -> (Tensor grad_x, Tensor grad_router_logits)");
  // The inverse scatter: out[t] = shared[t] + expert_out[token_slot[t]] (one rounding); the
  // backward gathers grad_output by token_order (the gradient of `shared` is grad_output itself).
  m.def("moe_combine(Tensor shared, Tensor expert_out, Tensor token_slot, Tensor token_order) -> Tensor");
  m.def("_moe_combine_backward(Tensor grad_output, Tensor token_order) -> Tensor");

  // The multimodal merge (ops/merge_soft_tokens): a copy of inputs_embeds[T, H] or [B, S, H] with
  // row indices[j] (of the flattened B * S rows, batch-major: HF's masked_scatter order) replaced by
  // soft_tokens[j] [N, H] (inputs_embeds' dtype); negative indices are skipped (MAX's INT32_MIN marks
  // rows outside this chunk). CPU: an index >= rows or a row written twice raises; CUDA (no host
  // sync): both are resolved, indices >= rows skipped and the largest j winning a row. The backward
  // returns grad_output with the written rows zeroed and the written rows' gradients per soft token.
  m.def("merge_soft_tokens(Tensor inputs_embeds, Tensor soft_tokens, Tensor indices) -> Tensor");
  m.def("_merge_soft_tokens_backward(Tensor grad_output, Tensor indices) -> (Tensor grad_inputs_embeds, Tensor grad_soft_tokens)");
}

// moe_route / moe_combine: Llama 4's top-1 MoE routing, checks and the per-token math shared by the
// CPU and CUDA kernels.
//
// moe_route(x [N, H], router_logits [N, E]) picks each token's expert (the first maximal logit; a
// NaN logit counts as the maximum, as torch.argmax), scores it with the float32 sigmoid of that logit
// rounded to x's dtype (HF's router_scores), scales the token's row by its score (HF scales the
// expert *input*) and buckets the scaled rows by expert with a stable counting sort: experts
// ascending, tokens in order within an expert. Outputs: the bucketed rows [N, H], the scores [N],
// token_order [N] (the token in each bucketed row), token_slot [N] (each token's bucketed row; the
// inverse permutation) and expert_ends [E] int32 (cumulative bucket ends, grouped_mm's `offs`).
// No float atomics and no host synchronisation: the CUDA counting sort runs over fixed token
// chunks, so the order is the same on every run and device.
//
// moe_combine(shared [N, H], expert_out [N, H], token_slot, token_order) scatters the experts'
// outputs back: out[t] = shared[t] + expert_out[token_slot[t]], rounded once (HF adds the routed sum
// to the shared expert's output in the activation dtype; each token has one expert, so HF's sum over
// experts is exact). Its backward gathers by token_order.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::moe {

// Tokens per counting-sort chunk (CUDA): fixed, so the bucketing does not depend on the launch.
constexpr int64_t kTokensPerChunk = 256;
// expert_ends is int32 (grouped_mm's offs), so the token count must fit int32.
constexpr int64_t kMaxTokens = 2147483647;

struct RouteGeometry {
  int64_t tokens = 0, hidden = 0, experts = 0;
  ValueKind logit_kind = ValueKind::Float32;
};

// Whether logit a (index ia) ranks above b (index ib): NaN first, then larger, then the lower index
// (torch.argmax's first maximum).
template <typename acc>
VITOPS_HOST_DEVICE bool ranks_above(acc a, int64_t ia, acc b, int64_t ib) {
  const bool nan_a = a != a, nan_b = b != b;
  if (nan_a || nan_b) return nan_a && (!nan_b || ia < ib);
  return a > b || (a == b && ia < ib);
}

// HF's torch.sigmoid(logit.float()): 1 / (1 + exp(-x)) in float32. Float64 logits (CPU) use
// float64, so that the float64 op is a smooth function for gradcheck (HF's float64 model still
// takes the float32 sigmoid: 1e-8 relative apart).
template <typename acc>
VITOPS_HOST_DEVICE acc sigmoid(acc x) {
  if constexpr (std::is_same_v<acc, float>) {
    return 1.f / (1.f + expf(-x));
  } else {
    return 1.0 / (1.0 + exp(-x));
  }
}

// d sigmoid / d x from the output, as torch's sigmoid_backward: g * (1 - s) * s.
template <typename acc>
VITOPS_HOST_DEVICE acc sigmoid_backward(acc g, acc s) {
  return g * (acc(1) - s) * s;
}

inline RouteGeometry check_route(const char* op, const Tensor& x, const Tensor& router_logits, bool allow_double) {
  VITOPS_CHECK(x.dim() == 2, "vitops.", op, ": `x` must have shape [N, H] (tokens, hidden), got ", shape_str(x));
  VITOPS_CHECK(router_logits.dim() == 2 && router_logits.size(0) == x.size(0), "vitops.", op,
               ": `router_logits` must have shape [N, E] = [", x.size(0), ", E] (one logit per token and expert), got ",
               shape_str(router_logits));
  check_float(op, "x", x, allow_double);
  check_float_table(op, "router_logits", router_logits, allow_double);
  check_same_device(op, "x", x, "router_logits", router_logits);
  RouteGeometry g;
  g.tokens = x.size(0);
  g.hidden = x.size(1);
  g.experts = router_logits.size(1);
  VITOPS_CHECK(g.experts >= 1, "vitops.", op, ": `router_logits` must have at least one expert (E >= 1), got ",
               shape_str(router_logits));
  VITOPS_CHECK(g.tokens <= kMaxTokens, "vitops.", op, ": at most 2^31 - 1 tokens (expert_ends is int32, ",
               "grouped_mm's offs), got N = ", g.tokens);
  check_shape_fits(op, "the routed rows", {g.tokens, g.hidden});
  check_shape_fits(op, "the router-logit gradient", {g.tokens, g.experts});
  value_kind_of(router_logits.scalar_type(), &g.logit_kind);
  return g;
}

// The forward's outputs, fresh on x's device (the kernels fill every element).
struct RouteOutputs {
  Tensor routed, scores, token_order, token_slot, expert_ends;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> as_tuple() const {
    return {routed, scores, token_order, token_slot, expert_ends};
  }
};

inline RouteOutputs allocate_route(const Tensor& x, const RouteGeometry& g) {
  RouteOutputs o;
  o.routed = new_empty(x, {g.tokens, g.hidden}, x.scalar_type());
  o.scores = new_empty(x, {g.tokens}, x.scalar_type());
  o.token_order = new_empty(x, {g.tokens}, ScalarType::Long);
  o.token_slot = new_empty(x, {g.tokens}, ScalarType::Long);
  o.expert_ends = new_empty(x, {g.experts}, ScalarType::Int);
  return o;
}

// token_slot / token_order: [N] int64 on x's device.
inline void check_permutation_arg(const char* op, const char* arg, const Tensor& t, int64_t tokens, const char* like_name,
                                  const Tensor& like) {
  VITOPS_CHECK(t.dim() == 1 && t.size(0) == tokens, "vitops.", op, ": `", arg, "` must have shape [N] = [", tokens,
               "] (one row index per token, from moe_route), got ", shape_str(t));
  VITOPS_CHECK(t.scalar_type() == ScalarType::Long, "vitops.", op, ": `", arg, "` must be an int64 tensor, got ",
               dtype_name(t.scalar_type()));
  check_same_device(op, like_name, like, arg, t);
}

inline void check_route_backward(const char* op, const RouteGeometry& g, const Tensor& grad_routed,
                                 const std::optional<Tensor>& grad_scores, const Tensor& x, const Tensor& token_slot) {
  VITOPS_CHECK(grad_routed.dim() == 2 && grad_routed.size(0) == g.tokens && grad_routed.size(1) == g.hidden, "vitops.",
               op, ": `grad_routed` must have shape [N, H] = [", g.tokens, ", ", g.hidden, "], got ",
               shape_str(grad_routed));
  VITOPS_CHECK(grad_routed.scalar_type() == x.scalar_type(), "vitops.", op, ": `grad_routed` must have the dtype of `x` (",
               dtype_name(x.scalar_type()), "), got ", dtype_name(grad_routed.scalar_type()));
  check_same_device(op, "x", x, "grad_routed", grad_routed);
  if (grad_scores.has_value()) {
    const Tensor& gs = *grad_scores;
    VITOPS_CHECK(gs.dim() == 1 && gs.size(0) == g.tokens && gs.scalar_type() == x.scalar_type(), "vitops.", op,
                 ": `grad_scores` must be None or have shape [N] = [", g.tokens, "] and the dtype of `x` (",
                 dtype_name(x.scalar_type()), "), got ", shape_str(gs), " ", dtype_name(gs.scalar_type()));
    check_same_device(op, "x", x, "grad_scores", gs);
  }
  check_permutation_arg(op, "token_slot", token_slot, g.tokens, "x", x);
}

// CPU: `slot` must be a permutation of [0, N) and `order` its inverse (order[slot[t]] == t), else a
// clear error (a bad index would read out of bounds or leave rows unwritten).
inline void check_inverse_permutations(const char* op, const int64_t* slot, const int64_t* order, int64_t tokens) {
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t j = slot[t];
    VITOPS_CHECK(j >= 0 && j < tokens, "vitops.", op, ": `token_slot` must hold row indices in [0, ", tokens,
                 "), got ", j, " at token ", t);
    VITOPS_CHECK(order[j] == t, "vitops.", op, ": `token_order` must be the inverse of `token_slot` ",
                 "(token_order[token_slot[t]] == t, as moe_route returns them), but token_slot[", t, "] = ", j,
                 " and token_order[", j, "] = ", order[j]);
  }
}

// CPU: `index` must be a permutation of [0, N) (each index once).
inline void check_permutation(const char* op, const char* arg, const int64_t* index, int64_t tokens) {
  std::vector<bool> seen = scratch_vector<bool>(op, "the permutation check", tokens, false);
  for (int64_t j = 0; j < tokens; ++j) {
    const int64_t t = index[j];
    VITOPS_CHECK(t >= 0 && t < tokens, "vitops.", op, ": `", arg, "` must hold indices in [0, ", tokens, "), got ",
                 t, " at position ", j);
    VITOPS_CHECK(!seen[t], "vitops.", op, ": `", arg, "` must be a permutation (each index once), but ", t,
                 " appears twice");
    seen[t] = true;
  }
}

}  // namespace vitops::moe

// moe_route on the CPU: expert choice and score per token in parallel, the counting sort on one
// thread (O(N) integer work), the scaled rows written in parallel over bucketed rows.
#include <vector>

#include "../moe_route.h"

namespace vitops::moe {
namespace {

template <typename acc>
int64_t top_expert(const void* logits, ValueKind kind, int64_t row, int64_t experts) {
  int64_t best = 0;
  acc best_value = load_as<acc>(logits, kind, row * experts);
  for (int64_t e = 1; e < experts; ++e) {
    const acc v = load_as<acc>(logits, kind, row * experts + e);
    if (ranks_above(v, e, best_value, best)) {
      best = e;
      best_value = v;
    }
  }
  return best;
}

// The sigmoid of the token's top logit: float32 (the logit rounded to float32 first, as HF's
// .float()), float64 for float64 logits; returned widened (exact).
inline double top_sigmoid(const void* logits, ValueKind kind, int64_t row, int64_t experts, int64_t expert) {
  if (kind == ValueKind::Float64) return sigmoid<double>(load_as<double>(logits, kind, row * experts + expert));
  return sigmoid<float>(load_as<float>(logits, kind, row * experts + expert));
}

// sigmoid_backward in the sigmoid's precision.
inline double top_sigmoid_backward(ValueKind kind, double grad, double s) {
  if (kind == ValueKind::Float64) return sigmoid_backward<double>(grad, s);
  return sigmoid_backward<float>(static_cast<float>(grad), static_cast<float>(s));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_route_cpu(const Tensor& x_arg, const Tensor& logits_arg) {
  const char* op = "moe_route";
  const RouteGeometry g = check_route(op, x_arg, logits_arg, /*allow_double=*/true);
  const Tensor x = as_contiguous(x_arg), logits = as_contiguous(logits_arg);
  const int64_t n = g.tokens, h = g.hidden, e_count = g.experts;
  const RouteOutputs out = allocate_route(x, g);
  const Tensor &routed = out.routed, &scores = out.scores, &order_t = out.token_order, &slot_t = out.token_slot;
  const Tensor& ends_t = out.expert_ends;
  std::vector<int64_t> expert = scratch_vector<int64_t>(op, "the expert choices", n);
  std::vector<int64_t> next = scratch_vector<int64_t>(op, "the bucket starts", e_count, 0);
  const void* lp = logits.const_data_ptr();
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "moe_route_cpu", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* sp = scores.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, n, /*grain_size=*/256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        expert[t] = top_expert<acc>(lp, g.logit_kind, t, e_count);
        sp[t] = static_cast<scalar_t>(top_sigmoid(lp, g.logit_kind, t, e_count, expert[t]));
      }
    });
    // Stable counting sort: bucket starts from the counts, then tokens in order.
    for (int64_t t = 0; t < n; ++t) ++next[expert[t]];
    int32_t* ends = ends_t.mutable_data_ptr<int32_t>();
    int64_t running = 0;
    for (int64_t e = 0; e < e_count; ++e) {
      const int64_t count = next[e];
      next[e] = running;
      running += count;
      ends[e] = static_cast<int32_t>(running);
    }
    int64_t* order = order_t.mutable_data_ptr<int64_t>();
    int64_t* slot = slot_t.mutable_data_ptr<int64_t>();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t j = next[expert[t]]++;
      order[j] = t;
      slot[t] = j;
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* rp = routed.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, n, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t t = order[j];
        const acc score = widen(sp[t]);
        const scalar_t* src = xp + t * h;
        scalar_t* dst = rp + j * h;
        for (int64_t c = 0; c < h; ++c) dst[c] = narrow<scalar_t>(widen(src[c]) * score);
      }
    });
  });
  return out.as_tuple();
}

std::tuple<Tensor, Tensor> moe_route_backward_cpu(const Tensor& grad_routed_arg,
                                                   const std::optional<Tensor>& grad_scores_arg, const Tensor& x_arg,
                                                   const Tensor& logits_arg, const Tensor& slot_arg) {
  const char* op = "_moe_route_backward";
  const RouteGeometry g = check_route(op, x_arg, logits_arg, /*allow_double=*/true);
  const int64_t n = g.tokens, h = g.hidden, e_count = g.experts;
  check_route_backward(op, g, grad_routed_arg, grad_scores_arg, x_arg, slot_arg);
  const Tensor x = as_contiguous(x_arg), logits = as_contiguous(logits_arg), grad = as_contiguous(grad_routed_arg);
  const Tensor slot_c = as_contiguous(slot_arg);
  const int64_t* slot = slot_c.const_data_ptr<int64_t>();
  check_permutation(op, "token_slot", slot, n);  // every bucketed row read once
  Tensor grad_x = new_empty(x, {n, h}, x.scalar_type());
  Tensor grad_logits = new_empty(x, {n, e_count}, logits.scalar_type());
  std::optional<Tensor> grad_scores;
  if (grad_scores_arg.has_value()) grad_scores = as_contiguous(*grad_scores_arg);
  const void* lp = logits.const_data_ptr();
  void* glp = grad_logits.mutable_data_ptr();
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "moe_route_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* gsp = grad_scores.has_value() ? grad_scores->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, n, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t e_top = top_expert<acc>(lp, g.logit_kind, t, e_count);
        const double s = top_sigmoid(lp, g.logit_kind, t, e_count, e_top);
        const acc score = widen(static_cast<scalar_t>(s));
        const scalar_t* gsrc = gp + slot[t] * h;
        const scalar_t* xsrc = xp + t * h;
        scalar_t* dst = gxp + t * h;
        acc dot = 0;
        for (int64_t c = 0; c < h; ++c) {
          const acc gv = widen(gsrc[c]);
          dst[c] = narrow<scalar_t>(gv * score);
          dot += gv * widen(xsrc[c]);
        }
        if (gsp != nullptr) dot += widen(gsp[t]);
        for (int64_t e = 0; e < e_count; ++e) store_as<float>(glp, g.logit_kind, t * e_count + e, 0.f);
        // the gradient reaches the selected logit only (HF scatters the top value, the rest is -inf)
        store_as<double>(glp, g.logit_kind, t * e_count + e_top,
                         top_sigmoid_backward(g.logit_kind, static_cast<double>(dot), s));
      }
    });
  });
  return {grad_x, grad_logits};
}

}  // namespace
}  // namespace vitops::moe

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("moe_route", TORCH_BOX(&vitops::moe::moe_route_cpu));
  m.impl("_moe_route_backward", TORCH_BOX(&vitops::moe::moe_route_backward_cpu));
}

// moe_combine on the CPU: out[t] = shared[t] + expert_out[token_slot[t]] (rounded once), parallel
// over tokens; the backward gathers the output gradient by token_order. Both validate the
// permutations first (a bad index would read out of bounds or leave rows unwritten).
#include "../moe_combine.h"

namespace vitops::moe {
namespace {

Tensor moe_combine_cpu(const Tensor& shared_arg, const Tensor& expert_arg, const Tensor& slot_arg,
                       const Tensor& order_arg) {
  const char* op = "moe_combine";
  const CombineGeometry g = check_combine(op, shared_arg, expert_arg, slot_arg, order_arg, /*allow_double=*/true);
  const Tensor slot_c = as_contiguous(slot_arg), order_c = as_contiguous(order_arg);
  const int64_t* slot = slot_c.const_data_ptr<int64_t>();
  check_inverse_permutations(op, slot, order_c.const_data_ptr<int64_t>(), g.tokens);
  const Tensor shared = as_contiguous(shared_arg), expert = as_contiguous(expert_arg);
  Tensor out = new_empty(shared, {g.tokens, g.hidden}, shared.scalar_type());
  const int64_t h = g.hidden;
  VITOPS_DISPATCH_FLOATING(shared.scalar_type(), "moe_combine_cpu", [&] {
    const scalar_t* sp = shared.const_data_ptr<scalar_t>();
    const scalar_t* ep = expert.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, g.tokens, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* a = sp + t * h;
        const scalar_t* b = ep + slot[t] * h;
        scalar_t* dst = op_ + t * h;
        for (int64_t c = 0; c < h; ++c) dst[c] = narrow<scalar_t>(widen(a[c]) + widen(b[c]));
      }
    });
  });
  return out;
}

Tensor moe_combine_backward_cpu(const Tensor& grad_arg, const Tensor& order_arg) {
  const char* op = "_moe_combine_backward";
  const CombineGeometry g = check_combine_backward(op, grad_arg, order_arg, /*allow_double=*/true);
  const Tensor order_c = as_contiguous(order_arg);
  const int64_t* order = order_c.const_data_ptr<int64_t>();
  check_permutation(op, "token_order", order, g.tokens);
  const Tensor grad = as_contiguous(grad_arg);
  Tensor out = new_empty(grad, {g.tokens, g.hidden}, grad.scalar_type());
  const int64_t h = g.hidden;
  VITOPS_DISPATCH_FLOATING(grad.scalar_type(), "moe_combine_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, g.tokens, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) std::copy(gp + order[j] * h, gp + order[j] * h + h, dst + j * h);
    });
  });
  return out;
}

}  // namespace
}  // namespace vitops::moe

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("moe_combine", TORCH_BOX(&vitops::moe::moe_combine_cpu));
  m.impl("_moe_combine_backward", TORCH_BOX(&vitops::moe::moe_combine_backward_cpu));
}

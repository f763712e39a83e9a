// moe_combine: argument checks shared by the CPU and CUDA kernels (the routing conventions are
// moe_route's: ops/moe_route/moe_route.h).
#pragma once

#include "../moe_route/moe_route.h"

namespace vitops::moe {

struct CombineGeometry {
  int64_t tokens = 0, hidden = 0;
};

inline CombineGeometry check_combine(const char* op, const Tensor& shared, const Tensor& expert_out,
                                     const Tensor& token_slot, const Tensor& token_order, bool allow_double) {
  VITOPS_CHECK(shared.dim() == 2, "vitops.", op, ": `shared` must have shape [N, H] (tokens, hidden), got ",
               shape_str(shared));
  VITOPS_CHECK(expert_out.dim() == 2 && expert_out.size(0) == shared.size(0) && expert_out.size(1) == shared.size(1),
               "vitops.", op, ": `expert_out` must have the shape of `shared` ", shape_str(shared),
               " (the experts' outputs in moe_route's bucketed row order), got ", shape_str(expert_out));
  check_float(op, "shared", shared, allow_double);
  VITOPS_CHECK(expert_out.scalar_type() == shared.scalar_type(), "vitops.", op,
               ": `expert_out` must have the dtype of `shared` (", dtype_name(shared.scalar_type()), "), got ",
               dtype_name(expert_out.scalar_type()));
  check_same_device(op, "shared", shared, "expert_out", expert_out);
  CombineGeometry g{shared.size(0), shared.size(1)};
  check_permutation_arg(op, "token_slot", token_slot, g.tokens, "shared", shared);
  check_permutation_arg(op, "token_order", token_order, g.tokens, "shared", shared);
  return g;
}

inline CombineGeometry check_combine_backward(const char* op, const Tensor& grad_output, const Tensor& token_order,
                                              bool allow_double) {
  VITOPS_CHECK(grad_output.dim() == 2, "vitops.", op, ": `grad_output` must have shape [N, H], got ",
               shape_str(grad_output));
  check_float(op, "grad_output", grad_output, allow_double);
  CombineGeometry g{grad_output.size(0), grad_output.size(1)};
  check_permutation_arg(op, "token_order", token_order, g.tokens, "grad_output", grad_output);
  return g;
}

}  // namespace vitops::moe

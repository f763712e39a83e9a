// merge_soft_tokens on the CPU: the indices are checked first (an index >= rows or a row written
// twice raises, naming the positions), then the output is the embeddings copied row-parallel with
// the soft-token rows scattered over them, also row-parallel (each target row is written once, so
// the pass has no races and no order). The backward zeroes the written rows of the gradient and
// gathers them for the soft tokens (zero rows for skipped positions).
#include "../merge_soft_tokens.h"

namespace vitops::merge {
namespace {

constexpr int64_t kRowGrain = 16;

using Targets = std::vector<std::pair<int64_t, int64_t>>;

Targets targets_of(const char* op, const Tensor& indices_arg, const MergeGeometry& g) {
  const Tensor indices = as_contiguous(indices_arg);
  return VITOPS_DISPATCH_INDEX(indices.scalar_type(), op,
                               [&] { return checked_targets(op, indices.const_data_ptr<index_t>(), g); });
}

// Copies `rows` rows of `hidden` elements from src to dst, in parallel.
template <typename scalar_t>
void copy_rows(const scalar_t* src, scalar_t* dst, int64_t rows, int64_t hidden) {
  torch::stable::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::copy(src + begin * hidden, src + end * hidden, dst + begin * hidden);
  });
}

Tensor merge_soft_tokens_cpu(const Tensor& embeds_arg, const Tensor& soft_arg, const Tensor& indices_arg) {
  const char* op = "merge_soft_tokens";
  const MergeGeometry g = check_merge(op, embeds_arg, soft_arg, indices_arg, /*allow_double=*/true);
  const Targets targets = targets_of(op, indices_arg, g);
  Tensor out = new_empty(embeds_arg, sizes_of(embeds_arg), embeds_arg.scalar_type());
  if (g.rows == 0 || g.hidden == 0) return out;
  const Tensor embeds = as_contiguous(embeds_arg), soft = as_contiguous(soft_arg);
  const int64_t h = g.hidden;
  VITOPS_DISPATCH_FLOATING(embeds.scalar_type(), "merge_soft_tokens_cpu", [&] {
    const scalar_t* sp = soft.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    copy_rows(embeds.const_data_ptr<scalar_t>(), dst, g.rows, h);
    const int64_t count = static_cast<int64_t>(targets.size());
    torch::stable::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const auto [row, j] = targets[k];
        std::copy(sp + j * h, sp + j * h + h, dst + row * h);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> merge_soft_tokens_backward_cpu(const Tensor& grad_arg, const Tensor& indices_arg) {
  const char* op = "_merge_soft_tokens_backward";
  const MergeGeometry g = check_merge_backward(op, grad_arg, indices_arg, /*allow_double=*/true);
  const Targets targets = targets_of(op, indices_arg, g);
  Tensor grad_embeds = new_empty(grad_arg, sizes_of(grad_arg), grad_arg.scalar_type());
  Tensor grad_soft = new_empty(grad_arg, {g.soft, g.hidden}, grad_arg.scalar_type());
  if (g.hidden == 0) return {grad_embeds, grad_soft};
  const Tensor grad = as_contiguous(grad_arg);
  const int64_t h = g.hidden;
  VITOPS_DISPATCH_FLOATING(grad.scalar_type(), "merge_soft_tokens_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* ge = grad_embeds.mutable_data_ptr<scalar_t>();
    scalar_t* gs = grad_soft.mutable_data_ptr<scalar_t>();
    copy_rows(gp, ge, g.rows, h);
    // skipped soft tokens get zero rows; every written one is overwritten below
    torch::stable::parallel_for(0, g.soft, kRowGrain, [&](int64_t begin, int64_t end) {
      std::fill(gs + begin * h, gs + end * h, scalar_t(0));
    });
    const int64_t count = static_cast<int64_t>(targets.size());
    torch::stable::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const auto [row, j] = targets[k];
        std::copy(gp + row * h, gp + row * h + h, gs + j * h);
        std::fill(ge + row * h, ge + row * h + h, scalar_t(0));
      }
    });
  });
  return {grad_embeds, grad_soft};
}

}  // namespace
}  // namespace vitops::merge

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("merge_soft_tokens", TORCH_BOX(&vitops::merge::merge_soft_tokens_cpu));
  m.impl("_merge_soft_tokens_backward", TORCH_BOX(&vitops::merge::merge_soft_tokens_backward_cpu));
}

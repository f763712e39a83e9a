// avg_pool_rms_norm on the CPU (WIP): one task per (image, output token) row: the k x k window summed
// in row-major order (AvgPool2d's order) in the accumulation type, divided by k², rounded to x's
// dtype, then the row's RMS norm (kernels/norm/norm.h). Bitwise reproducible (no thread-dependent
// order); weight gradients reduced in fixed row chunks.
#include <algorithm>
#include <vector>

#include "../avg_pool_rms_norm.h"

namespace vitops::avg_pool_rms_norm {
namespace {

constexpr int64_t kRowsPerChunk = 32;

template <typename scalar_t>
void pooled_row(const scalar_t* xp, int64_t xs_b, int64_t xs_l, const Geometry& g, int64_t b, int64_t s,
                acc_t<scalar_t>* out) {
  using acc = acc_t<scalar_t>;
  const int64_t D = g.dim, k = g.kernel;
  const int64_t r0 = (s / g.out_side) * k, c0 = (s % g.out_side) * k;
  std::fill(out, out + D, acc(0));
  for (int64_t r = r0; r < r0 + k; ++r)
    for (int64_t c = c0; c < c0 + k; ++c) {
      const scalar_t* row = xp + b * xs_b + (r * g.side + c) * xs_l;
      for (int64_t d = 0; d < D; ++d) out[d] += widen(row[d]);
    }
  const acc count = static_cast<acc>(k * k);
  for (int64_t d = 0; d < D; ++d) out[d] = round_to<scalar_t>(out[d] / count);
}

template <typename acc>
std::vector<acc> weight_factors(const Geometry& g, const std::optional<Tensor>& weight) {
  std::vector<acc> w(norm::has_weight(g.norm) ? g.dim : 0);
  for (int64_t d = 0; d < static_cast<int64_t>(w.size()); ++d)
    w[d] = norm::weight_factor(g.norm, load_as<acc>(weight->const_data_ptr(), g.weight_kind, d * g.weight_stride));
  return w;
}

template <typename scalar_t>
void forward(const Tensor& x, const Geometry& g, const std::optional<Tensor>& weight, double eps, Tensor& out) {
  using acc = acc_t<scalar_t>;
  const std::vector<acc> w = weight_factors<acc>(g, weight);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t D = g.dim, xs_b = x.stride(0), xs_l = x.stride(1);
  torch::stable::parallel_for(0, g.batch * g.length, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> p(D);
    for (int64_t row = begin; row < end; ++row) {
      pooled_row<scalar_t>(xp, xs_b, xs_l, g, row / g.length, row % g.length, p.data());
      scalar_t* dst = op + row * D;
      if (!norm::normalizes(g.norm)) {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(p[d]);
        continue;
      }
      acc ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += p[d] * p[d];
      const acc r = norm::inverse_rms(ss, D, static_cast<acc>(eps));
      for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(w.empty() ? p[d] * r : (p[d] * r) * w[d]);
    }
  });
}

Tensor avg_pool_rms_norm_cpu(const Tensor& x_in, int64_t length, const std::optional<Tensor>& weight, double eps,
                             std::string norm_name) {
  const char* op = "avg_pool_rms_norm";
  const Geometry g = check_inputs(op, x_in, length, weight, eps, norm_name, /*allow_double=*/true);
  Tensor out = new_empty(x_in, {g.batch, g.length, g.dim}, x_in.scalar_type());
  if (out.numel() == 0) return out;
  const Tensor x = x_in.stride(2) == 1 ? x_in : torch::stable::contiguous(x_in);
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "avg_pool_rms_norm_cpu", [&] { forward<scalar_t>(x, g, weight, eps, out); });
  return out;
}

}  // namespace
}  // namespace vitops::avg_pool_rms_norm

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("avg_pool_rms_norm", TORCH_BOX(&vitops::avg_pool_rms_norm::avg_pool_rms_norm_cpu));
}

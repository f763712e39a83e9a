// avg_pool_rms_norm on the CPU: one task per (image, output token) row: the k x k window summed
// in row-major order (AvgPool2d's order) in the accumulation type, divided by k², rounded to x's
// dtype, then the row's RMS norm (kernels/norm/norm.h). Bitwise reproducible (no thread-dependent
// order); weight gradients reduced in fixed row chunks.
#include <algorithm>
#include <vector>

#include "../avg_pool_rms_norm.h"
#include "kernels/norm/cpu.h"

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
      const acc r = norm::inverse_rms(norm::sum_of_squares(p.data(), D), D, static_cast<acc>(eps));
      if (w.empty()) {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(p[d] * r);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>((p[d] * r) * w[d]);
      }
    }
  });
}

// Per output row: u = p * r (p the rounded pooled row), the output's gradient gy; weight gradient
// partials gy * u per fixed row chunk; gp = r * (gu - u * mean(gu * u)), gu = gy * weight factor; every
// window patch gets gp / k² (AvgPool2d's backward). The rounding of p is the identity for autograd,
// as HF's dtype casts are.
template <typename scalar_t>
void backward(const Tensor& grad, const Tensor& x, const Geometry& g, const std::optional<Tensor>& weight, double eps,
              Tensor& grad_x, Tensor& grad_weight) {
  using acc = acc_t<scalar_t>;
  const std::vector<acc> w = weight_factors<acc>(g, weight);
  const bool weighted = !w.empty();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp_in = grad.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t D = g.dim, k = g.kernel, rows = g.batch * g.length;
  const int64_t xs_b = x.stride(0), xs_l = x.stride(1), gs_b = grad.stride(0), gs_s = grad.stride(1);
  const int64_t num_chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<acc> partial(weighted ? static_cast<size_t>(num_chunks) * D : 0, acc(0));
  const acc count = static_cast<acc>(k * k);
  torch::stable::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc> p(D), u(D), gu(D), gpool(D);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      for (int64_t row = chunk * kRowsPerChunk; row < std::min(rows, (chunk + 1) * kRowsPerChunk); ++row) {
        const int64_t b = row / g.length, s = row % g.length;
        const scalar_t* gy = gp_in + b * gs_b + s * gs_s;
        if (!norm::normalizes(g.norm)) {
          for (int64_t d = 0; d < D; ++d) gpool[d] = widen(gy[d]);
        } else {
          pooled_row<scalar_t>(xp, xs_b, xs_l, g, b, s, p.data());
          const acc r = norm::inverse_rms(norm::sum_of_squares(p.data(), D), D, static_cast<acc>(eps));
          for (int64_t d = 0; d < D; ++d) {
            u[d] = p[d] * r;
            const acc gyd = widen(gy[d]);
            if (weighted) partial[chunk * D + d] += gyd * u[d];
            gu[d] = weighted ? gyd * w[d] : gyd;
          }
          const acc mean_dot = norm::lane_dot(gu.data(), u.data(), D) / static_cast<acc>(D);
          for (int64_t d = 0; d < D; ++d) gpool[d] = r * (gu[d] - u[d] * mean_dot);
        }
        const int64_t r0 = (s / g.out_side) * k, col0 = (s % g.out_side) * k;
        for (int64_t rr = r0; rr < r0 + k; ++rr)
          for (int64_t cc = col0; cc < col0 + k; ++cc) {
            scalar_t* dst = gx + (b * g.seq_len + rr * g.side + cc) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(gpool[d] / count);
          }
      }
    }
  });
  if (!weighted) return;
  void* out = grad_weight.mutable_data_ptr();
  for (int64_t d = 0; d < D; ++d) {
    acc sum = 0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[chunk * D + d];
    store_as<acc>(out, g.weight_kind, d, sum);
  }
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

std::tuple<Tensor, Tensor> avg_pool_rms_norm_backward_cpu(const Tensor& grad_in, const Tensor& x_in, int64_t length,
                                                          const std::optional<Tensor>& weight, double eps,
                                                          std::string norm_name) {
  const char* op = "_avg_pool_rms_norm_backward";
  const Geometry g = check_inputs(op, x_in, length, weight, eps, norm_name, /*allow_double=*/true);
  check_grad_output(op, grad_in, x_in, g);
  BackwardOutputs grads = allocate_backward(x_in, g, weight);
  Tensor& grad_x = grads.grad_x;
  Tensor& grad_weight = grads.grad_weight;
  if (grad_weight.numel() > 0 && grad_x.numel() == 0) {
    VITOPS_DISPATCH_FLOATING(grad_weight.scalar_type(), "avg_pool_rms_norm_zero_weight_grad", [&] {
      std::fill(grad_weight.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>() + g.dim, scalar_t(0));
    });
  }
  if (grad_x.numel() == 0) return {grad_x, grad_weight};
  const Tensor x = x_in.stride(2) == 1 ? x_in : torch::stable::contiguous(x_in);
  const Tensor grad = grad_in.stride(2) == 1 ? grad_in : torch::stable::contiguous(grad_in);
  VITOPS_DISPATCH_FLOATING(x.scalar_type(), "avg_pool_rms_norm_backward_cpu",
                           [&] { backward<scalar_t>(grad, x, g, weight, eps, grad_x, grad_weight); });
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace vitops::avg_pool_rms_norm

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("avg_pool_rms_norm", TORCH_BOX(&vitops::avg_pool_rms_norm::avg_pool_rms_norm_cpu));
  m.impl("_avg_pool_rms_norm_backward", TORCH_BOX(&vitops::avg_pool_rms_norm::avg_pool_rms_norm_backward_cpu));
}

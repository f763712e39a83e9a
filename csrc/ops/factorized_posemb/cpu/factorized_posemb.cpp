// factorized_posemb on the CPU.
//
// Forward: parallel over patches; each output row is x_table[x] + y_table[y] computed in the
// accumulation type and rounded once, with the D loop contiguous so bf16/fp16 <-> float
// conversions vectorize.
// Backward: patches are first bucketed by (axis, table row) with a stable counting sort, so each
// table row owns the ordered list of patches that hit it. Rows are then processed in parallel,
// each summing its patches in increasing patch order: no two threads write the same output and
// the result does not depend on the thread count.
#include <algorithm>
#include <vector>

#include "../factorized_posemb.h"

namespace vitops::factorized_posemb {
namespace {

// Coordinates are validated serially before any parallel work, so the error names the first bad
// coordinate deterministically and no exception has to cross the parallel_for callback.
template <typename index_t>
void check_coordinates(const index_t* pos, int64_t num_patches, int64_t num_positions, const char* op) {
  for (int64_t i = 0; i < num_patches * 2; ++i) {
    const int64_t c = load_index(pos, i);
    VITOPS_CHECK(c >= -1 && c < num_positions, "vitops.", op, ": `positions_xy` has ", (i % 2 == 0 ? "x" : "y"),
                 " coordinate ", c, " (patch ", i / 2, ") outside [0, N_pos) with N_pos = ", num_positions,
                 "; only -1 (padding) may lie outside");
  }
}

template <typename scalar_t, typename index_t>
void forward_rows(const scalar_t* table, const TableView& t, const index_t* pos, scalar_t* out, int64_t num_patches) {
  using acc = acc_t<scalar_t>;
  const int64_t D = t.dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, num_patches, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t x = load_index(pos, 2 * p), y = load_index(pos, 2 * p + 1);
      scalar_t* o = out + p * D;
      // Row pointers are only formed for valid coordinates (x table is axis 0, y table axis 1).
      const scalar_t* xr = x >= 0 ? table + t.row_stride * x : nullptr;
      const scalar_t* yr = y >= 0 ? table + t.axis_stride + t.row_stride * y : nullptr;
      // One branch per row, so each inner loop is a plain contiguous loop the compiler vectorizes.
      if (x >= 0 && y >= 0) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<acc>(xr[d]) + static_cast<acc>(yr[d]));
      } else if (x >= 0) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<acc>(xr[d]) + acc(0));
      } else if (y >= 0) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc(0) + static_cast<acc>(yr[d]));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc(0));
      }
    }
  });
}

Tensor factorized_posemb_cpu(const Tensor& posemb_in, const Tensor& positions_xy, int64_t table_dim) {
  Tensor posemb = posemb_in;
  int64_t num_patches = 0;
  const TableView t = check_forward(posemb, positions_xy, table_dim, /*allow_double=*/true, &num_patches);
  Tensor out = new_empty(posemb, patch_sizes_with(positions_xy, t.dim), posemb.scalar_type());
  if (num_patches == 0) return out;
  // positions_xy is tiny next to the output; a contiguous copy (only when strided) keeps the kernel simple.
  const Tensor pos = as_contiguous(positions_xy);
  with_index_type(pos.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    check_coordinates(pos.const_data_ptr<index_t>(), num_patches, t.num_positions, "factorized_posemb");
  });
  if (t.dim == 0) return out;
  VITOPS_DISPATCH_FLOATING(posemb.scalar_type(), "factorized_posemb_cpu", [&] {
    with_index_type(pos.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      forward_rows<scalar_t, index_t>(posemb.const_data_ptr<scalar_t>(), t, pos.const_data_ptr<index_t>(),
                                      out.mutable_data_ptr<scalar_t>(), num_patches);
    });
  });
  return out;
}

// Stable counting sort of the valid (patch, axis) hits by key = axis * N_pos + coordinate.
// bucket_start has 2 * N_pos + 1 entries; patches of key k are patch_of[bucket_start[k] .. bucket_start[k+1]),
// in increasing patch order because patches are placed in increasing order.
template <typename index_t>
void bucket_by_row(const index_t* pos, int64_t num_patches, int64_t num_positions, std::vector<int64_t>& bucket_start,
                   std::vector<int64_t>& patch_of) {
  const int64_t keys = 2 * num_positions;
  bucket_start.assign(keys + 1, 0);
  for (int64_t i = 0; i < num_patches * 2; ++i) {
    const int64_t c = load_index(pos, i);
    if (c >= 0) ++bucket_start[(i % 2) * num_positions + c + 1];
  }
  for (int64_t k = 0; k < keys; ++k) bucket_start[k + 1] += bucket_start[k];
  patch_of.resize(bucket_start[keys]);
  std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
  for (int64_t i = 0; i < num_patches * 2; ++i) {
    const int64_t c = load_index(pos, i);
    if (c >= 0) patch_of[fill[(i % 2) * num_positions + c]++] = i / 2;
  }
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad, scalar_t* out, const std::vector<int64_t>& bucket_start,
                   const std::vector<int64_t>& patch_of, int64_t num_positions, int64_t D, int64_t table_dim) {
  using acc = acc_t<scalar_t>;
  const int64_t keys = 2 * num_positions;
  torch::stable::parallel_for(0, keys, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(D);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t axis = k / num_positions, n = k % num_positions;
      scalar_t* o = out + contiguous_row_offset(axis, n, num_positions, D, table_dim);
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t j = bucket_start[k]; j < bucket_start[k + 1]; ++j) {
        const scalar_t* g = grad + patch_of[j] * D;
        for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<acc>(g[d]);
      }
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(sum[d]);
    }
  });
}

Tensor factorized_posemb_backward_cpu(const Tensor& grad_output, const Tensor& positions_xy, int64_t num_positions,
                                      int64_t table_dim) {
  const int64_t num_patches = check_backward(grad_output, positions_xy, num_positions, table_dim, /*allow_double=*/true);
  const int64_t D = grad_output.size(grad_output.dim() - 1);
  Tensor out = new_empty(grad_output, table_sizes(num_positions, D, table_dim), grad_output.scalar_type());
  const Tensor pos = as_contiguous(positions_xy);
  with_index_type(pos.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* p = num_patches > 0 ? pos.const_data_ptr<index_t>() : nullptr;
    check_coordinates(p, num_patches, num_positions, "_factorized_posemb_backward");
  });
  // An empty table gradient (D = 0 or N_pos = 0) needs no buckets; otherwise 2 * N_pos rows exist.
  if (out.numel() == 0) return out;
  std::vector<int64_t> bucket_start, patch_of;
  with_index_type(pos.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* p = num_patches > 0 ? pos.const_data_ptr<index_t>() : nullptr;
    bucket_by_row(p, num_patches, num_positions, bucket_start, patch_of);
  });
  const Tensor grad = as_contiguous(grad_output);
  VITOPS_DISPATCH_FLOATING(grad.scalar_type(), "factorized_posemb_backward_cpu", [&] {
    backward_rows<scalar_t>(num_patches > 0 ? grad.const_data_ptr<scalar_t>() : nullptr,
                            out.mutable_data_ptr<scalar_t>(), bucket_start, patch_of, num_positions, D, table_dim);
  });
  return out;
}

}  // namespace
}  // namespace vitops::factorized_posemb

STABLE_TORCH_LIBRARY_IMPL(vitops, CPU, m) {
  m.impl("factorized_posemb", TORCH_BOX(&vitops::factorized_posemb::factorized_posemb_cpu));
  m.impl("_factorized_posemb_backward", TORCH_BOX(&vitops::factorized_posemb::factorized_posemb_backward_cpu));
}

// factorized_posemb: argument checks and table geometry shared by the CPU and CUDA kernels.
//
// The table is read in place through its strides: HF keeps it as a [2, N_pos, D] parameter and
// MaxText as [N_pos, 2, D], and either may arrive as a transposed view of the other. Only a
// non-unit stride on D forces a copy, because every kernel walks D contiguously.
#pragma once
#include "vitops/common.h"

namespace vitops::factorized_posemb {

// Where row n of axis a (0 = x table, 1 = y table) starts: axis_stride * a + row_stride * n,
// in elements from the table's data pointer; the D elements of a row are contiguous.
struct TableView {
  int64_t num_positions = 0;  // N_pos
  int64_t dim = 0;            // D
  int64_t axis_stride = 0;
  int64_t row_stride = 0;
};

inline void check_table_dim(const char* op, int64_t table_dim) {
  VITOPS_CHECK(table_dim == 0 || table_dim == 1, "vitops.", op,
               ": `table_dim` must be 0 ([2, N_pos, D], HF) or 1 ([N_pos, 2, D], MaxText), got ", table_dim);
}

// Checks positions_xy[..., 2]; returns the number of (x, y) pairs.
inline int64_t check_positions(const char* op, const Tensor& positions_xy) {
  VITOPS_CHECK(positions_xy.dim() >= 1 && positions_xy.size(positions_xy.dim() - 1) == 2, "vitops.", op,
               ": `positions_xy` must have shape [..., 2] ((x, y) per patch), got ", shape_str(positions_xy));
  check_index(op, "positions_xy", positions_xy);
  return positions_xy.numel() / 2;
}

// Sizes of positions_xy without its trailing (x, y) dim, followed by `last`.
inline std::vector<int64_t> patch_sizes_with(const Tensor& positions_xy, int64_t last) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < positions_xy.dim() - 1; ++i) s.push_back(positions_xy.size(i));
  s.push_back(last);
  return s;
}

// Checks the forward arguments. `posemb` may be replaced by a copy when its D dim is strided.
inline TableView check_forward(Tensor& posemb, const Tensor& positions_xy, int64_t table_dim, bool allow_double,
                               int64_t* num_patches) {
  const char* op = "factorized_posemb";
  check_table_dim(op, table_dim);
  VITOPS_CHECK(posemb.dim() == 3, "vitops.factorized_posemb: `posemb` must be [2, N_pos, D] (table_dim=0) or ",
               "[N_pos, 2, D] (table_dim=1), got ", shape_str(posemb));
  VITOPS_CHECK(posemb.size(table_dim) == 2, "vitops.factorized_posemb: `posemb` must have size 2 (x and y tables) on ",
               "dim table_dim=", table_dim, ", got shape ", shape_str(posemb));
  check_float(op, "posemb", posemb, allow_double);
  *num_patches = check_positions(op, positions_xy);
  check_same_device(op, "posemb", posemb, "positions_xy", positions_xy);
  // A strided D would defeat the contiguous inner loops; this is the only case that copies.
  if (posemb.size(2) > 1 && posemb.stride(2) != 1) posemb = torch::stable::contiguous(posemb);
  TableView t;
  t.num_positions = posemb.size(1 - table_dim);
  t.dim = posemb.size(2);
  check_shape_fits(op, "the output", patch_sizes_with(positions_xy, t.dim));
  t.axis_stride = posemb.stride(table_dim);
  t.row_stride = posemb.stride(1 - table_dim);
  return t;
}

// Shape of grad_posemb in the layout selected by table_dim.
inline std::vector<int64_t> table_sizes(int64_t num_positions, int64_t dim, int64_t table_dim) {
  return table_dim == 0 ? std::vector<int64_t>{2, num_positions, dim} : std::vector<int64_t>{num_positions, 2, dim};
}

// Checks the backward arguments; returns the patch count (grad_output is [..., D] over the same patches).
inline int64_t check_backward(const Tensor& grad_output, const Tensor& positions_xy, int64_t num_positions,
                                 int64_t table_dim, bool allow_double) {
  const char* op = "_factorized_posemb_backward";
  check_table_dim(op, table_dim);
  const int64_t num_patches = check_positions(op, positions_xy);
  check_float(op, "grad_output", grad_output, allow_double);
  check_same_device(op, "grad_output", grad_output, "positions_xy", positions_xy);
  VITOPS_CHECK(num_positions >= 0, "vitops._factorized_posemb_backward: `num_positions` must be >= 0, got ",
               num_positions);
  bool shape_ok = grad_output.dim() == positions_xy.dim();
  for (int64_t i = 0; shape_ok && i < positions_xy.dim() - 1; ++i) shape_ok = grad_output.size(i) == positions_xy.size(i);
  VITOPS_CHECK(shape_ok, "vitops._factorized_posemb_backward: `grad_output` must be [..., D] over the patches of ",
               "`positions_xy` ", shape_str(positions_xy), ", got ", shape_str(grad_output));
  check_shape_fits(op, "the gradient of posemb", table_sizes(num_positions, grad_output.size(grad_output.dim() - 1),
                                                            table_dim));
  return num_patches;
}

// Calls f(index_t{}) with index_t = int32_t or int64_t. A plain function rather than
// VITOPS_DISPATCH_INDEX so it can nest inside a floating-type dispatch macro. Any other dtype
// raises (callers check first; this keeps a new caller from reading other data as int64).
template <typename F>
inline void with_index_type(ScalarType t, const F& f) {
  if (t == ScalarType::Int) {
    f(int32_t{});
    return;
  }
  VITOPS_CHECK(t == ScalarType::Long, "vitops.factorized_posemb: index tensors must be int32 or int64, got ",
               dtype_name(t));
  f(int64_t{});
}


// Element offset of row (axis, n) in a contiguous table of the given layout.
inline int64_t contiguous_row_offset(int64_t axis, int64_t n, int64_t num_positions, int64_t dim, int64_t table_dim) {
  return table_dim == 0 ? (axis * num_positions + n) * dim : (n * 2 + axis) * dim;
}

}  // namespace vitops::factorized_posemb

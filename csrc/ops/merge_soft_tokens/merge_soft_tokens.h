// merge_soft_tokens: the multimodal merge of Gemma 4, Gemma 3 and Llama 4 (the vision tower's soft
// tokens written into the text embeddings at the placeholder rows), as an index scatter.
//
// merge_soft_tokens(inputs_embeds [T, H] or [B, S, H], soft_tokens [N, H], indices [N] int32/int64)
// returns a fresh tensor equal to inputs_embeds except row indices[j] = soft_tokens[j] for every j
// with 0 <= indices[j] < rows (rows = T or B * S, batch-major: HF's masked_scatter order). Negative
// indices are skipped (MAX marks rows already processed after a prefix-cache hit, or not yet in this
// chunk of a chunked prefill, with INT32_MIN), so the op needs no host synchronisation.
//
// Index values: the CPU kernels raise for an index >= rows and for two positions writing one row.
// The CUDA kernels cannot raise without a host synchronisation; they skip indices >= rows, and of
// several positions writing one row the largest j wins (an integer atomicMax into an inverse map,
// so the result does not depend on the thread order). The backward follows the same rule: the
// gradient of a skipped or losing soft token is zero.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::merge {

// The inverse map of the CUDA kernels holds positions j as int32 (half the scratch memory and
// traffic of int64, native atomics); N > 2^31 - 1 soft tokens would be terabytes of rows anyway.
constexpr int64_t kMaxSoftTokens = 2147483647;

struct MergeGeometry {
  int64_t rows = 0, hidden = 0, soft = 0;  // T or B * S, H, N
  ValueKind index_kind = ValueKind::Int64;
};

// Rows of a [T, H] / [B, S, H] tensor (`arg` names it), checked: B * S must fit int64.
inline MergeGeometry rows_of(const char* op, const char* arg, const Tensor& t) {
  VITOPS_CHECK(t.dim() == 2 || t.dim() == 3, "vitops.", op, ": `", arg,
               "` must have shape [T, H] or [B, S, H] (tokens, hidden), got ", shape_str(t));
  MergeGeometry g;
  g.rows = t.dim() == 2 ? t.size(0) : checked_mul(op, "the row count B * S", t.size(0), t.size(1));
  g.hidden = t.size(t.dim() - 1);
  return g;
}

// indices: [N] int32 / int64 on `like`'s device; N within kMaxSoftTokens.
inline void check_indices(const char* op, MergeGeometry& g, const Tensor& indices, const char* like_name,
                          const Tensor& like) {
  VITOPS_CHECK(indices.dim() == 1, "vitops.", op, ": `indices` must have shape [N] (one row index per soft token), got ",
               shape_str(indices));
  check_index(op, "indices", indices);
  check_same_device(op, like_name, like, "indices", indices);
  VITOPS_CHECK(indices.size(0) <= kMaxSoftTokens, "vitops.", op, ": at most 2^31 - 1 soft tokens, got N = ",
               indices.size(0));
  g.soft = indices.size(0);
  value_kind_of(indices.scalar_type(), &g.index_kind);
}

inline MergeGeometry check_merge(const char* op, const Tensor& embeds, const Tensor& soft, const Tensor& indices,
                                 bool allow_double) {
  MergeGeometry g = rows_of(op, "inputs_embeds", embeds);
  check_float(op, "inputs_embeds", embeds, allow_double);
  VITOPS_CHECK(soft.dim() == 2 && soft.size(1) == g.hidden, "vitops.", op, ": `soft_tokens` must have shape [N, H] = [N, ",
               g.hidden, "] (one row per soft token, the hidden size of `inputs_embeds`), got ", shape_str(soft));
  VITOPS_CHECK(soft.scalar_type() == embeds.scalar_type(), "vitops.", op,
               ": `soft_tokens` must have the dtype of `inputs_embeds` (", dtype_name(embeds.scalar_type()), "), got ",
               dtype_name(soft.scalar_type()), " (the wrapper vitops.merge_soft_tokens casts it)");
  check_same_device(op, "inputs_embeds", embeds, "soft_tokens", soft);
  check_indices(op, g, indices, "inputs_embeds", embeds);
  VITOPS_CHECK(g.soft == soft.size(0), "vitops.", op, ": `indices` must have one entry per row of `soft_tokens` ([",
               soft.size(0), "]), got ", shape_str(indices));
  check_shape_fits(op, "the output", sizes_of(embeds));
  return g;
}

inline MergeGeometry check_merge_backward(const char* op, const Tensor& grad_output, const Tensor& indices,
                                          bool allow_double) {
  MergeGeometry g = rows_of(op, "grad_output", grad_output);
  check_float(op, "grad_output", grad_output, allow_double);
  check_indices(op, g, indices, "grad_output", grad_output);
  check_shape_fits(op, "grad_inputs_embeds", sizes_of(grad_output));
  check_shape_fits(op, "grad_soft_tokens", {g.soft, g.hidden});
  return g;
}

// CPU: the rows the soft tokens write, as (row, j) pairs sorted by row, after checking every index
// (in position order: the first bad position is the one reported). An index >= rows and a row
// written twice are errors; negative indices are skipped. Scratch memory is proportional to N, not
// to the row count (an empty [rows, 0] input may have any number of rows).
template <typename index_t>
std::vector<std::pair<int64_t, int64_t>> checked_targets(const char* op, const index_t* indices,
                                                         const MergeGeometry& g) {
  int64_t valid = 0;
  for (int64_t j = 0; j < g.soft; ++j) {
    const int64_t row = static_cast<int64_t>(indices[j]);
    VITOPS_CHECK(row < g.rows, "vitops.", op, ": `indices` must hold row indices below the row count ", g.rows,
                 " of the embeddings (negative: skipped), got indices[", j, "] = ", row);
    valid += row >= 0;
  }
  auto targets = scratch_vector<std::pair<int64_t, int64_t>>(op, "the merge targets", valid);
  int64_t k = 0;
  for (int64_t j = 0; j < g.soft; ++j) {
    const int64_t row = static_cast<int64_t>(indices[j]);
    if (row >= 0) targets[k++] = {row, j};
  }
  std::sort(targets.begin(), targets.end());  // by row, then position: unique pairs, so deterministic
  // Of all rows written twice, report the one whose second writer comes first in position order.
  int64_t first = -1, second = -1;
  for (size_t i = 1; i < targets.size(); ++i)
    if (targets[i].first == targets[i - 1].first && (second < 0 || targets[i].second < second)) {
      first = targets[i - 1].second;
      second = targets[i].second;
    }
  VITOPS_CHECK(second < 0, "vitops.", op, ": `indices` must address each row at most once, but indices[", first,
               "] and indices[", second, "] are both ", second < 0 ? 0 : static_cast<int64_t>(indices[second]));
  return targets;
}

}  // namespace vitops::merge

// The CPU pooling kernels of avg_pool_by_positions and avg_pool_scale_standardize (the latter with an
// active Epilogue). A first pass (parallel over images) turns positions into slots and validates
// them; the forward then buckets each image's patches by slot (a stable counting sort, so patch
// order is kept) and sums every (image, slot) output row on its own thread, in increasing patch
// order: the result does not depend on the thread count, so it is bitwise reproducible.
#pragma once

#include <algorithm>
#include <vector>

#include "kernels/pool/pool.h"

namespace vitops::pool::cpu {

// Images per parallel task: small problems stay on the calling thread (waking the pool costs more
// than scanning a few thousand positions).
inline int64_t image_grain(int64_t seq_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(seq_len, 1)); }

// slots[b * L + l] = slot of patch l of image b, or kSkip for padding. Raises (on the calling
// thread: errors are recorded per image inside the parallel region and reported afterwards) for
// a negative non-padding coordinate or a slot >= length.
template <typename index_t>
std::vector<int64_t> compute_slots(const Tensor& positions_contig, const Geometry& g, const char* op) {
  const index_t* pos = positions_contig.const_data_ptr<index_t>();
  const int64_t L = g.seq_len;
  std::vector<int64_t> slots = scratch_vector<int64_t>(op, "patch slots", checked_mul(op, "B * L", g.batch, L));
  // First offending patch per image (L when none), plus what was wrong with it.
  std::vector<int64_t> bad_patch = scratch_vector<int64_t>(op, "per-image errors", g.batch, L);
  std::vector<int64_t> bad_kind = scratch_vector<int64_t>(op, "per-image errors", g.batch, kSkip);
  torch::stable::parallel_for(0, g.batch, image_grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const index_t* p = pos + b * L * 2;
      int64_t max_x = 0;
      for (int64_t l = 0; l < L; ++l) max_x = std::max(max_x, clamped_x_for_width(p[2 * l], p[2 * l + 1]));
      const int64_t pooled_w = pooled_width(max_x, g.kernel);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t s = slot_of(p[2 * l], p[2 * l + 1], pooled_w, g.kernel, g.length);
        if (s < kSkip && bad_patch[b] == L) {
          bad_patch[b] = l;
          bad_kind[b] = s;
        }
        slots[b * L + l] = s;
      }
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {
    if (bad_patch[b] == L) continue;
    const int64_t l = bad_patch[b];
    const int64_t px = pos[(b * L + l) * 2], py = pos[(b * L + l) * 2 + 1];
    VITOPS_CHECK(bad_kind[b] != kNegativeCoordinate, "vitops.", op, ": `positions_xy`[", b, ", ", l, "] = (", px,
                 ", ", py, ") has a negative coordinate but is not the padding marker (-1, -1)");
    VITOPS_CHECK(false, "vitops.", op, ": `positions_xy`[", b, ", ", l, "] = (", px, ", ", py,
                 ") maps to a slot >= length (", g.length, ") with pooling kernel k = ", g.kernel);
  }
  return slots;
}

inline std::vector<int64_t> slots_for(const Tensor& positions, const Geometry& g, const char* op) {
  const Tensor pos = as_contiguous(positions);
  return VITOPS_DISPATCH_INDEX(pos.scalar_type(), "avg_pool_by_positions_slots",
                               [&] { return compute_slots<index_t>(pos, g, op); });
}

// x with unit stride along D (rows may be strided; only a strided D is copied).
inline Tensor unit_stride_rows(const Tensor& t) { return t.stride(2) == 1 ? t : torch::stable::contiguous(t); }

template <typename scalar_t>
void pool_forward(const char* op, const Tensor& x, const std::vector<int64_t>& slots, const Geometry& g, Tensor& out,
                  Tensor& mask, const Epilogue& epilogue) {
  using acc = acc_t<scalar_t>;
  const int64_t B = g.batch, L = g.seq_len, D = g.dim, S = g.length;
  // The float32 (float64 for double) weight 1/k², as HF's one_hot(...).float() / k² holds it.
  const acc weight = acc(1) / acc(g.kernel * g.kernel);
  // Stable counting sort of each image's patches by slot: slot s of image b owns
  // order[b*L + begin[b*(S+1)+s] .. begin[b*(S+1)+s+1]), in increasing patch order.
  std::vector<int64_t> begin =
      scratch_vector<int64_t>(op, "slot offsets", checked_mul(op, "B * (length + 1)", B, S + 1), 0);
  std::vector<int64_t> order = scratch_vector<int64_t>(op, "patch order", B * L);  // B * L checked by compute_slots
  torch::stable::parallel_for(0, B, image_grain(L), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* start = begin.data() + b * (S + 1);
      const int64_t* slot = slots.data() + b * L;
      for (int64_t l = 0; l < L; ++l)
        if (slot[l] >= 0) ++start[slot[l] + 1];
      for (int64_t s = 0; s < S; ++s) start[s + 1] += start[s];
      std::vector<int64_t> fill(start, start + S);
      for (int64_t l = 0; l < L; ++l)
        if (slot[l] >= 0) order[b * L + fill[slot[l]]++] = l;
    }
  });
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xs_b = x.stride(0), xs_l = x.stride(1);
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  bool* mp = mask.mutable_data_ptr<bool>();
  // Enough rows per task to amortise scheduling when D is small.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, B * S, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc> sum(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / S, s = r % S;
      const int64_t* start = begin.data() + b * (S + 1);
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t i = start[s]; i < start[s + 1]; ++i) {
        const scalar_t* row = xp + b * xs_b + order[b * L + i] * xs_l;
        for (int64_t d = 0; d < D; ++d) sum[d] += widen(row[d]) * weight;
      }
      scalar_t* dst = out_data + r * D;
      if (epilogue.active) {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(finish_pooled<scalar_t>(sum[d], epilogue, d));
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(sum[d]);
      }
      mp[r] = start[s + 1] > start[s];
    }
  });
}

// grad_x[b, l, :] = grad_output[b, slot(b, l), :] (through the epilogue) * (1/k²), zero for padding;
// one row per task step.
template <typename scalar_t>
void pool_backward(const Tensor& grad, const std::vector<int64_t>& slots, const Geometry& g, Tensor& grad_x,
                   const Epilogue& epilogue) {
  using acc = acc_t<scalar_t>;
  const int64_t L = g.seq_len, D = g.dim;
  const acc weight = acc(1) / acc(g.kernel * g.kernel);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t gs_b = grad.stride(0), gs_s = grad.stride(1);
  scalar_t* dp = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, g.batch * L, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* dst = dp + r * D;
      const int64_t s = slots[r];
      if (s < 0) {
        std::fill(dst, dst + D, scalar_t(0));
        continue;
      }
      const scalar_t* src = gp + (r / L) * gs_b + s * gs_s;
      if (epilogue.active) {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(unfinish_grad(widen(src[d]), epilogue, d) * weight);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = narrow<scalar_t>(widen(src[d]) * weight);
      }
    }
  });
}

}  // namespace vitops::pool::cpu

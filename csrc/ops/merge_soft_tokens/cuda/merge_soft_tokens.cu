// merge_soft_tokens on CUDA, with no host synchronisation (so no error can be raised for index
// values) and deterministic results:
//   1. the inverse map inv[rows] (int32, filled with -1) receives, by integer atomicMax, the largest
//      position j whose index addresses each row; negative indices and indices >= rows are skipped;
//   2. one pass over the output rows, a warp per row: out[t] = inv[t] >= 0 ? soft[inv[t]] : embeds[t].
// The backward builds the same map and splits the output gradient in one launch: the rows of
// grad_inputs_embeds are grad_output's with the written rows zeroed, and grad_soft_tokens[j] is
// grad_output[indices[j]] where j won its row, zero otherwise (skipped or a duplicate's loser).
// Rows are copied as raw words (the op moves values, it computes nothing): 16-byte words when
// every pointer and the row length allow, else 8, 4 or the element's own 2 or 4 bytes.
#include "../merge_soft_tokens.h"
#include "vitops/cuda_utils.cuh"

namespace vitops::merge {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxGrid = 65535;

__global__ void inverse_map_kernel(const void* indices, ValueKind kind, int64_t soft, int64_t rows, int32_t* inv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < soft; j += stride) {
    const int64_t row = load_index_as_int64(indices, kind, j);
    if (row >= 0 && row < rows) atomicMax(inv + row, static_cast<int32_t>(j));
  }
}

// The global warp index and the number of warps of the grid: warp w handles rows w, w + warps, ...
struct WarpRows {
  int64_t first, step;
  int lane;
};

__device__ __forceinline__ WarpRows warp_rows() {
  return {static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32,
          static_cast<int64_t>(gridDim.x) * kWarpsPerBlock, static_cast<int>(threadIdx.x % 32)};
}

// dst[0, words) = src[0, words), or zeros when src is null; one warp, lanes strided by word.
template <typename Word>
__device__ __forceinline__ void copy_row(Word* dst, const Word* src, int64_t words, int lane) {
  for (int64_t c = lane; c < words; c += 32) dst[c] = src != nullptr ? src[c] : Word{};
}

template <typename Word>
__global__ void merge_rows_kernel(const Word* embeds, const Word* soft, const int32_t* inv, int64_t rows, int64_t words,
                                  Word* out) {
  const WarpRows w = warp_rows();
  for (int64_t t = w.first; t < rows; t += w.step) {
    const int32_t j = inv[t];
    copy_row(out + t * words, j >= 0 ? soft + static_cast<int64_t>(j) * words : embeds + t * words, words, w.lane);
  }
}

// Rows [0, rows) of grad_embeds, then rows [0, soft) of grad_soft, as one range of warp rows.
template <typename Word>
__global__ void split_grad_kernel(const Word* grad, const void* indices, ValueKind kind, const int32_t* inv,
                                  int64_t rows, int64_t soft, int64_t words, Word* grad_embeds, Word* grad_soft) {
  const WarpRows w = warp_rows();
  for (int64_t r = w.first; r < rows + soft; r += w.step) {
    if (r < rows) {
      copy_row(grad_embeds + r * words, inv[r] >= 0 ? nullptr : grad + r * words, words, w.lane);
    } else {
      const int64_t j = r - rows;
      const int64_t row = load_index_as_int64(indices, kind, j);
      const bool won = row >= 0 && row < rows && inv[row] == j;
      copy_row(grad_soft + j * words, won ? grad + row * words : nullptr, words, w.lane);
    }
  }
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, per_block), kMaxGrid)));
}

// The inverse map of `indices` over `rows` rows (see the file comment), on the current stream.
Tensor inverse_map(const Tensor& like, const Tensor& indices, const MergeGeometry& g, cudaStream_t stream) {
  Tensor inv = new_empty(like, {g.rows}, ScalarType::Int);
  if (g.rows == 0) return inv;
  const cudaError_t err = cudaMemsetAsync(inv.mutable_data_ptr(), 0xFF, static_cast<size_t>(g.rows) * sizeof(int32_t),
                                          stream);  // every byte 0xFF: -1
  VITOPS_CHECK(err == cudaSuccess, "vitops: cudaMemsetAsync failed: ", cudaGetErrorString(err));
  if (g.soft == 0) return inv;
  VITOPS_LAUNCH(grid_for(g.soft, kThreads), kThreads, 0, stream, inverse_map_kernel)(
      indices.const_data_ptr(), g.index_kind, g.soft, g.rows, inv.mutable_data_ptr<int32_t>());
  VITOPS_CUDA_CHECK_LAUNCH();
  return inv;
}

// The widest word (16, 8, 4 bytes, else the element) that every pointer and the row length allow.
int word_bytes(int64_t elem_bytes, int64_t hidden, std::initializer_list<const void*> pointers) {
  for (int bytes : {16, 8, 4})
    if (bytes > elem_bytes && vector_fits(static_cast<int>(bytes / elem_bytes), elem_bytes, pointers, {hidden}))
      return bytes;
  return static_cast<int>(elem_bytes);
}

// Calls f(Word{}) with the unsigned word type of `bytes` bytes.
template <typename F>
void with_word(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(Vec<uint32_t, 4>{}); break;
    case 8: f(Vec<uint32_t, 2>{}); break;
    case 4: f(uint32_t{}); break;
    default: f(uint16_t{}); break;
  }
}

template <typename Word>
const Word* words_of(const Tensor& t) {
  return static_cast<const Word*>(t.const_data_ptr());
}
template <typename Word>
Word* words_of(Tensor& t) {
  return static_cast<Word*>(t.mutable_data_ptr());
}

Tensor merge_soft_tokens_cuda(const Tensor& embeds_arg, const Tensor& soft_arg, const Tensor& indices_arg) {
  const char* op = "merge_soft_tokens";
  const MergeGeometry g = check_merge(op, embeds_arg, soft_arg, indices_arg, /*allow_double=*/false);
  CudaDeviceGuard guard(embeds_arg.get_device());
  Tensor out = new_empty(embeds_arg, sizes_of(embeds_arg), embeds_arg.scalar_type());
  if (g.rows == 0 || g.hidden == 0) return out;
  const Tensor embeds = as_contiguous(embeds_arg), soft = as_contiguous(soft_arg), indices = as_contiguous(indices_arg);
  cudaStream_t stream = current_cuda_stream(embeds.get_device());
  const Tensor inv = inverse_map(embeds, indices, g, stream);
  const int64_t elem = static_cast<int64_t>(embeds.element_size());
  const int bytes = word_bytes(elem, g.hidden, {embeds.const_data_ptr(), soft.const_data_ptr(), out.const_data_ptr()});
  const int64_t words = g.hidden * elem / bytes;
  with_word(bytes, [&](auto word) {
    using Word = decltype(word);
    VITOPS_LAUNCH(grid_for(g.rows, kWarpsPerBlock), kThreads, 0, stream, merge_rows_kernel<Word>)(
        words_of<Word>(embeds), words_of<Word>(soft), inv.const_data_ptr<int32_t>(), g.rows, words, words_of<Word>(out));
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return out;
}

std::tuple<Tensor, Tensor> merge_soft_tokens_backward_cuda(const Tensor& grad_arg, const Tensor& indices_arg) {
  const char* op = "_merge_soft_tokens_backward";
  const MergeGeometry g = check_merge_backward(op, grad_arg, indices_arg, /*allow_double=*/false);
  CudaDeviceGuard guard(grad_arg.get_device());
  Tensor grad_embeds = new_empty(grad_arg, sizes_of(grad_arg), grad_arg.scalar_type());
  Tensor grad_soft = new_empty(grad_arg, {g.soft, g.hidden}, grad_arg.scalar_type());
  if (g.hidden == 0 || g.rows + g.soft == 0) return {grad_embeds, grad_soft};
  const Tensor grad = as_contiguous(grad_arg), indices = as_contiguous(indices_arg);
  cudaStream_t stream = current_cuda_stream(grad.get_device());
  const Tensor inv = inverse_map(grad, indices, g, stream);
  const int64_t elem = static_cast<int64_t>(grad.element_size());
  const int bytes = word_bytes(elem, g.hidden,
                               {grad.const_data_ptr(), grad_embeds.const_data_ptr(), grad_soft.const_data_ptr()});
  const int64_t words = g.hidden * elem / bytes;
  with_word(bytes, [&](auto word) {
    using Word = decltype(word);
    VITOPS_LAUNCH(grid_for(g.rows + g.soft, kWarpsPerBlock), kThreads, 0, stream, split_grad_kernel<Word>)(
        words_of<Word>(grad), indices.const_data_ptr(), g.index_kind, inv.const_data_ptr<int32_t>(), g.rows, g.soft,
        words, words_of<Word>(grad_embeds), words_of<Word>(grad_soft));
  });
  VITOPS_CUDA_CHECK_LAUNCH();
  return {grad_embeds, grad_soft};
}

}  // namespace
}  // namespace vitops::merge

VITOPS_CUDA_KERNELS(m) {
  m.impl("merge_soft_tokens", TORCH_BOX(&vitops::merge::merge_soft_tokens_cuda));
  m.impl("_merge_soft_tokens_backward", TORCH_BOX(&vitops::merge::merge_soft_tokens_backward_cuda));
}

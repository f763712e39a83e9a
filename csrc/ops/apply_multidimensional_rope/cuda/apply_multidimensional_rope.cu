// apply_multidimensional_rope on CUDA, one launch. A block owns a tile of rows (leading dims x L):
// it first computes every (row, frequency) cos/sin of the tile into shared memory (each sincosf is
// done once and reused by all H heads), then its threads sweep (row, head, unit) where a unit is
// VEC consecutive rotated pairs (VEC elements of the `a` half and the matching VEC of the `b` half)
// or VEC passthrough channels. VEC is 16 bytes of elements when every chunk half, the head dim, the
// input strides and both pointers allow it, else 2 elements, else 1. Inputs are read through their
// row/head strides (Q/K slices of a fused QKV buffer are not copied); the output is contiguous.
// The backward is the same kernel with sin negated (the transposed rotation).
#include <climits>

#include "../apply_multidimensional_rope.h"
#include "vitops/cuda_utils.cuh"
#include "vitops/device_math.h"

namespace vitops::apply_multidimensional_rope {
namespace {

constexpr int kThreads = 256;
constexpr int kTargetUnitsPerBlock = kThreads * 4;  // enough independent loads per thread to hide latency
constexpr int kMaxTileRows = 32;
constexpr int64_t kMaxSharedBytes = 48 * 1024;     // the default dynamic shared memory limit
// Inverse frequencies are computed on the host (glibc powf, as HF computes them on the CPU) and
// passed by value when they fit; wider rotations compute them on the device instead.
constexpr int kMaxTableFreqs = 512;

struct KernelArgs {
  int64_t rows;
  int heads, head_dim;
  rope::LayoutT<int> layout;  // half-split chunks (the launcher bounds every size to int)
  int position_axes;
  int tile_rows;
  ValueKind position_kind;
  bool freqs_in_args;
  float base_frequency, scale, sin_sign;
  RowAddressing in_rows;
  float inv_freq[kMaxTableFreqs];
};

// Row offsets take an even number of int64 slots so the float tables after them start 16-byte
// aligned, which lets a unit read its VEC cos/sin values as float4/float2.
__host__ __device__ inline int row_offset_slots(int tile_rows) { return (tile_rows + 1) & ~1; }

// VEC consecutive floats from shared memory; p is VEC * 4-byte aligned (VEC is 1, 2 or a multiple of 4).
template <int VEC>
__device__ __forceinline__ void load_table(const float* p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
  } else if constexpr (VEC == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x;
    v[1] = f.y;
  } else {
    v[0] = p[0];
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const scalar_t* __restrict__ in, const void* __restrict__ positions, scalar_t* __restrict__ out,
                const __grid_constant__ KernelArgs args) {
  VITOPS_DYNAMIC_SHARED(int64_t, shared);
  const int tile_rows = args.tile_rows;
  int64_t* row_offsets = shared;                                      // [tile_rows]
  const rope::LayoutT<int>& layout = args.layout;
  const int F = layout.num_pairs();                                   // frequencies per row
  float* cos_s = reinterpret_cast<float*>(shared + row_offset_slots(tile_rows));  // [tile_rows, F]
  float* sin_s = cos_s + tile_rows * F;                               // [tile_rows, F]

  const int H = args.heads, hd = args.head_dim;
  const int units_rotated = F / VEC;
  const int units_head = units_rotated + (hd - layout.rotated) / VEC;
  const int units_row = H * units_head;
  const int64_t num_tiles = (args.rows + tile_rows - 1) / tile_rows;

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row0 = tile * tile_rows;
    const int rows_here = static_cast<int>(min(static_cast<int64_t>(tile_rows), args.rows - row0));

    for (int r = threadIdx.x; r < rows_here; r += blockDim.x) row_offsets[r] = args.in_rows.offset(row0 + r);
    for (int t = threadIdx.x; t < rows_here * F; t += blockDim.x) {
      const int r = t / F, k = t - r * F;
      const int chunk = layout.chunk_of_pair(k);
      const float p = load_as<float>(positions, args.position_kind, (row0 + r) * args.position_axes + chunk);
      const float inv_freq =
          args.freqs_in_args ? args.inv_freq[k] : rope::inverse_frequency<float>(layout, k, args.base_frequency);
      const float angle = (p * inv_freq) * args.scale;
      float s, c;
      // The precise version (no fast-math intrinsics). A non-finite angle (NaN/inf or huge positions,
      // which the CPU kernel rejects) gives NaN cos/sin and so NaN rows, never a bad access.
      sincosf(angle, &s, &c);
      // Rounded to the input dtype before use, as HF's cos.to(x.dtype) / sin.to(x.dtype).
      cos_s[t] = static_cast<float>(static_cast<scalar_t>(c));
      sin_s[t] = args.sin_sign * static_cast<float>(static_cast<scalar_t>(s));
    }
    __syncthreads();

    const int work = rows_here * units_row;  // the host keeps tile_rows * units_row below INT_MAX
    for (int t = threadIdx.x; t < work; t += blockDim.x) {
      const int r = t / units_row;
      const int rem = t - r * units_row;
      const int h = rem / units_head;
      const int unit = rem - h * units_head;
      const scalar_t* src = in + row_offsets[r] + static_cast<int64_t>(h) * args.in_rows.head_stride;
      scalar_t* dst = out + ((row0 + r) * H + h) * static_cast<int64_t>(hd);
      if (unit < units_rotated) {
        const int k0 = unit * VEC;  // VEC divides every chunk half, so all VEC pairs share a chunk
        const int start = layout.channel_a(k0), partner = layout.channel_b(k0);  // half-split: VEC-wide runs
        const Vec<scalar_t, VEC> a = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + start);
        const Vec<scalar_t, VEC> b = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + partner);
        // F and k0 are multiples of VEC, so these reads are VEC-float aligned.
        float cs[VEC], sn[VEC];
        load_table<VEC>(cos_s + r * F + k0, cs);
        load_table<VEC>(sin_s + r * F + k0, sn);
        Vec<scalar_t, VEC> out_a, out_b;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float av = static_cast<float>(a.v[j]), bv = static_cast<float>(b.v[j]);
          // Each product rounded on its own (no FMA contraction), as the CPU kernel and the
          // reference compute them.
          out_a.v[j] = static_cast<scalar_t>(rope::rotated_a(av, bv, cs[j], sn[j]));
          out_b.v[j] = static_cast<scalar_t>(rope::rotated_b(av, bv, cs[j], sn[j]));
        }
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + start) = out_a;
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + partner) = out_b;
      } else {
        const int offset = layout.rotated + (unit - units_rotated) * VEC;
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + offset) =
            *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + offset);
      }
    }
    __syncthreads();  // the next tile overwrites the shared tables
  }
}

// Whether VEC-element vectors keep every access aligned: the chunk halves, the head dim, the input
// row/head strides and both base pointers must all be multiples of VEC elements.
template <typename scalar_t>
bool vectorizable(int vec, const Geometry& g, const RowAddressing& rows, const void* in, const void* out) {
  bool ok = vector_fits(vec, sizeof(scalar_t), {in, out},
                        {g.head_dim, rows.head_stride, g.layout.chunk_width / 2, g.layout.last_width / 2});
  for (int i = 0; i < rows.num_dims; ++i) ok = ok && rows.strides[i] % vec == 0;
  return ok;
}

template <typename scalar_t>
void launch(const scalar_t* in, const RowAddressing& rows, const Tensor& positions, scalar_t* out, const Geometry& g,
            double base_frequency, double scale_factor, bool transpose, cudaStream_t stream, const char* op) {
  constexpr int kVec16 = 16 / sizeof(scalar_t);
  const int vec = vectorizable<scalar_t>(kVec16, g, rows, in, out) ? kVec16
                  : vectorizable<scalar_t>(2, g, rows, in, out)    ? 2
                                                                    : 1;
  const int64_t F = g.layout.num_pairs();
  const int64_t units_row = g.heads * ((F + (g.head_dim - g.layout.rotated)) / vec);
  VITOPS_CHECK(units_row < INT_MAX - kThreads && g.heads * g.head_dim < INT_MAX, "vitops.", op, ": H * hd = ",
               g.heads * g.head_dim, " is too large for the CUDA kernel");
  int64_t tile_rows = std::min<int64_t>({int64_t{kMaxTileRows}, ceil_div(kTargetUnitsPerBlock, units_row), g.rows});
  // The sweep index t = threadIdx.x + i * blockDim.x is an int: keep t + blockDim.x below INT_MAX too.
  tile_rows = std::max<int64_t>(1, std::min<int64_t>(tile_rows, (INT_MAX - kThreads) / units_row));
  auto shared_bytes = [&](int64_t t) {
    return row_offset_slots(static_cast<int>(t)) * static_cast<int64_t>(sizeof(int64_t)) +
           t * static_cast<int64_t>(2 * sizeof(float) * F);
  };
  while (tile_rows > 1 && shared_bytes(tile_rows) > kMaxSharedBytes) --tile_rows;
  VITOPS_CHECK(shared_bytes(tile_rows) <= kMaxSharedBytes, "vitops.", op, ": ", F,
               " rotated pairs per head need more shared memory than the CUDA kernel may use");

  KernelArgs args{};
  args.rows = g.rows;
  args.heads = static_cast<int>(g.heads);
  args.head_dim = static_cast<int>(g.head_dim);
  args.layout = g.layout.as<int>();
  args.position_axes = static_cast<int>(g.position_axes);
  args.tile_rows = static_cast<int>(tile_rows);
  VITOPS_CHECK(value_kind_of(positions.scalar_type(), &args.position_kind), "vitops.", op,
               ": `positions` must be int32, int64, float32 or float64, got ", dtype_name(positions.scalar_type()));
  args.base_frequency = static_cast<float>(base_frequency);
  args.scale = static_cast<float>(scale_factor);
  args.sin_sign = transpose ? -1.0f : 1.0f;
  args.in_rows = rows;
  args.freqs_in_args = F <= kMaxTableFreqs;
  if (args.freqs_in_args) {
    const std::vector<float> inv = rope::inverse_frequencies<float>(g.layout, base_frequency);
    for (int64_t k = 0; k < F; ++k) args.inv_freq[k] = inv[k];
  }

  const int64_t num_tiles = ceil_div(g.rows, tile_rows);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(num_tiles, INT_MAX));
  const size_t smem = static_cast<size_t>(shared_bytes(tile_rows));
  const void* pos = positions.const_data_ptr();
  switch (vec) {
    case kVec16:
      VITOPS_LAUNCH(blocks, kThreads, smem, stream, rope_kernel<scalar_t, kVec16>)(in, pos, out, args);
      break;
    case 2:
      VITOPS_LAUNCH(blocks, kThreads, smem, stream, rope_kernel<scalar_t, 2>)(in, pos, out, args);
      break;
    default:
      VITOPS_LAUNCH(blocks, kThreads, smem, stream, rope_kernel<scalar_t, 1>)(in, pos, out, args);
  }
  VITOPS_CUDA_CHECK_LAUNCH();
}

Tensor run(const char* op, const char* what, const Tensor& inputs, const Tensor& positions, double base_frequency,
           std::optional<double> rotary_fraction, double scale_factor, bool transpose) {
  const Geometry g = check_and_plan(op, what, inputs, positions, base_frequency, rotary_fraction, scale_factor,
                                    /*allow_double=*/false);
  CudaDeviceGuard guard(inputs.get_device());
  Tensor out = new_empty(inputs, sizes_of(inputs), inputs.scalar_type());
  if (out.numel() == 0) return out;
  RowAddressing rows;
  const Tensor src = readable_view(inputs, rows);
  const Tensor pos = as_contiguous(positions);
  cudaStream_t stream = current_cuda_stream(inputs.get_device());
  VITOPS_DISPATCH_CUDA_FLOATING(inputs.scalar_type(), "apply_multidimensional_rope_cuda", [&] {
    launch<scalar_t>(src.const_data_ptr<scalar_t>(), rows, pos, out.mutable_data_ptr<scalar_t>(), g, base_frequency,
                     scale_factor, transpose, stream, op);
  });
  return out;
}

Tensor rope_cuda(const Tensor& inputs, const Tensor& positions, double base_frequency,
                 std::optional<double> rotary_fraction, double scale_factor) {
  return run("apply_multidimensional_rope", "inputs", inputs, positions, base_frequency, rotary_fraction,
             scale_factor, /*transpose=*/false);
}

Tensor rope_backward_cuda(const Tensor& grad_output, const Tensor& positions, double base_frequency,
                          std::optional<double> rotary_fraction, double scale_factor) {
  return run("_apply_multidimensional_rope_backward", "grad_output", grad_output, positions, base_frequency,
             rotary_fraction, scale_factor, /*transpose=*/true);
}

}  // namespace
}  // namespace vitops::apply_multidimensional_rope

VITOPS_CUDA_KERNELS(m) {
  m.impl("apply_multidimensional_rope", TORCH_BOX(&vitops::apply_multidimensional_rope::rope_cuda));
  m.impl("_apply_multidimensional_rope_backward", TORCH_BOX(&vitops::apply_multidimensional_rope::rope_backward_cuda));
}

// Batch-1 and small-batch (2..16 tokens) SpQR matvec: out = x W^T + bias, W read packed.
//
// Grid: one block of kWarps warps per kRowsPerBlock output rows; each warp owns kRowsPerWarp
// rows. The input is walked in tiles of 1024 permuted columns: the block gathers the tile of
// activations through `perm` (the fused permutation) into shared memory as float32, then lane
// l of every warp decodes chunk l of the tile (32 codes = BITS words, see decode_tile.h) of
// each of its rows once and multiplies it with all BT activation rows (the small-batch reuse).
// Outliers (CSR) are added afterwards, strided over the lanes, reading activations from global
// memory; each lane's float32 partial sums are reduced with warp shuffles.
//
// Shared memory is one tile, BT * 32 * 33 floats (padded: conflict-free writes and reads), so
// any in_features up to the format's 65536 works; BT = 16 needs 66 KB, above the default 48 KB
// per block, and is enabled with cudaFuncAttributeMaxDynamicSharedMemorySize (sm_80+ allow 99+ KB).
#include <cuda_runtime.h>

#include "act_types.cuh"
#include "launch.h"
#include "spqr_hf/decode_tile.h"

namespace spqr_hf {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kTileChunks = 32;                       // one chunk per lane
constexpr int kTileCols = kTileChunks * kChunkCodes;  // 1024 permuted columns per tile
constexpr int kPaddedChunks = kTileChunks + 1;        // smem row pitch (bank-conflict padding)

template <int BT>
constexpr size_t tile_smem_bytes() {
  return sizeof(float) * BT * kChunkCodes * kPaddedChunks;
}

// Activation b, code i of this lane's chunk, from the shared-memory tile.
template <int BT>
struct SharedTileX {
  const float* tile;
  int lane;
  __device__ __forceinline__ float operator()(int b, int i) const {
    return tile[(b * kChunkCodes + i) * kPaddedChunks + lane];
  }
};

// 16-bit activation at `index` as float32; the type is a uniform runtime flag rather than a
// template parameter, which halves the instantiations (compile time) at the cost of a select.
__device__ __forceinline__ float load_act16(const uint16_t* x, int64_t index, bool bf16) {
  const uint16_t bits = x[index];
  return bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16) : __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ uint16_t float_to_act16(float value, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(value)) : __half_as_ushort(__float2half_rn(value));
}

// Activation b at permuted column `col`, from global memory (outliers only).
struct GlobalPermutedX {
  const uint16_t* x;
  const uint16_t* perm;
  int32_t n;
  int batch;
  bool bf16;
  __device__ __forceinline__ float operator()(int b, int32_t col) const {
    return b < batch ? load_act16(x, static_cast<int64_t>(b) * n + perm[col], bf16) : 0.0f;
  }
};

template <int BITS, int BT>
__global__ void __launch_bounds__(kThreads) matvec_kernel(PackedView view, const uint16_t* __restrict__ x, int batch,
                                                          bool bf16, const float* __restrict__ bias,
                                                          uint16_t* __restrict__ out) {
  extern __shared__ float tile[];  // [BT][32 codes][33 chunks]
  const LayerDecoder dec = make_layer_decoder(view);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int32_t m = view.out_features;
  const int32_t n = view.in_features;
  const int32_t first_row = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;

  int32_t row_chunk[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row_chunk[r] = (first_row + r) / dec.qq_groupsize;

  float acc[kRowsPerWarp][BT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[r][b] = 0.0f;
  }

  const int32_t n_tiles = (n + kTileCols - 1) / kTileCols;
  for (int32_t t = 0; t < n_tiles; ++t) {
    __syncthreads();  // the previous tile has been consumed by every warp
    for (int idx = threadIdx.x; idx < BT * kTileCols; idx += kThreads) {
      const int b = idx / kTileCols;
      const int c = idx % kTileCols;
      const int32_t k = t * kTileCols + c;
      float value = 0.0f;
      if (b < batch && k < n) value = load_act16(x, static_cast<int64_t>(b) * n + view.perm[k], bf16);
      tile[(b * kChunkCodes + c % kChunkCodes) * kPaddedChunks + c / kChunkCodes] = value;
    }
    __syncthreads();
    const int32_t chunk = t * kTileChunks + lane;
    if (chunk * kChunkCodes < n) {
      const SharedTileX<BT> x_at{tile, lane};
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (first_row + r < m) chunk_dot<BITS, BT>(dec, first_row + r, row_chunk[r], chunk, x_at, acc[r]);
      }
    }
  }

  const GlobalPermutedX x_global{x, view.perm, n, batch, bf16};
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int32_t row = first_row + r;
    if (row >= m) continue;  // warp-uniform
    outlier_dot<BT>(view, row, lane, 32, x_global, acc[r]);
    const float row_bias = bias ? bias[row] : 0.0f;
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      float sum = acc[r][b];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (lane == 0 && b < batch) out[static_cast<int64_t>(b) * m + row] = float_to_act16(sum + row_bias, bf16);
    }
  }
}

template <int BITS, int BT>
LaunchResult launch_matvec(const PackedView& view, const uint16_t* x, int batch, bool bf16, const float* bias,
                           uint16_t* out, cudaStream_t stream) {
  constexpr size_t smem = tile_smem_bytes<BT>();
  auto kernel = matvec_kernel<BITS, BT>;
  if (smem > 48 * 1024) {
    // Opt in to more than 48 KB of dynamic shared memory (once per instantiation is enough,
    // but the call is cheap and per-device state makes caching subtle).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return {kLaunchFailed, cudaGetErrorString(err)};
  }
  const unsigned blocks = static_cast<unsigned>((view.out_features + kRowsPerBlock - 1) / kRowsPerBlock);
  kernel<<<blocks, kThreads, smem, stream>>>(view, x, batch, bf16, bias, out);
  return launch_status();
}

template <int BITS>
LaunchResult dispatch_batch(const PackedView& view, const uint16_t* x, int batch, bool bf16, const float* bias,
                            uint16_t* out, cudaStream_t stream) {
  switch (matvec_batch_tile(batch)) {  // shared with the host harness
    case 1: return launch_matvec<BITS, 1>(view, x, batch, bf16, bias, out, stream);
    case 2: return launch_matvec<BITS, 2>(view, x, batch, bf16, bias, out, stream);
    case 4: return launch_matvec<BITS, 4>(view, x, batch, bf16, bias, out, stream);
    case 8: return launch_matvec<BITS, 8>(view, x, batch, bf16, bias, out, stream);
    default: return launch_matvec<BITS, 16>(view, x, batch, bf16, bias, out, stream);
  }
}

LaunchResult dispatch_bits(const PackedView& view, const uint16_t* x, int batch, bool bf16, const float* bias,
                           uint16_t* out, cudaStream_t stream) {
  switch (view.bits) {
    case 2: return dispatch_batch<2>(view, x, batch, bf16, bias, out, stream);
    case 3: return dispatch_batch<3>(view, x, batch, bf16, bias, out, stream);
    case 4: return dispatch_batch<4>(view, x, batch, bf16, bias, out, stream);
    case 5: return dispatch_batch<5>(view, x, batch, bf16, bias, out, stream);
    case 6: return dispatch_batch<6>(view, x, batch, bf16, bias, out, stream);
    case 7: return dispatch_batch<7>(view, x, batch, bf16, bias, out, stream);
    case 8: return dispatch_batch<8>(view, x, batch, bf16, bias, out, stream);
    default: return invalid("bits must be in 2..8");
  }
}

}  // namespace

LaunchResult matvec(const PackedView& view, const void* x, int batch, const float* bias, void* out, ActType type,
                    cudaStream_t stream) {
  if (const char* why = check_view(view)) return invalid(why);
  if (batch < 1 || batch > kMaxMatvecBatch) return invalid("matvec batch must be in 1..16");
  if (!x || !out) return invalid("activation and output pointers must not be null");
  if (type != ActType::kFloat16 && type != ActType::kBFloat16) {
    return {kUnsupported, "the matvec kernels take float16 or bfloat16 activations (float32 uses dequantize + GEMM)"};
  }
  return dispatch_bits(view, static_cast<const uint16_t*>(x), batch, type == ActType::kBFloat16, bias,
                       static_cast<uint16_t*>(out), stream);
}

}  // namespace cuda
}  // namespace spqr_hf

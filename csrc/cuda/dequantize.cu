// Large-batch path, part 1: dequantize the packed weight into a dense workspace (then the op
// glue runs one GEMM, cuBLAS through torch, on tensor cores), and gather activation columns.
//
// One thread per (row, chunk of 32 permuted columns): decode the chunk with the shared
// decode_tile.h code, add that chunk's outliers in float32 exactly as the reference does, and
// store it as the workspace type. The workspace keeps the *permuted* column order, so rows are
// written contiguously (coalesced); the activations are permuted instead (permute_columns),
// which costs batch * n reads rather than a scattered m * n write.
#include <cuda_runtime.h>

#include "act_types.cuh"
#include "launch.h"
#include "spqr_hf/decode_tile.h"

namespace spqr_hf {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Stores 32 decoded values at dst[0..count) as T; 16-byte vector stores when the whole chunk
// is in range and aligned (the common case: n a multiple of 8 for 16-bit types, 4 for fp32).
template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, const float (&w)[kChunkCodes], int count) {
  constexpr int kPerVector = 16 / sizeof(T);
  if (count == kChunkCodes && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
#pragma unroll
    for (int v = 0; v < kChunkCodes / kPerVector; ++v) {
      union {
        uint4 vec;
        T elems[kPerVector];
      } pack;
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) pack.elems[j] = Act<T>::from_float(w[v * kPerVector + j]);
      reinterpret_cast<uint4*>(dst)[v] = pack.vec;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kChunkCodes; ++i) {
    if (i < count) dst[i] = Act<T>::from_float(w[i]);
  }
}

// The workspace type is a uniform runtime switch rather than a template parameter: one
// instantiation per bit width keeps the CI compile check fast.
template <int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(PackedView view, void* __restrict__ w_perm, ActType type) {
  const LayerDecoder dec = make_layer_decoder(view);
  const int32_t n = view.in_features;
  const int32_t chunks_per_row = (n + kChunkCodes - 1) / kChunkCodes;
  const int64_t total = static_cast<int64_t>(view.out_features) * chunks_per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int32_t row = static_cast<int32_t>(idx / chunks_per_row);
    const int32_t chunk = static_cast<int32_t>(idx % chunks_per_row);
    float w[kChunkCodes];
    dequantize_chunk<BITS>(dec, row, row / dec.qq_groupsize, chunk, w);
    add_chunk_outliers(view, row, chunk, w);
    const int32_t k0 = chunk * kChunkCodes;
    const int64_t offset = static_cast<int64_t>(row) * n + k0;
    const int count = min(kChunkCodes, n - k0);
    switch (type) {
      case ActType::kFloat16: store_chunk(static_cast<__half*>(w_perm) + offset, w, count); break;
      case ActType::kBFloat16: store_chunk(static_cast<__nv_bfloat16*>(w_perm) + offset, w, count); break;
      default: store_chunk(static_cast<float*>(w_perm) + offset, w, count); break;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) permute_columns_kernel(const T* __restrict__ x, int64_t rows, int32_t n,
                                                                   const uint16_t* __restrict__ perm,
                                                                   T* __restrict__ x_perm) {
  const int64_t total = rows * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / n;
    const int32_t k = static_cast<int32_t>(idx % n);
    x_perm[idx] = x[b * n + perm[k]];
  }
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);  // grid-stride beyond
}

template <int BITS>
LaunchResult launch_dequantize(const PackedView& view, void* w_perm, ActType type, cudaStream_t stream) {
  const int64_t chunks = static_cast<int64_t>(view.out_features) * ((view.in_features + kChunkCodes - 1) / kChunkCodes);
  dequantize_kernel<BITS><<<grid_for(chunks), kThreads, 0, stream>>>(view, w_perm, type);
  return launch_status();
}

template <typename T>
LaunchResult launch_permute(const void* x, int64_t rows, int32_t n, const uint16_t* perm, void* x_perm,
                            cudaStream_t stream) {
  permute_columns_kernel<T><<<grid_for(rows * n), kThreads, 0, stream>>>(static_cast<const T*>(x), rows, n, perm,
                                                                          static_cast<T*>(x_perm));
  return launch_status();
}

}  // namespace

LaunchResult dequantize(const PackedView& view, void* w_perm, ActType type, cudaStream_t stream) {
  if (const char* why = check_view(view)) return invalid(why);
  if (!w_perm) return invalid("workspace pointer must not be null");
  if (type != ActType::kFloat16 && type != ActType::kBFloat16 && type != ActType::kFloat32) {
    return {kUnsupported, "unknown activation type"};
  }
  switch (view.bits) {
    case 2: return launch_dequantize<2>(view, w_perm, type, stream);
    case 3: return launch_dequantize<3>(view, w_perm, type, stream);
    case 4: return launch_dequantize<4>(view, w_perm, type, stream);
    case 5: return launch_dequantize<5>(view, w_perm, type, stream);
    case 6: return launch_dequantize<6>(view, w_perm, type, stream);
    case 7: return launch_dequantize<7>(view, w_perm, type, stream);
    case 8: return launch_dequantize<8>(view, w_perm, type, stream);
    default: return invalid("bits must be in 2..8");
  }
}

LaunchResult permute_columns(const void* x, int64_t rows, int32_t n, const uint16_t* perm, void* x_perm,
                             ActType type, cudaStream_t stream) {
  if (rows < 0 || n < 1 || n > kMaxInFeatures) return invalid("permute_columns: rows >= 0 and n in 1..65536 required");
  if (rows == 0) return {kOk, nullptr};
  if (!x || !perm || !x_perm) return invalid("permute_columns: null pointer");
  switch (type) {
    case ActType::kFloat16: return launch_permute<__half>(x, rows, n, perm, x_perm, stream);
    case ActType::kBFloat16: return launch_permute<__nv_bfloat16>(x, rows, n, perm, x_perm, stream);
    case ActType::kFloat32: return launch_permute<float>(x, rows, n, perm, x_perm, stream);
  }
  return {kUnsupported, "unknown activation type"};
}

}  // namespace cuda
}  // namespace spqr_hf

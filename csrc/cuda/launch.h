// Launchers of the SpQR CUDA kernels: raw pointers and a stream in, a status out.
//
// Deliberately free of torch headers (and, outside nvcc, of CUDA headers): the kernels compile
// with plain nvcc in seconds, and the op glue (ops.cpp) that includes this header compiles
// against any torch build. Every launcher validates its arguments first and returns
// kInvalidArgument with a message instead of launching on bad input.
#pragma once

#include <cstdint>

#include "spqr_hf/decode_tile.h"

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // same type as CUDA's own typedef
#endif

namespace spqr_hf {
namespace cuda {

// Activation / output element types the kernels are instantiated for.
enum class ActType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

constexpr int kMaxMatvecBatch = 16;  // larger batches go through dequantize + GEMM

struct LaunchResult {
  int status;           // spqr_hf::Status
  const char* message;  // static string; nullptr when status == kOk
};

// out[b, i] = sum_k W[i, k] x[b, k] + bias[i] for b < batch (1..16), W the packed weight.
// x: [batch, n] contiguous (ActType fp16 / bf16), original column order; out: [batch, m] same
// type; bias: float32 [m] or null. Fused column permutation, bilevel statistics, CSR outliers,
// float32 accumulation; each decoded weight chunk is reused across the batch.
LaunchResult matvec(const PackedView& view, const void* x, int batch, const float* bias, void* out, ActType type,
                    cudaStream_t stream);

// w_perm[i, k] = dequantized W in *permuted* column order ([m, n] contiguous, fp16 / bf16 /
// fp32), outliers included: the workspace of the large-batch path (then a GEMM with the
// column-permuted activations). Bit-identical to pack.dequantize for fp32 output.
LaunchResult dequantize(const PackedView& view, void* w_perm, ActType type, cudaStream_t stream);

// x_perm[b, k] = x[b, perm[k]] for [rows, n] contiguous tensors of `type`.
LaunchResult permute_columns(const void* x, int64_t rows, int32_t n, const uint16_t* perm, void* x_perm,
                             ActType type, cudaStream_t stream);

}  // namespace cuda
}  // namespace spqr_hf

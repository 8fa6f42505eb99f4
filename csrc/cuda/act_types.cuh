// Conversions between the activation types and float32, for the kernels (device code only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace spqr_hf {
namespace cuda {

template <typename T>
struct Act;

template <>
struct Act<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Act<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

// Maps a kernel's status-free launch onto a LaunchResult (launch errors are asynchronous for
// faults inside the kernel, synchronous for bad configurations).
inline LaunchResult launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return {kLaunchFailed, cudaGetErrorString(err)};
  return {kOk, nullptr};
}

inline LaunchResult invalid(const char* message) { return {kInvalidArgument, message}; }

}  // namespace cuda
}  // namespace spqr_hf

// Runtime choice of the CPU kernel table: the best instruction set this CPU supports, unless the
// environment variable SPQR_HF_CPU_ISA (scalar | avx2 | avx512 | avx512bf16 | amx | auto) asks for a specific one.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace spqr_hf {
namespace cpu {

constexpr const char* kIsaEnvVar = "SPQR_HF_CPU_ISA";

// Instruction sets with kernels built into this extension that this CPU can run, best first.
std::vector<std::string> supported_isas();

// Whether this CPU multiplies bfloat16 natively (x86: AVX512_BF16), so torch's bfloat16 GEMM is
// fast. Without it (AVX2-only x86 CPUs) that GEMM ran 5-7x slower than the float32 one on an AMD
// Zen 3 host, so batched calls dequantise to float32 instead (benchmarks/RESULTS.md).
bool cpu_has_native_bf16();

// The table to use now (SPQR_HF_CPU_ISA is read on every call, so tests can switch paths).
// Returns nullptr and sets *error when the variable names an unknown or unsupported ISA.
const KernelTable* select_kernels(std::string* error);

}  // namespace cpu
}  // namespace spqr_hf

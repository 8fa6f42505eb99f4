// AVX-512 (F, BW, VL, DQ) kernels. Built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -mf16c (setup.py); only called after the runtime CPUID check in cpu_features.cpp.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace spqr_hf {
namespace cpu {
namespace isa_avx512 {

#include "spqr_hf/layout.h"

#include "avx512_vector.h"
#include "kernel_body.inc"

}  // namespace isa_avx512

const KernelTable kAvx512Kernels = {"avx512", &isa_avx512::detail::matvec, &isa_avx512::detail::dequant_f32,
                                    &isa_avx512::detail::dequant_bf16, nullptr, nullptr,
                                    &isa_avx2_evex::planes_matvec, &isa_avx2_evex::planes_dequant_t,
                                    &isa_avx2_evex::planes_dequant_t_bf16};

// The same row-stream kernels; the plane kernels of kernels_avx512vnni_planes.cpp (the dot-product kernel
// with int16 levels for batches) on CPUs with AVX512-VNNI and BITALG (Ice Lake and later).
const KernelTable kAvx512VnniKernels = {"avx512vnni", &isa_avx512::detail::matvec, &isa_avx512::detail::dequant_f32,
                                        &isa_avx512::detail::dequant_bf16, nullptr, nullptr,
                                        &isa_avx512vnni_planes::planes_matvec,
                                        &isa_avx512vnni_planes::planes_dequant_t,
                                        &isa_avx512vnni_planes::planes_dequant_t_bf16, true};

}  // namespace cpu
}  // namespace spqr_hf

// The AVX2 kernels built a third time, as namespace isa_avx512bf16_planes, with the avx512bf16 table's
// flags and BITALG (setup.py): the EVEX build's plane kernels (kernels_avx2_evex.cpp) plus plane_dot.inc's
// dot-product matvec for batches (bfloat16 activations by VDPBF16PS, others in int16 levels). Only the
// avx512bf16 table uses them, after its CPUID check.
#define SPQR_HF_AVX2_EVEX
#define SPQR_HF_PLANE_DOT
#define SPQR_HF_AVX2_NAMESPACE isa_avx512bf16_planes
#include "kernels_avx2.cpp"

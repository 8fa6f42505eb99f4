// The AVX2 kernels built once more, as namespace isa_avx512vnni_planes, with the AVX-512 flags plus VNNI
// and BITALG (setup.py): the EVEX build's plane kernels (kernels_avx2_evex.cpp) plus plane_dot.inc's
// dot-product matvec (int16 levels, VPDPWSSD) for batches. Only the avx512vnni table uses them, after its
// CPUID check.
#define SPQR_HF_AVX2_EVEX
#define SPQR_HF_PLANE_DOT
#define SPQR_HF_AVX2_NAMESPACE isa_avx512vnni_planes
#include "kernels_avx2.cpp"

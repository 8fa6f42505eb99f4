// The AVX2 kernels built a second time with the AVX-512 flags too (setup.py), as namespace isa_avx2_evex:
// the same intrinsics, EVEX-encoded, with 32 vector registers instead of 16 (the plane matvec's AVX2 build
// keeps its accumulators on the stack). Only the AVX-512 tables use them, after their CPUID check.
#define SPQR_HF_AVX2_EVEX
#define SPQR_HF_AVX2_NAMESPACE isa_avx2_evex
#include "kernels_avx2.cpp"

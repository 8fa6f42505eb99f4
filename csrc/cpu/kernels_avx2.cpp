// AVX2 + FMA + F16C kernels. Built with -mavx2 -mfma -mf16c (setup.py); only called after the
// runtime CPUID check in cpu_features.cpp, so the package still runs on older CPUs.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace spqr_hf {
namespace cpu {
// kernels_avx2_evex.cpp builds this file again as isa_avx2_evex (see there).
#if !defined(SPQR_HF_AVX2_NAMESPACE)
#define SPQR_HF_AVX2_NAMESPACE isa_avx2
#endif
namespace SPQR_HF_AVX2_NAMESPACE {

#include "spqr_hf/layout.h"
#include "spqr_hf/planes.h"

struct V {
  __m256 lo, hi;  // lanes 0-7, 8-15
};

// Lane l of a code vector takes bytes (l * bits) / 8 and the next one of the 16-byte window
// (replicated in both 128-bit halves), shifted right by (l * bits) % 8 and masked.
struct CodeCtl {
  __m256i shuffle_lo, shuffle_hi, shift_lo, shift_hi, mask;
};

inline CodeCtl make_ctl(int bits) {
  alignas(32) int8_t shuffle[2][32];
  alignas(32) int32_t shift[2][8];
  for (int l = 0; l < 16; ++l) {
    const int bit = l * bits, byte = bit >> 3;
    int8_t* s = &shuffle[l / 8][(l % 8) * 4];
    s[0] = static_cast<int8_t>(byte);
    s[1] = static_cast<int8_t>(byte + 1 < 16 ? byte + 1 : -128);
    s[2] = s[3] = -128;
    shift[l / 8][l % 8] = bit & 7;
  }
  CodeCtl c;
  c.shuffle_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuffle[0]));
  c.shuffle_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuffle[1]));
  c.shift_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift[0]));
  c.shift_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift[1]));
  c.mask = _mm256_set1_epi32((1 << bits) - 1);
  return c;
}
inline V v_zero() { return V{_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V v_set1(float a) { return V{_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V v_load(const float* p) { return V{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void v_store(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline V v_sub(V a, V b) { return V{_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V v_mul(V a, V b) { return V{_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V v_fma(V a, V b, V c) { return V{_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline float sum8(__m256 a) {  // the sum of 8 lanes (also int16_matvec.inc's)
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}
inline float v_sum(V a) { return sum8(_mm256_add_ps(a.lo, a.hi)); }
inline V v_codes(const uint8_t* w, const CodeCtl& c) {
  const __m256i window = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  __m256i lo = _mm256_shuffle_epi8(window, c.shuffle_lo);
  __m256i hi = _mm256_shuffle_epi8(window, c.shuffle_hi);
  lo = _mm256_and_si256(_mm256_srlv_epi32(lo, c.shift_lo), c.mask);
  hi = _mm256_and_si256(_mm256_srlv_epi32(hi, c.shift_hi), c.mask);
  return V{_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)};
}
inline V v_half(const uint16_t* p) {
  return V{_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
           _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline float half1(uint16_t h) { return _cvtsh_ss(h); }

#include "kernel_body.inc"
#include "int16_matvec.inc"
#include "plane_kernels.inc"

// Up to kInt16MaxVectors vectors over layers with groups of 16 take the integer path, everything else
// the float loop.
bool matvec(const LayerView& L, const float* xp, int64_t n_vectors, float* y, int64_t y_stride, int64_t row_begin,
            int64_t row_end, float* scratch) {
  if (n_vectors <= kInt16MaxVectors && int16_path::covers(L)) {
    bool handled = false;
    const bool ok = int16_path::matvec(L, xp, n_vectors, y, y_stride, row_begin, row_end, scratch, &handled);
    if (handled) return ok;
  }
  return detail::matvec(L, xp, n_vectors, y, y_stride, row_begin, row_end, scratch);
}

// The integer path with one int16 level (bfloat16 activations) beats dequantising for torch's GEMM up
// to 16 vectors on a Zen 3 core (4096 x 4096, 16 vectors: 8-9 vs 12-13 ms); with two levels (float32,
// float16) it only ties it at 12-16, so those keep kMatvecMaxBatch (benchmarks/RESULTS.md).
int64_t matvec_max_batch(const LayerView& L) {
  return int16_path::covers(L) && int16_path::levels_for(L) == 1 ? kInt16MaxVectors : kMatvecMaxBatch;
}

#if defined(SPQR_HF_AVX2_EVEX)
// This build's plane kernels, for the AVX-512 tables (kernels.h).
int planes_matvec(const LayerView& L, const float* xp, int64_t n_vectors, float* y, int64_t y_stride,
                  const PlaneBlocks& blocks, int64_t share, float* scratch) {
#if defined(SPQR_HF_PLANE_DOT)
  if (plane_dot_takes(n_vectors)) return plane_dot::matvec(L, xp, n_vectors, y, y_stride, blocks, share, scratch);
#endif
  return plane_path::matvec(L, xp, n_vectors, y, y_stride, blocks, share, scratch);
}

bool planes_dequant_t(const LayerView& L, float* dst, int64_t ld, int64_t row_begin, int64_t row_end, float* scratch) {
  return plane_path::dequant_t(L, dst, ld, row_begin, row_end, scratch);
}

bool planes_dequant_t_bf16(const LayerView& L, uint16_t* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                           float* scratch) {
  return plane_path::dequant_t_bf16(L, dst, ld, row_begin, row_end, scratch);
}
#endif

}  // namespace SPQR_HF_AVX2_NAMESPACE

#if !defined(SPQR_HF_AVX2_EVEX)
const KernelTable kAvx2Kernels = {"avx2", &isa_avx2::matvec, &isa_avx2::detail::dequant_f32,
                                  &isa_avx2::detail::dequant_bf16, nullptr, &isa_avx2::matvec_max_batch,
                                  &isa_avx2::plane_path::matvec, &isa_avx2::plane_path::dequant_t,
                                  &isa_avx2::plane_path::dequant_t_bf16};
#endif

}  // namespace cpu
}  // namespace spqr_hf

// The AVX-512 (F, BW, VL, DQ) vector type and code unpacking that kernel_body.inc is written over.
// Included *inside* an ISA namespace by kernels_avx512.cpp and kernels_avx512bf16.cpp (after
// spqr_hf/layout.h), so each object file gets its own copy compiled with its own flags.
// No include guard on purpose: each ISA namespace needs its own copy.

struct V {
  __m512 v;
};

// Lane l of a code vector takes bytes (l * bits) / 8 and the next one of the 16-byte window
// (replicated in all four 128-bit quarters), shifted right by (l * bits) % 8 and masked.
struct CodeCtl {
  __m512i shuffle, shift, mask;
};

inline CodeCtl make_ctl(int bits) {
  alignas(64) int8_t shuffle[64];
  alignas(64) int32_t shift[16];
  for (int l = 0; l < 16; ++l) {
    const int bit = l * bits, byte = bit >> 3;
    int8_t* s = &shuffle[l * 4];
    s[0] = static_cast<int8_t>(byte);
    s[1] = static_cast<int8_t>(byte + 1 < 16 ? byte + 1 : -128);
    s[2] = s[3] = -128;
    shift[l] = bit & 7;
  }
  return CodeCtl{_mm512_load_si512(shuffle), _mm512_load_si512(shift), _mm512_set1_epi32((1 << bits) - 1)};
}
inline V v_zero() { return V{_mm512_setzero_ps()}; }
inline V v_set1(float a) { return V{_mm512_set1_ps(a)}; }
inline V v_load(const float* p) { return V{_mm512_loadu_ps(p)}; }
inline void v_store(float* p, V a) { _mm512_storeu_ps(p, a.v); }
inline V v_sub(V a, V b) { return V{_mm512_sub_ps(a.v, b.v)}; }
inline V v_mul(V a, V b) { return V{_mm512_mul_ps(a.v, b.v)}; }
inline V v_fma(V a, V b, V c) { return V{_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline float v_sum(V a) { return _mm512_reduce_add_ps(a.v); }
inline V v_codes(const uint8_t* w, const CodeCtl& c) {
  const __m512i window = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(window, c.shuffle), c.shift), c.mask);
  return V{_mm512_cvtepi32_ps(codes)};
}
inline V v_half(const uint16_t* p) {
  return V{_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline float half1(uint16_t h) { return _cvtsh_ss(h); }

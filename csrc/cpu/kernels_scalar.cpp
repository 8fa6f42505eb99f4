// Portable kernels: plain C++ built with the compiler's baseline flags (runs on any x86-64 / ARM
// CPU). The 16-lane "vector" is an array the compiler may vectorise with baseline SIMD.
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace spqr_hf {
namespace cpu {
namespace isa_scalar {

#include "spqr_hf/layout.h"

struct V {
  float v[16];
};

struct CodeCtl {
  int bits;
  uint32_t mask;
};

inline CodeCtl make_ctl(int bits) { return CodeCtl{bits, (1u << bits) - 1u}; }
inline V v_zero() {
  V r;
  for (int l = 0; l < 16; ++l) r.v[l] = 0.0f;
  return r;
}
inline V v_set1(float a) {
  V r;
  for (int l = 0; l < 16; ++l) r.v[l] = a;
  return r;
}
inline V v_load(const float* p) {
  V r;
  memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void v_store(float* p, V a) { memcpy(p, a.v, sizeof(a.v)); }
inline V v_sub(V a, V b) {
  for (int l = 0; l < 16; ++l) a.v[l] -= b.v[l];
  return a;
}
inline V v_mul(V a, V b) {
  for (int l = 0; l < 16; ++l) a.v[l] *= b.v[l];
  return a;
}
inline V v_fma(V a, V b, V c) {
  for (int l = 0; l < 16; ++l) c.v[l] += a.v[l] * b.v[l];
  return c;
}
inline float v_sum(V a) {
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += a.v[l];
  return s;
}
inline V v_codes(const uint8_t* w, const CodeCtl& ctl) {
  V r;
  for (int l = 0; l < 16; ++l) {
    const int bit = l * ctl.bits;
    const int byte = bit >> 3;
    uint32_t word = w[byte];
    if (byte + 1 < 16) word |= static_cast<uint32_t>(w[byte + 1]) << 8;
    r.v[l] = static_cast<float>((word >> (bit & 7)) & ctl.mask);
  }
  return r;
}
inline V v_half(const uint16_t* p) {
  V r;
  for (int l = 0; l < 16; ++l) r.v[l] = spqr_hf::half_bits_to_float(p[l]);
  return r;
}
inline float half1(uint16_t h) { return spqr_hf::half_bits_to_float(h); }

#include "kernel_body.inc"

}  // namespace isa_scalar

const KernelTable kScalarKernels = {"scalar", &isa_scalar::detail::matvec, &isa_scalar::detail::dequant_f32,
                                    &isa_scalar::detail::dequant_bf16};

}  // namespace cpu
}  // namespace spqr_hf

// The SpQR packed layout, mirrored from src/spqr_hf/format/layout.py (the definition and its
// docstring, with the bit-stream drawing). Change both or neither, and bump FORMAT_VERSION.
//
// Every helper here is plain C++ usable from host code and CUDA device code alike, so the CPU
// test suite exercises the same bit-level decoding the GPU kernels run.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPQR_HD __host__ __device__ __forceinline__
#else
#define SPQR_HD inline
#endif

namespace spqr_hf {

constexpr int kFormatVersion = 1;
constexpr int kWordBits = 32;
constexpr int kRawStatBits = 16;  // statistic stored as its float16 bit pattern, no second level
constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;
constexpr int64_t kMaxInFeatures = int64_t(1) << 16;  // column indices are uint16
constexpr int kMetaStep = 0;  // order of the two float16 values in scale_meta / zero_meta
constexpr int kMetaZero = 1;

// Number of int32 words a stream row of `count` codes of `bits` bits occupies.
SPQR_HD int64_t words_for(int64_t count, int bits) {
  return (count * bits + kWordBits - 1) / kWordBits;
}

// Number of (possibly partial) groups of `group` covering `size`.
SPQR_HD int64_t num_groups(int64_t size, int64_t group) { return (size + group - 1) / group; }

// Code `index` of a little-endian bit stream of `n_words` 32-bit words. Never reads past
// `n_words` (the word after the last is taken as zero), so it is safe on the final code.
SPQR_HD uint32_t read_code(const uint32_t* words, int64_t n_words, int64_t index, int bits) {
  const int64_t bit = index * bits;
  const int64_t w = bit / kWordBits;
  const int shift = static_cast<int>(bit % kWordBits);
  uint64_t window = words[w];
  if (shift + bits > kWordBits && w + 1 < n_words) {
    window |= static_cast<uint64_t>(words[w + 1]) << kWordBits;
  }
  return static_cast<uint32_t>(window >> shift) & ((1u << bits) - 1u);
}

// The single dequantization formula of the format: (code - zero) * step, in float32, in this
// order (no fused multiply-add: the result must match torch's `(c - z) * s` bit for bit).
SPQR_HD float affine(float code, float step, float zero) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fsub_rn(code, zero), step);  // explicit rounding: never contracted into an FMA
#else
  const float centered = code - zero;
  return centered * step;  // host callers adding to this result must not let it fuse (-ffp-contract)
#endif
}

// IEEE float16 bit pattern to float32 (normals, subnormals, inf, NaN), without intrinsics.
SPQR_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mantissa & 0x3FFu) << 13;
    }
  } else if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | mantissa << 13;
  } else {
    bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
  }
  float out;
#if defined(__CUDA_ARCH__)
  out = __uint_as_float(bits);
#else
  std::memcpy(&out, &bits, sizeof(out));
#endif
  return out;
}

// First-level statistic of output row `row` in column group `group`, decoded to float32.
//   codes: [n_groups, words_for(rows, stat_bits)] stream rows; meta: [n_groups, n_chunks, 2]
//   float16 bit patterns (ignored when stat_bits == kRawStatBits).
SPQR_HD float decode_statistic(const uint32_t* codes, const uint16_t* meta, int64_t rows, int stat_bits,
                               int64_t qq_groupsize, int64_t group, int64_t row) {
  const int64_t n_words = words_for(rows, stat_bits);
  const uint32_t code = read_code(codes + group * n_words, n_words, row, stat_bits);
  if (stat_bits == kRawStatBits) return half_bits_to_float(static_cast<uint16_t>(code));
  const int64_t n_chunks = num_groups(rows, qq_groupsize);
  const uint16_t* m = meta + (group * n_chunks + row / qq_groupsize) * 2;
  return affine(static_cast<float>(code), half_bits_to_float(m[kMetaStep]), half_bits_to_float(m[kMetaZero]));
}

}  // namespace spqr_hf

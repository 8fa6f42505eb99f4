// Tile-level decoding of the SpQR packed layout, shared by the CUDA kernels and host code.
//
// Everything here is plain C++ marked SPQR_HD (host + device), built on the bit-level helpers
// of layout.h. The CUDA kernels (csrc/cuda) call exactly these functions per thread, and the
// host test harness (csrc/cuda/testing/decode_harness.cpp, driven by tests/test_shared_decode.py)
// calls them in a loop that emulates the kernels' grid, so CI runs the GPU's decoding code on
// the CPU and compares it with the torch reference decoder.
//
// Unit of work: a *chunk* of 32 consecutive (permuted) columns of one row. 32 codes of `BITS`
// bits fill exactly `BITS` int32 words, so chunk c of a row starts at word c * BITS of the row
// (layout.py: rows are independent streams padded to whole words) and every shift below is a
// compile-time constant once the loops are unrolled.
#pragma once

#include <cstdint>

#include "spqr_hf/layout.h"

#if defined(__CUDA_ARCH__)
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define SPQR_UNROLL _Pragma("unroll")
#define SPQR_HD_NOINLINE inline __host__ __device__ __noinline__
#else
#define SPQR_UNROLL
#define SPQR_HD_NOINLINE inline
#endif

namespace spqr_hf {

constexpr int kChunkCodes = 32;  // codes per chunk: 32 codes of b bits fill exactly b words
constexpr int kMinGroupAlign = 4;  // group boundaries fall on multiples of this (smallest groupsize)

// Status codes returned by the CUDA launchers (and checked again by the op glue).
enum Status : int { kOk = 0, kInvalidArgument = 1, kUnsupported = 2, kLaunchFailed = 3 };

// Raw pointers to one layer's packed buffers (layout.py's table) plus its geometry.
// Index tensors stored as int16 are read as uint16 (layout: value & 0xFFFF).
struct PackedView {
  const uint32_t* qweight;          // [m, words_for(n, bits)]
  const uint32_t* scale_codes;      // [G, words_for(m, scale_bits)]
  const uint32_t* zero_codes;       // [G, words_for(m, zero_bits)]
  const uint16_t* scale_meta;       // [G, R, 2] float16 bits; null when scale_bits == 16
  const uint16_t* zero_meta;        // [G, R, 2] float16 bits; null when zero_bits == 16
  const uint16_t* perm;             // [n] permuted column k reads input column perm[k]
  const int32_t* outlier_row_ptr;   // [m + 1] CSR row pointers
  const uint16_t* outlier_col;      // [nnz] permuted column, increasing within a row (may be null if nnz == 0)
  const uint16_t* outlier_delta;    // [nnz] float16 bits (may be null if nnz == 0)
  int32_t in_features;              // n, 1 .. kMaxInFeatures
  int32_t out_features;             // m
  int32_t bits;                     // 2 .. 8
  int32_t groupsize;                // effective first-level group (n for "whole row")
  int32_t qq_groupsize;             // effective second-level group over rows
  int32_t scale_bits;               // 2 .. 8 or 16 (raw float16)
  int32_t zero_bits;
};

// Activation rows the small-batch kernel instantiation for `batch` tokens (1..16) processes at
// once (rows past `batch` are zero): shared so the host harness emulates the same kernel.
SPQR_HD int matvec_batch_tile(int batch) { return batch <= 2 ? batch : batch <= 4 ? 4 : batch <= 8 ? 8 : 16; }

// Why `v` cannot be decoded, or nullptr when it can. Host-side check run by every launcher
// (kernels then trust every index); the op glue checks tensor shapes before building `v`.
inline const char* check_view(const PackedView& v) {
  if (v.bits < kMinBits || v.bits > kMaxBits) return "bits must be in 2..8";
  const bool scale_ok = (v.scale_bits >= kMinBits && v.scale_bits <= kMaxBits) || v.scale_bits == kRawStatBits;
  const bool zero_ok = (v.zero_bits >= kMinBits && v.zero_bits <= kMaxBits) || v.zero_bits == kRawStatBits;
  if (!scale_ok || !zero_ok) return "scale_bits and zero_bits must be in 2..8 or 16 (raw float16)";
  if (v.in_features < 1 || v.in_features > kMaxInFeatures) return "in_features must be in 1..65536";
  if (v.out_features < 1) return "out_features must be positive";
  if (v.groupsize < 1 || v.qq_groupsize < 1) return "groupsize and qq_groupsize must be positive";
  if (v.groupsize % kMinGroupAlign != 0 && v.groupsize < v.in_features) {
    return "groupsize must be a multiple of 4 or cover the whole row (as SpQRParams guarantees)";
  }
  if (!v.qweight || !v.scale_codes || !v.zero_codes || !v.perm || !v.outlier_row_ptr) {
    return "a required packed buffer pointer is null";
  }
  if ((v.scale_bits != kRawStatBits && !v.scale_meta) || (v.zero_bits != kRawStatBits && !v.zero_meta)) {
    return "scale_meta / zero_meta are required when the statistic bits are not 16";
  }
  return nullptr;
}

// float16 bit pattern to float32: the hardware conversion on the GPU (exact, like the software
// one in layout.h, which the host uses).
SPQR_HD float half_to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(bits));
#else
  return half_bits_to_float(bits);
#endif
}

// a + b rounded once, never contracted into a fused multiply-add with the product that made
// `a`: keeps `affine(...) + delta` bit-identical to the torch reference.
SPQR_HD float add_exact(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// One statistic stream (scales or zero points) with its strides precomputed.
struct StatStream {
  const uint32_t* codes;
  const uint16_t* meta;
  int64_t words_per_group;  // words_for(m, bits)
  int32_t bits;
  int32_t n_row_chunks;     // R = ceil(m / qq_groupsize)
};

// Per-thread constants of one layer, computed once per thread from a PackedView.
struct LayerDecoder {
  const uint32_t* qweight;
  int64_t row_words;  // words_for(n, bits)
  StatStream scale;
  StatStream zero;
  int32_t n;
  int32_t groupsize;
  int32_t qq_groupsize;
};

SPQR_HD LayerDecoder make_layer_decoder(const PackedView& v) {
  LayerDecoder d;
  d.qweight = v.qweight;
  d.row_words = words_for(v.in_features, v.bits);
  const int32_t row_chunks = static_cast<int32_t>(num_groups(v.out_features, v.qq_groupsize));
  d.scale = StatStream{v.scale_codes, v.scale_meta, words_for(v.out_features, v.scale_bits), v.scale_bits, row_chunks};
  d.zero = StatStream{v.zero_codes, v.zero_meta, words_for(v.out_features, v.zero_bits), v.zero_bits, row_chunks};
  d.n = v.in_features;
  d.groupsize = v.groupsize;
  d.qq_groupsize = v.qq_groupsize;
  return d;
}

// Statistic of output row `row` (second-level chunk `row_chunk` = row / qq_groupsize) in column
// group `group`: the same operations as layout.h's decode_statistic and pack.decode_statistic.
SPQR_HD float decode_stat(const StatStream& s, int32_t group, int32_t row, int32_t row_chunk) {
  const uint32_t code = read_code(s.codes + group * s.words_per_group, s.words_per_group, row, s.bits);
  if (s.bits == kRawStatBits) return half_to_float(static_cast<uint16_t>(code));
  const uint16_t* m = s.meta + (static_cast<int64_t>(group) * s.n_row_chunks + row_chunk) * 2;
  return affine(static_cast<float>(code), half_to_float(m[kMetaStep]), half_to_float(m[kMetaZero]));
}

// The `BITS` words of chunk `chunk` of a row; words past the row's end read as zero.
template <int BITS>
SPQR_HD void load_chunk_words(const uint32_t* row, int64_t row_words, int64_t chunk, uint32_t (&words)[BITS]) {
  const int64_t first = chunk * BITS;
  if (first + BITS <= row_words) {
    SPQR_UNROLL
    for (int j = 0; j < BITS; ++j) words[j] = row[first + j];
  } else {
    SPQR_UNROLL
    for (int j = 0; j < BITS; ++j) words[j] = first + j < row_words ? row[first + j] : 0u;
  }
}

// Code `i` (0..31) of a chunk held in registers; constant shifts once `i` is unrolled.
template <int BITS>
SPQR_HD uint32_t chunk_code(const uint32_t (&words)[BITS], int i) {
  const int bit = i * BITS;
  const int word = bit / kWordBits;
  const int shift = bit % kWordBits;
  uint32_t value = words[word] >> shift;
  if (shift + BITS > kWordBits) value |= words[word + 1] << (kWordBits - shift);
  return value & ((1u << BITS) - 1u);
}

// (scale, zero) of one (row, column group).
struct GroupStats {
  float scale;
  float zero;
};

// Out of line on the GPU: called once per chunk on the common path and at every group boundary
// inside a chunk otherwise, so the unrolled chunk loops stay small (compile time, registers).
SPQR_HD_NOINLINE GroupStats decode_group_stats(const LayerDecoder& d, int32_t group, int32_t row, int32_t row_chunk) {
  return GroupStats{decode_stat(d.scale, group, row, row_chunk), decode_stat(d.zero, group, row, row_chunk)};
}

// Dense dequantized values of chunk `chunk` of row `row` (outliers not added), in permuted
// column order: w[i] = affine(code, scale, zero) of column chunk * 32 + i, and 0 past column n.
// Group boundaries may only fall on multiples of 4 columns (groupsize % 4 == 0, or a single
// group per row), which check_view enforces: groups of 32+ columns take the branch-free path,
// smaller ones (4, 8, 16) re-decode their statistics every 4 codes at most.
template <int BITS>
SPQR_HD void dequantize_chunk(const LayerDecoder& d, int32_t row, int32_t row_chunk, int32_t chunk,
                              float (&w)[kChunkCodes]) {
  uint32_t words[BITS];
  load_chunk_words<BITS>(d.qweight + row * d.row_words, d.row_words, chunk, words);
  const int32_t k0 = chunk * kChunkCodes;
  const int32_t last = k0 + kChunkCodes - 1;
  int32_t group = k0 / d.groupsize;
  GroupStats stats = decode_group_stats(d, group, row, row_chunk);
  if (last < d.n && last / d.groupsize == group) {  // common case: one group, no padding
    SPQR_UNROLL
    for (int i = 0; i < kChunkCodes; ++i) {
      w[i] = affine(static_cast<float>(chunk_code<BITS>(words, i)), stats.scale, stats.zero);
    }
    return;
  }
  int32_t next_group_start = (group + 1) * d.groupsize;
  SPQR_UNROLL
  for (int i = 0; i < kChunkCodes; ++i) {
    const int32_t k = k0 + i;
    if (i % kMinGroupAlign == 0 && k == next_group_start && k < d.n) {
      ++group;
      next_group_start += d.groupsize;
      stats = decode_group_stats(d, group, row, row_chunk);
    }
    const float value = affine(static_cast<float>(chunk_code<BITS>(words, i)), stats.scale, stats.zero);
    w[i] = k < d.n ? value : 0.0f;
  }
}

// First CSR entry of `row` whose column is >= `column` (columns increase within a row).
SPQR_HD int32_t outlier_lower_bound(const PackedView& v, int32_t row, int32_t column) {
  int32_t lo = v.outlier_row_ptr[row];
  int32_t hi = v.outlier_row_ptr[row + 1];
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (static_cast<int32_t>(v.outlier_col[mid]) < column) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Adds the outliers of `row` that fall in chunk `chunk` to its dense values, exactly as the
// reference does (fp32 add of the float16 delta). Static register indexing only.
SPQR_HD void add_chunk_outliers(const PackedView& v, int32_t row, int32_t chunk, float (&w)[kChunkCodes]) {
  const int32_t end = v.outlier_row_ptr[row + 1];
  if (v.outlier_row_ptr[row] == end) return;
  const int32_t k0 = chunk * kChunkCodes;
  int32_t e = outlier_lower_bound(v, row, k0);
  int32_t next_col = e < end ? static_cast<int32_t>(v.outlier_col[e]) : INT32_MAX;
  if (next_col >= k0 + kChunkCodes) return;
  SPQR_UNROLL
  for (int i = 0; i < kChunkCodes; ++i) {
    if (k0 + i == next_col) {
      w[i] = add_exact(w[i], half_to_float(v.outlier_delta[e]));
      ++e;
      next_col = e < end ? static_cast<int32_t>(v.outlier_col[e]) : INT32_MAX;
    }
  }
}

// acc[b] += sum_i w[i] * x(b, i) over one chunk of one row: the inner loop of the batch-1 and
// small-batch kernels, each decoded weight reused across the BT activation rows.
// `x_at(b, i)` returns float activation b at permuted column chunk * 32 + i (0 past n).
template <int BITS, int BT, class XAt>
SPQR_HD void chunk_dot(const LayerDecoder& d, int32_t row, int32_t row_chunk, int32_t chunk, const XAt& x_at,
                       float (&acc)[BT]) {
  float w[kChunkCodes];
  dequantize_chunk<BITS>(d, row, row_chunk, chunk, w);
  SPQR_UNROLL
  for (int i = 0; i < kChunkCodes; ++i) {
    SPQR_UNROLL
    for (int b = 0; b < BT; ++b) acc[b] += w[i] * x_at(b, i);
  }
}

// acc[b] += delta * x(b, col) over the outliers first, first + stride, ... of `row`: the
// sparse part of the matvec, strided across the lanes of a warp.
// `x_at(b, col)` returns float activation b at *permuted* column `col`.
template <int BT, class XAt>
SPQR_HD void outlier_dot(const PackedView& v, int32_t row, int32_t first, int32_t stride, const XAt& x_at,
                         float (&acc)[BT]) {
  const int32_t end = v.outlier_row_ptr[row + 1];
  for (int32_t e = v.outlier_row_ptr[row] + first; e < end; e += stride) {
    const int32_t col = v.outlier_col[e];
    const float delta = half_to_float(v.outlier_delta[e]);
    SPQR_UNROLL
    for (int b = 0; b < BT; ++b) acc[b] += delta * x_at(b, col);
  }
}

}  // namespace spqr_hf

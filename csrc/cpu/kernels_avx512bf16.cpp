// AVX-512 kernels with bfloat16 dot products (AVX512_BF16) and bit-field extraction (AVX512_VBMI):
// AMD Zen 4 and later, Intel Sapphire Rapids and later (all with AVX512_VNNI too). Built with the
// "avx512" flags plus -mavx512bf16 -mavx512vbmi -mavx512vnni (setup.py); only called after the runtime
// CPUID check.
//
// Why a separate path: the generic matvec converts every code to float32 on its own (about six
// vector instructions per 16 weights) and ends up bound by instruction throughput, far from the
// memory bandwidth a 3-bit layer needs. Here, for bits <= 4 and groups that are whole 16-column
// blocks (or one group per row), which covers every configuration the paper recommends:
//   * codes: one masked load of 8 blocks of each of two rows, then per block one VPERMT2B (the byte
//     pairs holding each column pair of both rows), one VPMULTISHIFTQB (each code to the top of a
//     16-bit word's bfloat16 mantissa) and one VPTERNLOGD make 32 exact bfloat16 values
//     1 + c / 2^bits, rows a and b in alternate lanes (the 1 is taken back out through the group
//     sums of x).
//   * activations: split once per call into bfloat16 hi + lo parts, x = hi + lo + O(2^-17 |x|);
//     lo is zero (and skipped) for bfloat16 activations.
//   * VDPBF16PS multiplies 32 codes by 32 activations and adds pairs in float32 (products of two
//     bfloat16 are exact in float32); the scale is applied once per group and row pair (a 64-bit
//     broadcast), the zero point through the group sums of x, as in the generic kernel:
//         y_i = sum_j 2^bits s_ij (sum_{k in group j} (1 + c_ik / 2^bits) x_k)
//               - sum_j s_ij (z_ij + 2^bits) X_j + outliers_i.
//   * statistics: decoded per 16-row tile and group with the rows in lanes, second-level
//     parameters 16 chunks at a time, the 2^bits factors folded in; columns are walked in panels so
//     a panel's activations and scales stay in L1; codes, statistics and outliers are prefetched
//     ahead (a cold layer otherwise waits on memory: its statistics are G lines apart).
// One to four vectors (decode, small batches) over codes of <= 4 bits in groups of 16 take
// int8_matvec.inc instead: integer dot products (AVX512_VNNI), 1.4-1.7x this loop's speed on one
// Intel Xeon core.
// Batched prefill dequantises rows with the same code trick (dequant_rows, below) for the same
// layers; every other layer uses the same code as "avx512".
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace spqr_hf {
namespace cpu {
namespace isa_avx512bf16 {

#include "spqr_hf/layout.h"

#include "avx512_vector.h"
#include "kernel_body.inc"

namespace bf16 {

using detail::min64;

constexpr int kAheadPairs = 12;  // row pairs (in the order dot_tile visits them) whose codes are prefetched
constexpr int64_t kMaxBatchVectors = 8;  // activation vectors per call (ops.cpp sends at most 8 to matvec)
constexpr int64_t kMetaBlock = 16;  // second-level chunks decoded together (decode_meta_block)
constexpr int64_t kPanelBlocks = 64;  // 16-column blocks per column panel of the dot loops (see dot_tile)
constexpr int64_t kStatsAheadTiles = 4;  // tiles ahead whose statistics are prefetched (StatsAhead)

// Layers this path computes: two codes of a row lie in one byte pair, and each 16-column block is
// in one group.
inline bool covers(const LayerView& L) {
  return L.bits <= 4 && (L.n_groups == 1 || L.groupsize % kBlockCols == 0);
}

// A 512-bit register holds the 16 codes of one block of two rows a and b. VDPBF16PS lane l sums
// 16-bit words 2l and 2l + 1; even lanes belong to row a, odd lanes to row b, and lanes 2p, 2p + 1
// both cover columns 2p and 2p + 1 of the block. So a pair's scales are one 64-bit broadcast of
// (s_a, s_b), straight from the tile's scales in row order. Qword q (lanes 2q, 2q + 1) gets from
// VPERMT2B the two bytes of each row that hold columns 2q and 2q + 1 (row a's in bytes 0-1, row b's
// in bytes 2-3), and VPMULTISHIFTQB extracts the four codes from them.
constexpr __mmask16 kRowALanes = 0x5555, kRowBLanes = 0xAAAA;

// Word w of a register <- the activation (or the code, in row word_row(w)) of column word_column(w).
inline int word_column(int w) { return 2 * (w / 4) + w % 2; }
inline int word_row(int w) { return (w / 2) % 2; }
// The first of the bytes of a row's block that qword q reads (columns 2q and 2q + 1).
inline int qword_first_byte(int q, int bits) { return 2 * q * bits / 8; }

// A code c becomes the bfloat16 1 + c / 2^bits: its bits are placed at the top of the mantissa
// under the exponent of 1.0 (VPMULTISHIFTQB brings them there, one VPTERNLOGD masks the
// neighbouring codes and sets the exponent). Exact, and a dot product of these values with x is
// X + (sum_k c_k x_k) / 2^bits, with X the sum of x over the block.
struct Tables {
  __m512i pick;  // VPERMT2B control over (row a's bytes, row b's bytes) of block 0 (see above)
  __m512i extract;  // VPMULTISHIFTQB control: the code of word w at bits [7 - bits, 7) of its low byte
  __m512i mantissa;  // the code's bits within each word
  __m512i one;  // bfloat16 1.0 in each word
  int block_bytes;  // 16 codes
};

inline Tables make_tables(int bits) {
  const int block_bytes = 2 * bits;
  alignas(64) uint8_t pick[64];
  alignas(64) uint8_t extract[64];
  for (int q = 0; q < 8; ++q)
    for (int i = 0; i < 8; ++i) {  // bytes 4-7 of each qword repeat 0-3 (unused)
      const int byte = qword_first_byte(q, bits) + i % 2;  // the second byte is unused when past the block
      pick[8 * q + i] = static_cast<uint8_t>((i % 4 < 2 ? 0 : 64) + (byte < block_bytes ? byte : block_bytes - 1));
    }
  for (int w = 0; w < 32; ++w) {
    const int q = w / 4;
    const int bit = word_column(w) * bits - 8 * qword_first_byte(q, bits) + 16 * word_row(w);
    const int first = bit - (7 - bits);  // may wrap around the qword: bits below the code are masked anyway
    extract[2 * w] = extract[2 * w + 1] = static_cast<uint8_t>(first & 63);
  }
  return {_mm512_load_si512(pick), _mm512_load_si512(extract),
          _mm512_set1_epi16(static_cast<int16_t>(((1 << bits) - 1) << (7 - bits))), _mm512_set1_epi16(0x3F80),
          block_bytes};
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m256i as_i(__m256bh v) { return reinterpret_cast<__m256i&>(v); }

inline __m512 bf16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// hi/lo[(v * n_blocks + b) * 32 + w] = activation word_column(w) of block b of vector v, as
// bfloat16 hi and lo parts, and sums[v * G + j] = X_vj / 2^bits, with X_vj the float32 sum of hi + lo
// over group j (of the split values, so that the 1 in each code's 1 + c / 2^bits cancels to float32
// rounding; the exact 2^-bits turns tile_terms' s * z into the zero-point term's scale * (zero + 2^bits)).
// Returns whether any lo part is non-zero.
inline bool split_activations(const LayerView& L, const float* xp, int64_t n_vectors, uint16_t* hi, uint16_t* lo,
                              float* sums) {
  const int64_t n_blocks = L.n_padded / kBlockCols;
  const int64_t blocks_per_group = L.n_groups == 1 ? n_blocks : L.groupsize / kBlockCols;
  alignas(64) uint16_t order[32];
  for (int w = 0; w < 32; ++w) order[w] = static_cast<uint16_t>(word_column(w));
  const __m512i arrange = _mm512_load_si512(order);
  __mmask16 any_lo = 0;
  for (int64_t v = 0; v < n_vectors; ++v) {
    for (int64_t j = 0; j < L.n_groups; ++j) sums[v * L.n_groups + j] = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const __m512 x = _mm512_loadu_ps(xp + v * L.n_padded + b * kBlockCols);
      const __m256i h = as_i(_mm512_cvtneps_pbh(x));
      const __m512 rest = _mm512_sub_ps(x, bf16_to_float(h));
      const __m256i l = as_i(_mm512_cvtneps_pbh(rest));
      any_lo |= _mm512_cmpneq_ps_mask(rest, _mm512_setzero_ps());
      const __m512 split = _mm512_add_ps(bf16_to_float(h), bf16_to_float(l));
      sums[v * L.n_groups + b / blocks_per_group] += _mm512_reduce_add_ps(split);
      const int64_t at = (v * n_blocks + b) * 32;
      _mm512_storeu_si512(hi + at, _mm512_permutexvar_epi16(arrange, _mm512_castsi256_si512(h)));
      _mm512_storeu_si512(lo + at, _mm512_permutexvar_epi16(arrange, _mm512_castsi256_si512(l)));
    }
    for (int64_t j = 0; j < L.n_groups; ++j) sums[v * L.n_groups + j] *= 1.0f / static_cast<float>(1 << L.bits);
  }
  return any_lo != 0;
}

// The 32 bfloat16 values of a block of rows a and b whose bytes start at ra and rb, in the register
// order above, given pick = t.pick advanced to the block.
inline __m512bh pair_codes(const Tables& t, __m512i ra, __m512i pick, __m512i rb) {
  const __m512i words = _mm512_multishift_epi64_epi8(t.extract, _mm512_permutex2var_epi8(ra, pick, rb));
  return as_bh(_mm512_ternarylogic_epi32(words, t.mantissa, t.one, 0xEA));  // (words & mantissa) | one
}

// Codes of one 16-column block of rows a and b as 32 bfloat16 values, in the register order above.
inline __m512bh block_codes(const Tables& t, const uint8_t* a, const uint8_t* b) {
  const __mmask64 bytes = (uint64_t(1) << t.block_bytes) - 1;
  return pair_codes(t, _mm512_maskz_loadu_epi8(bytes, a), t.pick, _mm512_maskz_loadu_epi8(bytes, b));
}

inline __m512bh load_bh(const uint16_t* p) { return as_bh(_mm512_loadu_si512(p)); }

// Sum over the blocks [b0, b1) of one group of codes * activations, for NV vectors. VDPBF16PS has
// a latency of several cycles, so the blocks feed four independent chains (for one vector; two
// for several), with the lo products on chains of their own.
template <int NV, bool LO>
inline void group_dots(const Tables& t, const uint8_t* a, const uint8_t* b, int64_t block_bytes, int64_t b0,
                       int64_t b1, const uint16_t* hi, const uint16_t* lo, int64_t vec_stride, __m512 (&dp)[NV]) {
  constexpr int kChains = NV == 1 ? 4 : 2;
  constexpr int kUnroll = LO ? kChains / 2 : kChains;  // blocks per iteration
  __m512 ch[kChains][NV];
  for (int c = 0; c < kChains; ++c)
    for (int v = 0; v < NV; ++v) ch[c][v] = _mm512_setzero_ps();
  int64_t k = b0;
  for (; k + kUnroll <= b1; k += kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const __m512bh codes = block_codes(t, a + (k + u) * block_bytes, b + (k + u) * block_bytes);
      for (int v = 0; v < NV; ++v) {
        const int64_t at = v * vec_stride + (k + u) * 32;
        __m512& hi_chain = ch[LO ? 2 * u : u][v];
        hi_chain = _mm512_dpbf16_ps(hi_chain, codes, load_bh(hi + at));
        if (LO) ch[2 * u + 1][v] = _mm512_dpbf16_ps(ch[2 * u + 1][v], codes, load_bh(lo + at));
      }
    }
  for (; k < b1; ++k) {
    const __m512bh codes = block_codes(t, a + k * block_bytes, b + k * block_bytes);
    for (int v = 0; v < NV; ++v) {
      ch[0][v] = _mm512_dpbf16_ps(ch[0][v], codes, load_bh(hi + v * vec_stride + k * 32));
      if (LO) ch[1][v] = _mm512_dpbf16_ps(ch[1][v], codes, load_bh(lo + v * vec_stride + k * 32));
    }
  }
  for (int v = 0; v < NV; ++v) {
    dp[v] = ch[0][v];
    for (int c = 1; c < kChains; ++c) dp[v] = _mm512_add_ps(dp[v], ch[c][v]);
  }
}

// One 16-column group: dp = codes * activations of the block's two rows (no inner loop).
template <int NV, bool LO>
inline void block_dots(__m512bh c, const uint16_t* hi, const uint16_t* lo, int64_t vec_stride, __m512 (&dp)[NV]) {
  for (int v = 0; v < NV; ++v) {
    dp[v] = _mm512_dpbf16_ps(_mm512_setzero_ps(), c, load_bh(hi + v * vec_stride));
    if (LO) dp[v] = _mm512_add_ps(dp[v], _mm512_dpbf16_ps(_mm512_setzero_ps(), c, load_bh(lo + v * vec_stride)));
  }
}

// acc += dp * (the scales of rows a and b in their lanes); s = (s_a, s_b).
template <int NV>
inline void add_scaled(const float* s, const __m512 (&dp)[NV], __m512 (&acc)[NV]) {
  double pair;
  memcpy(&pair, s, sizeof(pair));
  const __m512 s_pair = _mm512_castpd_ps(_mm512_set1_pd(pair));
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(dp[v], s_pair, acc[v]);
}

// sum[v] += sum_{j0 <= j < j1} s_ij * (sum_{k in group j} c_ik x_vk) in the lanes of the rows in
// lanes `lane` and `lane + 1` of the tile (see add_scaled), whose packed codes start at a and b.
// Two accumulator chains (even and odd groups) hide the FMA latency.
template <int NV, bool LO>
inline void dot_row_pair(const LayerView& L, const Tables& t, const uint8_t* a, const uint8_t* b, const uint16_t* hi,
                         const uint16_t* lo, const float* scales, int lane, int64_t j0, int64_t j1,
                         const uint8_t* const (&later)[2], __m512 (&sum)[NV]) {
  const int64_t n_blocks = L.n_padded / kBlockCols, G = L.n_groups;
  const int64_t block_bytes = 2 * L.bits;  // 16 codes
  const int64_t vec_stride = n_blocks * 32;
  const float* s = scales + lane;  // (s_a, s_b) in each group's 16 scales
  __m512 acc0[NV], acc1[NV], dp[NV];
  for (int v = 0; v < NV; ++v) {
    acc0[v] = sum[v];
    acc1[v] = _mm512_setzero_ps();
  }
  if (L.groupsize == kBlockCols && G == n_blocks) {  // groups of 16: one block per group
    // Eight groups per iteration: one masked load of each row's 8 blocks, VPERMT2B picks each block's
    // bytes out of them, and the matching lines of the rows `later` (a later pair's codes for the
    // same span of groups) are requested.
    const auto group = [&](__m512bh codes, int64_t j, __m512 (&acc)[NV]) {
      block_dots<NV, LO>(codes, hi + j * 32, lo + j * 32, vec_stride, dp);
      add_scaled<NV>(s + j * kTileRows, dp, acc);
    };
    const __mmask64 window = (~uint64_t(0)) >> (64 - 8 * block_bytes);  // the bytes of 8 blocks
    __m512i pick[8];  // t.pick advanced to block u of the window
    for (int u = 0; u < 8; ++u) pick[u] = _mm512_add_epi8(t.pick, _mm512_set1_epi8(static_cast<char>(u * block_bytes)));
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      _mm_prefetch(reinterpret_cast<const char*>(later[0] + (j - j0) * block_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(later[1] + (j - j0) * block_bytes), _MM_HINT_T0);
      const __m512i ra = _mm512_maskz_loadu_epi8(window, a + j * block_bytes);
      const __m512i rb = _mm512_maskz_loadu_epi8(window, b + j * block_bytes);
      group(pair_codes(t, ra, pick[0], rb), j, acc0);
      group(pair_codes(t, ra, pick[1], rb), j + 1, acc1);
      group(pair_codes(t, ra, pick[2], rb), j + 2, acc0);
      group(pair_codes(t, ra, pick[3], rb), j + 3, acc1);
      group(pair_codes(t, ra, pick[4], rb), j + 4, acc0);
      group(pair_codes(t, ra, pick[5], rb), j + 5, acc1);
      group(pair_codes(t, ra, pick[6], rb), j + 6, acc0);
      group(pair_codes(t, ra, pick[7], rb), j + 7, acc1);
    }
    for (; j < j1; ++j) group(block_codes(t, a + j * block_bytes, b + j * block_bytes), j, j % 2 ? acc1 : acc0);
  } else {
    const int64_t per_group = G == 1 ? n_blocks : L.groupsize / kBlockCols;
    for (int64_t j = j0; j < j1; ++j) {
      group_dots<NV, LO>(t, a, b, block_bytes, j * per_group, min64((j + 1) * per_group, n_blocks), hi, lo,
                         vec_stride, dp);
      add_scaled<NV>(s + j * kTileRows, dp, j % 2 ? acc1 : acc0);
    }
  }
  for (int v = 0; v < NV; ++v) sum[v] = _mm512_add_ps(acc0[v], acc1[v]);
}

// dots[v * 16 + lane] = the dot products of the tile's rows. The columns are walked in panels of
// about kPanelBlocks blocks, all row pairs of the tile per panel, so that the panel's activations
// and scales stay in L1 while the eight pairs read them (whole rows at a time did not fit for wide
// layers: 15.5 instead of 24 Gweights/s at 11008 columns).
template <int NV, bool LO>
inline void dot_tile(const LayerView& L, const Tables& t, int64_t row0, int64_t tile_end, const uint16_t* hi,
                     const uint16_t* lo, const float* scales, uint8_t* row_copy, float* dots) {
  const int64_t n_blocks = L.n_padded / kBlockCols, G = L.n_groups;
  const int64_t blocks_per_group = G == 1 ? n_blocks : L.groupsize / kBlockCols;
  const int64_t panel = blocks_per_group >= kPanelBlocks ? 1 : kPanelBlocks / blocks_per_group;  // groups
  __m512 sums[kTileRows / 2][NV];
  for (auto& pair : sums)
    for (auto& v : pair) v = _mm512_setzero_ps();
  const int64_t pairs = (tile_end - row0 + 1) / 2, block_bytes = 2 * L.bits;
  for (int64_t j0 = 0; j0 < G; j0 += panel)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t row = row0 + 2 * pair;
      const uint8_t* base[2];
      detail::row_bases<2>(L, row, row_copy, base);  // a lone last row pairs with zero-padded codes
      // The pair visited kAheadPairs visits on (about half a microsecond later, longer than a
      // DRAM access): later in this panel, in a later one, or in the next tile (assumed full).
      int64_t ahead = pair + kAheadPairs, later_group = j0, later_row0 = row0, tile_pairs = pairs;
      while (ahead >= tile_pairs) {
        ahead -= tile_pairs;
        later_group += panel;
        if (later_group >= G) later_group = 0, later_row0 += kTileRows, tile_pairs = kTileRows / 2;
      }
      const int64_t later_row = min64(later_row0 + 2 * ahead, L.m - 1);
      const uint8_t* later_a = L.qweight + later_row * L.qweight_row_bytes + later_group * block_bytes;
      const uint8_t* const later[2] = {later_a, later_a + L.qweight_row_bytes};  // prefetched only: may pass the end
      dot_row_pair<NV, LO>(L, t, base[0], base[1], hi, lo, scales, static_cast<int>(2 * pair), j0,
                           min64(j0 + panel, G), later, sums[pair]);
    }
  for (int64_t pair = 0; pair < pairs; ++pair)
    for (int v = 0; v < NV; ++v) {
      dots[v * kTileRows + 2 * pair] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(kRowALanes, sums[pair][v]));
      dots[v * kTileRows + 2 * pair + 1] = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(kRowBLanes, sums[pair][v]));
    }
}

template <bool LO>
inline void dot_tile_vectors(const LayerView& L, const Tables& t, int64_t n_vectors, int64_t row0, int64_t tile_end,
                             const uint16_t* hi, const uint16_t* lo, const float* scales, uint8_t* row_copy,
                             float* dots) {
  const int64_t stride = (L.n_padded / kBlockCols) * 32;  // one vector's bfloat16 copy
  for (int64_t v0 = 0; v0 < n_vectors; v0 += kMaxVectors) {
    const uint16_t* h = hi + v0 * stride;
    const uint16_t* l = lo + v0 * stride;
    float* d = dots + v0 * kTileRows;
    switch (min64(n_vectors - v0, kMaxVectors)) {
      case 1: dot_tile<1, LO>(L, t, row0, tile_end, h, l, scales, row_copy, d); break;
      case 2: dot_tile<2, LO>(L, t, row0, tile_end, h, l, scales, row_copy, d); break;
      case 3: dot_tile<3, LO>(L, t, row0, tile_end, h, l, scales, row_copy, d); break;
      default: dot_tile<4, LO>(L, t, row0, tile_end, h, l, scales, row_copy, d); break;
    }
  }
}

// One first-level statistic stream (scales or zero points) of the layer. The dot loops want each
// statistic t as the affine mult * t + offset (scales times 2^bits, zero points plus 2^bits: see
// tile_terms), so that transform is folded into the decoded second-level parameters:
// t' = c * step[j] + bias[j] for a code c in group j, one FMA, when the whole tile is in one chunk.
struct StatStream {
  const uint8_t* codes;
  int64_t row_bytes;
  const uint16_t* meta;
  int bits;
  CodeCtl ctl;  // generic 16-code unpacking (bits 5..8)
  __m512i extract;  // VPMULTISHIFTQB control for bits <= 4: code l at the bottom of dword l
  float mult, offset;  // the transform applied to every decoded statistic
  float* block_step;  // [kMetaBlock][G]: mult * step of chunk block_first + t in group j (decode_meta_block)
  float* block_bias;  // [kMetaBlock][G]: offset - mult * step * zero
  int64_t block_first;  // first chunk in the block buffers (-1: none yet)
  const float* step;  // [G]: the current tile's row of block_step
  const float* bias;  // [G]
};

inline StatStream stat_stream(const LayerView& L, const uint8_t* codes, int64_t row_bytes, const uint16_t* meta,
                              int bits, float mult, float offset, float* tile_meta) {
  alignas(64) uint8_t extract[64];
  for (int l = 0; l < 16; ++l)
    for (int i = 0; i < 4; ++i) extract[4 * l + i] = static_cast<uint8_t>((l * (bits <= 4 ? bits : 0) + 8 * i) & 63);
  return {codes, row_bytes, meta, bits, detail::stat_ctl(bits),
          _mm512_load_si512(extract), mult, offset, tile_meta, tile_meta + kMetaBlock * L.n_groups, -1, nullptr,
          nullptr};
}

// r[t] <- lane t of every r[i] (a 16 x 16 transpose of 32-bit elements). Always inlined: as a call,
// r goes through memory.
__attribute__((always_inline)) inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_i32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_i32x4(r[8 * i + k], r[8 * i + 4 + k], 0xDD);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
  }
}

// block_step / block_bias from the float16 second-level (step, zero) pairs of chunks
// [first, first + kMetaBlock) (clipped at R) in every group. meta is [G][R][2], so each group's
// pairs of the block are one contiguous load; 16 groups are transposed in registers to the
// tile-major rows the tiles read. (A gather of 16 groups per tile cost a tenth of the matvec.)
inline void decode_meta_block(const LayerView& L, StatStream& st, int64_t first) {
  const int32_t* pairs = reinterpret_cast<const int32_t*>(st.meta);
  const int64_t G = L.n_groups, count = min64(kMetaBlock, L.n_chunks - first);
  const __mmask16 chunks_live = static_cast<__mmask16>((1u << count) - 1u);
  static_assert(spqr_hf::kMetaStep == 0 && spqr_hf::kMetaZero == 1, "step in the low half of each pair");
  for (int64_t j0 = 0; j0 < G; j0 += 16) {
    const int64_t groups = min64(16, G - j0);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < groups ? _mm512_maskz_loadu_epi32(chunks_live, pairs + (j0 + i) * L.n_chunks + first)
                        : _mm512_setzero_si512();
    transpose16(r);  // r[t] = the pairs of chunk first + t in groups j0 .. j0 + 15
    const __mmask16 groups_live = static_cast<__mmask16>((1u << groups) - 1u);
    for (int64_t t = 0; t < count; ++t) {
      const __m512 step = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(r[t])), _mm512_set1_ps(st.mult));
      const __m512 zero = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(r[t], 16)));
      _mm512_mask_storeu_ps(st.block_step + t * G + j0, groups_live, step);
      _mm512_mask_storeu_ps(st.block_bias + t * G + j0, groups_live,
                            _mm512_fnmadd_ps(zero, step, _mm512_set1_ps(st.offset)));
    }
  }
  st.block_first = first;
}

// Points st.step / st.bias at chunk `chunk`'s parameters, decoding its block when needed.
inline void select_chunk(const LayerView& L, StatStream& st, int64_t chunk) {
  const int64_t first = chunk / kMetaBlock * kMetaBlock;
  if (first != st.block_first) decode_meta_block(L, st, first);
  st.step = st.block_step + (chunk - first) * L.n_groups;
  st.bias = st.block_bias + (chunk - first) * L.n_groups;
}

inline __m512 transform(const StatStream& st, __m512 t) {
  return _mm512_fmadd_ps(t, _mm512_set1_ps(st.mult), _mm512_set1_ps(st.offset));
}

// The transformed statistics of the tile's 16 rows in group j, read inline: the caller has checked
// that the window is inside the buffer and, for codes, that the tile is in one chunk (fast_tile).
template <bool RAW>
inline __m512 fast_statistics(const StatStream& st, int64_t j, int64_t row0) {
  if (RAW) return transform(st, v_half(reinterpret_cast<const uint16_t*>(st.codes + j * st.row_bytes + row0 * 2)).v);
  int64_t window;
  memcpy(&window, st.codes + j * st.row_bytes + row0 * st.bits / 8, sizeof(window));
  const __m512i fields = _mm512_multishift_epi64_epi8(st.extract, _mm512_set1_epi64(window));
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(fields, _mm512_set1_epi32((1 << st.bits) - 1)));
  return _mm512_fmadd_ps(codes, _mm512_set1_ps(st.step[j]), _mm512_set1_ps(st.bias[j]));
}

// The transformed statistics (see StatStream) of the tile's 16 rows (lanes) in column group j.
// The inline decoders of fast_statistics where the window is inside the buffer (raw float16, or
// codes of <= 4 bits with the tile in one chunk), the 16-byte generic unpacking for wider codes,
// the generic decoder otherwise.
inline __m512 tile_statistics(const LayerView& L, const StatStream& st, const detail::TileChunks& chunks, int64_t j,
                              int64_t row0) {
  const int64_t total = L.n_groups * st.row_bytes;
  if (st.bits == spqr_hf::kRawStatBits) {
    if (j * st.row_bytes + row0 * 2 + 32 <= total) return fast_statistics<true>(st, j, row0);
  } else if (chunks.uniform) {
    const int64_t offset = j * st.row_bytes + row0 * st.bits / 8;  // row0 is a multiple of 16
    if (st.bits <= 4 && offset + 8 <= total) return fast_statistics<false>(st, j, row0);
    if (offset + 16 <= total)
      return _mm512_fmadd_ps(v_codes(st.codes + offset, st.ctl).v, _mm512_set1_ps(st.step[j]),
                             _mm512_set1_ps(st.bias[j]));
  }
  alignas(64) float out[kTileRows];
  detail::decode_stat_lanes(st.codes, st.row_bytes, st.meta, st.bits, st.ctl, L, chunks, j, row0, out);
  return transform(st, _mm512_load_ps(out));
}

// Statistics are stored group-major ([G][rows]): a tile reads a few bytes from each of G lines far
// apart, which hardware prefetchers do not follow, so a cold layer would wait on memory G times per
// tile. tile_terms therefore requests, group by group, the lines a tile kStatsAheadTiles on will
// read for the first time: a stream's codes when that tile starts a new line of them, and its
// second-level pairs every 8 chunks (16 pairs fill a line). Into L2: the dot loops sweep L1.
struct StatsAhead {
  const char* base[4];
  int64_t stride[4];
  int count = 0;
  void add(const void* p, int64_t stride_bytes) {
    base[count] = static_cast<const char*>(p);
    stride[count++] = stride_bytes;
  }
  void request(int64_t j) const {
    for (int k = 0; k < count; ++k) _mm_prefetch(base[k] + j * stride[k], _MM_HINT_T1);
  }
};

inline void add_stats_ahead(const LayerView& L, const StatStream& st, int64_t row0, StatsAhead& ahead) {
  const int64_t later = row0 + kStatsAheadTiles * kTileRows;
  if (later >= L.m) return;
  const int64_t tile_bytes = st.bits == spqr_hf::kRawStatBits ? 2 * kTileRows : 2 * st.bits;  // 16 rows
  const int64_t at = later / kTileRows * tile_bytes;
  if (tile_bytes >= 64 || at / 64 != (at - tile_bytes) / 64) ahead.add(st.codes + at, st.row_bytes);
  const int64_t chunk = later / L.qq_groupsize;
  if (st.meta != nullptr && later % L.qq_groupsize < kTileRows && chunk % 8 == 0)
    ahead.add(st.meta + 2 * chunk, 4 * L.n_chunks);
}

// Whether the tile's statistics of this stream can take the inline fast path in every group:
// raw float16, or codes of <= 4 bits with the tile in one second-level chunk, and the tile's window
// inside each group's row of the buffer (so inside the buffer). row0 is a multiple of 16.
inline bool fast_tile(const StatStream& st, const detail::TileChunks& chunks, int64_t row0) {
  if (st.bits == spqr_hf::kRawStatBits) return row0 * 2 + 32 <= st.row_bytes;
  return st.bits <= 4 && chunks.uniform && row0 * st.bits / 8 + 8 <= st.row_bytes;
}

// The tile's per-group terms from stat(j, s, z), the transformed scales s = 2^bits * scale and
// zero points z = zero + 2^bits of its 16 rows (lanes) in group j (codes enter the dot products as
// 1 + c / 2^bits): scales[j] = s for the dot loops, and the zero-point terms
// zero_terms[v] = sum_j s * z * X_vj (the activation group sums carry the 2^-bits): summed here in
// registers for a single vector (`sums` non-null), else through scale_zero[j] = s * z and
// tile_zero_terms (stores are what this loop is short of).
template <class Stat>
inline void tile_terms(const LayerView& L, Stat&& stat, const StatsAhead& ahead, const float* sums, float* scales,
                       float* scale_zero, float* zero_terms) {
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();  // two chains hide the FMA latency
  for (int64_t j = 0; j < L.n_groups; ++j) {
    ahead.request(j);
    __m512 s, z;
    stat(j, s, z);
    _mm512_storeu_ps(scales + j * kTileRows, s);
    const __m512 sz = _mm512_mul_ps(s, z);
    if (sums == nullptr)
      _mm512_storeu_ps(scale_zero + j * kTileRows, sz);
    else if (j % 2)
      odd = _mm512_fmadd_ps(sz, _mm512_set1_ps(sums[j]), odd);
    else
      even = _mm512_fmadd_ps(sz, _mm512_set1_ps(sums[j]), even);
  }
  if (sums != nullptr) _mm512_storeu_ps(zero_terms, _mm512_add_ps(even, odd));
}

// zero_terms[v * 16 + lane] = sum_j scale_zero[j][lane] * X_vj (four chains hide the FMA latency).
inline void tile_zero_terms(int64_t G, int64_t n_vectors, const float* scale_zero, const float* sums,
                            float* zero_terms) {
  for (int64_t v = 0; v < n_vectors; ++v) {
    const float* X = sums + v * G;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // named, not an array: kept in registers
    int64_t j = 0;
    for (; j + 4 <= G; j += 4) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(scale_zero + j * kTileRows), _mm512_set1_ps(X[j]), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(scale_zero + (j + 1) * kTileRows), _mm512_set1_ps(X[j + 1]), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(scale_zero + (j + 2) * kTileRows), _mm512_set1_ps(X[j + 2]), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(scale_zero + (j + 3) * kTileRows), _mm512_set1_ps(X[j + 3]), a3);
    }
    for (; j < G; ++j) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(scale_zero + j * kTileRows), _mm512_set1_ps(X[j]), a0);
    _mm512_storeu_ps(zero_terms + v * kTileRows, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// acc + delta * x[col] over row `row`'s outliers, 16 at a time in the lanes; sets *bad on a column >= n.
inline __m512 add_outliers(const LayerView& L, const float* x, int64_t row, __m512 acc, bool* bad) {
  const int32_t end = L.outlier_row_ptr[row + 1];
  {
    const int32_t later = L.outlier_row_ptr[min64(row + kTileRows, L.m)];
    _mm_prefetch(reinterpret_cast<const char*>(L.outlier_col + later), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(L.outlier_col + later + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(L.outlier_delta + later), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(L.outlier_delta + later + 32), _MM_HINT_T0);
  }
  const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(L.n - 1));
  __mmask16 out_of_range = 0;
  for (int32_t p = L.outlier_row_ptr[row]; p < end; p += 16) {
    const __mmask16 live = end - p >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - p)) - 1u);
    const __m512i cols = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, L.outlier_col + p));
    out_of_range |= _mm512_mask_cmpgt_epi32_mask(live, cols, last);
    const __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, _mm512_min_epi32(cols, last), x, 4);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, L.outlier_delta + p)), xs, acc);
  }
  *bad |= out_of_range != 0;
  return acc;
}

// sum over row `row`'s outliers of delta * x[col]; sets *bad on a column >= n.
inline float outlier_dot(const LayerView& L, const float* x, int64_t row, bool* bad) {
  return _mm512_reduce_add_ps(add_outliers(L, x, row, _mm512_setzero_ps(), bad));
}

// Calls sink(stat, ahead) with stat(j, s, z) the decoder of the tile's statistics (16 rows from row0
// in lanes, column group j) that fits it: the inline decoders where the whole tile can take them, the
// generic per-group decoding otherwise; ahead holds the lines to request for a later tile.
template <class Sink>
inline void with_tile_statistics(const LayerView& L, StatStream& scale_stream, StatStream& zero_stream, int64_t row0,
                                 Sink&& sink) {
  const detail::TileChunks chunks = detail::tile_chunks(L, row0);
  StatsAhead ahead;
  add_stats_ahead(L, scale_stream, row0, ahead);
  add_stats_ahead(L, zero_stream, row0, ahead);
  if (chunks.uniform) {
    if (L.scale_bits != spqr_hf::kRawStatBits) select_chunk(L, scale_stream, chunks.chunk[0]);
    if (L.zero_bits != spqr_hf::kRawStatBits) select_chunk(L, zero_stream, chunks.chunk[0]);
  }
  const bool fast = fast_tile(scale_stream, chunks, row0) && fast_tile(zero_stream, chunks, row0);
  const StatStream sc = scale_stream, zc = zero_stream;  // local copies: the compiler need not reload them after each store
  const auto inline_stats = [&](auto raw_scale, auto raw_zero) {
    sink(
        [&](int64_t j, __m512& s, __m512& z) {
          s = fast_statistics<decltype(raw_scale)::value>(sc, j, row0);
          z = fast_statistics<decltype(raw_zero)::value>(zc, j, row0);
        },
        ahead);
  };
  using raw = std::true_type;
  using coded = std::false_type;
  if (fast && L.scale_bits == spqr_hf::kRawStatBits && L.zero_bits == spqr_hf::kRawStatBits)
    inline_stats(raw(), raw());
  else if (fast && L.scale_bits == spqr_hf::kRawStatBits)
    inline_stats(raw(), coded());
  else if (fast && L.zero_bits == spqr_hf::kRawStatBits)
    inline_stats(coded(), raw());
  else if (fast)
    inline_stats(coded(), coded());
  else
    sink(
        [&](int64_t j, __m512& s, __m512& z) {
          s = tile_statistics(L, scale_stream, chunks, j, row0);
          z = tile_statistics(L, zero_stream, chunks, j, row0);
        },
        ahead);
}

// The tile's per-group terms (see tile_terms) for the 16 rows from row0, one column group at a time
// with the rows in vector lanes. Shared by the bfloat16 matvec and the dequantisers.
inline void tile_statistics_terms(const LayerView& L, StatStream& scale_stream, StatStream& zero_stream, int64_t row0,
                                  const float* sums, float* scales, float* scale_zero, float* zero_terms) {
  with_tile_statistics(L, scale_stream, zero_stream, row0, [&](auto&& stat, const StatsAhead& ahead) {
    tile_terms(L, stat, ahead, sums, scales, scale_zero, zero_terms);
  });
}

// The two statistic streams with the transform the dot loops and dequantisers expect (see
// tile_terms): scales times 2^bits, zero points plus 2^bits.
inline void layer_stat_streams(const LayerView& L, float* tile_meta, StatStream& scale, StatStream& zero) {
  const float code_offset = static_cast<float>(1 << L.bits);
  scale = stat_stream(L, L.scale_codes, L.scale_row_bytes, L.scale_meta, L.scale_bits, code_offset, 0.0f, tile_meta);
  zero = stat_stream(L, L.zero_codes, L.zero_row_bytes, L.zero_meta, L.zero_bits, 1.0f, code_offset,
                     tile_meta + 2 * kMetaBlock * L.n_groups);
}

#include "int8_matvec.inc"

bool matvec(const LayerView& L, const float* xp, int64_t n_vectors, float* y, int64_t y_stride, int64_t row_begin,
            int64_t row_end, float* scratch) {
  if (!covers(L) || n_vectors > kMaxBatchVectors)
    return detail::matvec(L, xp, n_vectors, y, y_stride, row_begin, row_end, scratch);
  if (n_vectors <= kMaxVectors && int_covers(L)) {
    bool handled = false;
    const bool ok = int_matvec(L, xp, n_vectors, y, y_stride, row_begin, row_end, scratch, &handled);
    if (handled) return ok;
  }
  const int64_t G = L.n_groups, n_padded = L.n_padded;
  // Scratch (within scratch_floats(L, n_vectors)): the tile's scales [G][16], the
  // second-level parameters of a block of chunks, two padded code rows, group sums [n_vectors][G],
  // tile dot products and zero-point terms [n_vectors][16] each, the tile's s (z + 2^bits) [G][16],
  // then the 64-byte aligned bfloat16 hi and lo copies [n_vectors][n_padded * 2].
  float* scales = scratch;
  float* tile_meta = scales + G * kTileRows;  // [2 streams][step, bias][kMetaBlock][G]
  uint8_t* row_copy = reinterpret_cast<uint8_t*>(tile_meta + 4 * kMetaBlock * G);
  float* sums = reinterpret_cast<float*>(row_copy) + (2 * (L.qweight_row_bytes + 16)) / 4 + 1;
  float* dots = sums + n_vectors * G;
  float* zero_terms = dots + n_vectors * kTileRows;
  const uintptr_t after = reinterpret_cast<uintptr_t>(zero_terms + n_vectors * kTileRows + G * kTileRows);
  uint16_t* hi = reinterpret_cast<uint16_t*>((after + 63) & ~uintptr_t(63));
  uint16_t* lo = hi + n_vectors * n_padded * 2;

  const bool has_lo = split_activations(L, xp, n_vectors, hi, lo, sums);
  const Tables t = make_tables(L.bits);
  StatStream scale_stream, zero_stream;
  layer_stat_streams(L, tile_meta, scale_stream, zero_stream);
  bool ok = true;
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    const int64_t tile_end = min64(row0 + kTileRows, row_end);
    float* scale_zero = zero_terms + n_vectors * kTileRows;  // [G][16], see tile_terms
    const float* one_vector = n_vectors == 1 ? sums : nullptr;  // zero-point terms summed in tile_terms
    tile_statistics_terms(L, scale_stream, zero_stream, row0, one_vector, scales, scale_zero, zero_terms);
    if (one_vector == nullptr) tile_zero_terms(G, n_vectors, scale_zero, sums, zero_terms);
    if (has_lo)
      dot_tile_vectors<true>(L, t, n_vectors, row0, tile_end, hi, lo, scales, row_copy, dots);
    else
      dot_tile_vectors<false>(L, t, n_vectors, row0, tile_end, hi, lo, scales, row_copy, dots);
    bool bad = false;
    for (int64_t row = row0; row < tile_end; ++row)
      for (int64_t v = 0; v < n_vectors; ++v)
        y[v * y_stride + row] = dots[v * kTileRows + (row - row0)] - zero_terms[v * kTileRows + (row - row0)] +
                                outlier_dot(L, xp + v * n_padded, row, &bad);
    ok &= !bad;
  }
  return ok;
}


// Dequantisation for the batched (GEMM) path, for the layers covers() accepts. Each 16-column block
// of a row (at most 8 bytes of codes) is broadcast to every 64-bit word, VPMULTISHIFTQB moves code l
// to the top of dword l's mantissa and VPTERNLOGD sets the exponent of 1.0: the exact float32
// values u = 1 + c / 2^bits. With the tile's transformed statistics (tile_terms) s' = 2^bits * scale
// and s'z' = s' * (zero + 2^bits), the weight (c - zero) * scale is one FMA: s' * u - s'z' / 2^bits.
// About four vector instructions per 16 weights where the generic unpacking and bfloat16
// rounding took about sixteen.
struct RowTables {
  __m512i extract;  // VPMULTISHIFTQB control: code l at bits [23 - bits, 23) of dword l
  __m512i mantissa;  // the code's bits within each dword
  __m512i one;  // float32 1.0 in each dword
};

inline RowTables make_row_tables(int bits) {
  alignas(64) uint8_t extract[64];
  for (int l = 0; l < 16; ++l)
    for (int i = 0; i < 4; ++i)  // only byte 2 matters: the others are masked away
      extract[4 * l + i] = static_cast<uint8_t>((l * bits - (7 - bits) + 64) & 63);
  return {_mm512_load_si512(extract), _mm512_set1_epi32(((1 << bits) - 1) << (23 - bits)),
          _mm512_set1_epi32(0x3F800000)};
}

// The 16 codes of the block whose bytes start at p as float32 1 + c / 2^bits (reads 8 bytes).
inline __m512 block_units(const RowTables& t, const uint8_t* p) {
  int64_t word;
  memcpy(&word, p, sizeof(word));
  const __m512i fields = _mm512_multishift_epi64_epi8(t.extract, _mm512_set1_epi64(word));
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(fields, t.mantissa, t.one, 0xEA));  // (f & mantissa) | one
}

inline void store_weights(float* out, __m512 lo, __m512 hi, bool both) {
  _mm512_storeu_ps(out, lo);
  if (both) _mm512_storeu_ps(out + 16, hi);
}

inline void store_weights(uint16_t* out, __m512 lo, __m512 hi, bool both) {  // rounded to nearest even
  if (both) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(out, reinterpret_cast<const __m512i&>(pair));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), as_i(_mm512_cvtneps_pbh(lo)));
  }
}

// Dense row `row` of W_perm without its outliers into out[0..n_padded) (float32, or bfloat16
// rounded to nearest even), 32 columns at a time, zero past n.
template <class Out>
inline void dequant_row_codes(const LayerView& L, const RowTables& t, const uint8_t* codes, const float* s,
                              const float* o, Out* out) {
  // Locals, not L's fields: the compiler cannot tell that the stores leave them alone.
  const int64_t n = L.n, n_blocks = L.n_padded / kBlockCols, block_bytes = 2 * L.bits;
  const int32_t* lane_group = L.lane_group;
  const bool block_groups = L.n_groups == n_blocks;  // groups of 16: group j is block j
  const auto weights = [&](int64_t b) {  // the 16 weights of block b
    const int64_t j = block_groups ? b : lane_group[b * kBlockCols];
    return _mm512_fmadd_ps(block_units(t, codes + b * block_bytes), _mm512_set1_ps(s[j * kTileRows]),
                           _mm512_set1_ps(o[j * kTileRows]));
  };
  const int64_t whole = n / 32;  // 32-column steps with no column past n
  for (int64_t i = 0; i < whole; ++i) store_weights(out + 32 * i, weights(2 * i), weights(2 * i + 1), true);
  for (int64_t k = 32 * whole; k < L.n_padded; k += 32) {  // the last columns: zero past n
    const int64_t b = k / kBlockCols, live = n - k;
    const bool both = b + 1 < n_blocks;
    const __mmask16 lo_live = static_cast<__mmask16>(live >= 16 ? 0xFFFF : (1u << live) - 1u);
    const __m512 lo = _mm512_maskz_mov_ps(lo_live, weights(b));
    const __m512 hi = both && live > 16
                          ? _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << (live - 16)) - 1u), weights(b + 1))
                          : _mm512_setzero_ps();
    store_weights(out + k, lo, hi, both);
  }
}

// Whether row `row`'s outlier columns increase (as the packer writes them): then no column
// repeats, and each outlier's weight can be rewritten on its own (set_outlier).
inline bool outliers_increase(const LayerView& L, int64_t row) {
  bool increase = true;
  for (int32_t p = L.outlier_row_ptr[row] + 1; p < L.outlier_row_ptr[row + 1]; ++p)
    increase &= L.outlier_col[p - 1] < L.outlier_col[p];
  return increase;
}

inline void store_weight(float* out, float w) { *out = w; }
inline void store_weight(uint16_t* out, float w) {
  *out = as_i(_mm512_cvtneps_pbh(_mm512_set1_ps(w)))[0] & 0xFFFF;
}

// out[col] = the weight at column col < n recomputed as dequant_row_codes does (the same FMA, so
// the same float32), plus delta, rounded once.
template <class Out>
inline void set_outlier(const LayerView& L, const uint8_t* codes, const float* s, const float* o, int64_t col,
                        float delta, Out* out) {
  const int64_t bit = col * L.bits;
  uint16_t window;
  memcpy(&window, codes + bit / 8, sizeof(window));  // inside the row's 16-byte read window
  const int c = (window >> (bit % 8)) & ((1 << L.bits) - 1);
  const float unit = 1.0f + static_cast<float>(c) * (1.0f / static_cast<float>(1 << L.bits));  // exact, as block_units
  const int64_t j = L.lane_group[col];
  store_weight(out + col, std::fma(unit, s[j * kTileRows], o[j * kTileRows]) + delta);
}

// Rows [row_begin, row_end) of W_perm into dst (row stride ld): float32, or bfloat16 bits. With
// TILE_LOCAL, each 16-row tile is written from dst's first row and after_tile(row0, tile_end) runs
// on it before the next tile overwrites it.
template <bool TILE_LOCAL = false, class Out, class AfterTile>
inline bool dequant_rows(const LayerView& L, Out* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                         float* scratch, AfterTile&& after_tile) {
  // Scratch (within scratch_floats(L, 0)): the tile's scales [G][16], the second-level parameters of
  // a block of chunks, the tile's offsets [G][16], one padded code row, one float32 row (for a row
  // whose outlier columns do not increase).
  const int64_t G = L.n_groups;
  float* scales = scratch;
  float* tile_meta = scales + G * kTileRows;  // [2 streams][step, bias][kMetaBlock][G]
  float* offsets = tile_meta + 4 * kMetaBlock * G;
  uint8_t* row_copy = reinterpret_cast<uint8_t*>(offsets + G * kTileRows);
  float* row_buf = reinterpret_cast<float*>(row_copy) + (2 * (L.qweight_row_bytes + 16)) / 4 + 1;
  StatStream scale_stream, zero_stream;
  layer_stat_streams(L, tile_meta, scale_stream, zero_stream);
  const RowTables t = make_row_tables(L.bits);
  const __m512 minus_inv = _mm512_set1_ps(-1.0f / static_cast<float>(1 << L.bits));
  bool ok = true;
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    tile_statistics_terms(L, scale_stream, zero_stream, row0, nullptr, scales, offsets, nullptr);
    for (int64_t i = 0; i < G * kTileRows; i += kTileRows)  // s'z' -> -s'z' / 2^bits
      _mm512_storeu_ps(offsets + i, _mm512_mul_ps(_mm512_loadu_ps(offsets + i), minus_inv));
    for (int64_t row = row0; row < min64(row0 + kTileRows, row_end); ++row) {
      const uint8_t* codes;
      detail::row_bases<1>(L, row, row_copy, &codes);
      const float* s = scales + (row - row0);
      const float* o = offsets + (row - row0);
      Out* out = dst + (row - (TILE_LOCAL ? row0 : row_begin)) * ld;
      const int32_t first = L.outlier_row_ptr[row], end = L.outlier_row_ptr[row + 1];
      if (outliers_increase(L, row)) {
        dequant_row_codes(L, t, codes, s, o, out);
        for (int32_t p = first; p < end; ++p) {
          const int64_t col = L.outlier_col[p];
          if (col < L.n) set_outlier(L, codes, s, o, col, half1(L.outlier_delta[p]), out);
          ok &= col < L.n;
        }
        continue;
      }
      dequant_row_codes(L, t, codes, s, o, row_buf);  // float32: add the outliers one by one, round once
      for (int32_t p = first; p < end; ++p) {
        const int64_t col = L.outlier_col[p];
        if (col < L.n) row_buf[col] += half1(L.outlier_delta[p]);
        ok &= col < L.n;
      }
      for (int64_t k = 0; k < L.n_padded; k += 32) {
        const bool both = k + 16 < L.n_padded;
        const __m512 hi = both ? _mm512_loadu_ps(row_buf + k + 16) : _mm512_setzero_ps();
        store_weights(out + k, _mm512_loadu_ps(row_buf + k), hi, both);
      }
    }
    after_tile(row0, min64(row0 + kTileRows, row_end));
  }
  return ok;
}

bool dequant_f32(const LayerView& L, float* dst, int64_t ld, int64_t row_begin, int64_t row_end, float* scratch) {
  if (!covers(L)) return detail::dequant_f32(L, dst, ld, row_begin, row_end, scratch);
  return dequant_rows(L, dst, ld, row_begin, row_end, scratch, [](int64_t, int64_t) {});
}

bool dequant_bf16(const LayerView& L, uint16_t* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                  float* scratch) {
  if (!covers(L)) return detail::dequant_bf16(L, dst, ld, row_begin, row_end, scratch);
  return dequant_rows(L, dst, ld, row_begin, row_end, scratch, [](int64_t, int64_t) {});
}

// AMX intrinsics need GCC 11 or clang 12; older compilers build everything else.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define SPQR_HF_AMX_KERNELS 1
// ---- AMX (Intel Sapphire Rapids and later): small batches ----------------------------------
// Batches of up to kGemmMaxVectors bfloat16 activation vectors (ops.cpp sends 5 or more). The
// matvec's cost grows with each vector and the dequantise + torch GEMM path writes, reads and
// reorders the whole dense layer, so both lost to the dense bfloat16 GEMM there (4096 x 4096 at
// batch 16: 4.8 ms against 2.1). Here each
// 16-row tile is dequantised (dequant_rows) into a bfloat16 buffer that stays in L2 and multiplied
// on the tile unit straight away: C (16 rows x 16 vectors) += A (the tile's 16 rows x 32 columns,
// as stored) B (the same 32 columns of 16 vectors, as pairs of columns: built once per call).
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline int64_t k_tiles(const LayerView& L) { return (L.n_padded + 31) / 32; }

// bank[(p * k_tiles + t) * 512 + r * 32 + 2 * m + h] = x[16 p + m][32 t + 2 r + h] (bfloat16 bits;
// zero past n_padded and past n_vectors): the B tiles, one per K-tile and group of 16 vectors.
inline void build_bank(const LayerView& L, const uint16_t* xb, int64_t n_vectors, uint16_t* bank) {
  const int64_t kt = k_tiles(L), passes = (n_vectors + 15) / 16;
  for (int64_t p = 0; p < passes; ++p)
    for (int64_t t = 0; t < kt; ++t) {
      const int64_t cols = min64(32, L.n_padded - 32 * t);  // 16 or 32
      const __mmask16 live = static_cast<__mmask16>(cols == 32 ? 0xFFFF : 0x00FF);  // pairs of columns
      __m512i r[16];
      for (int m = 0; m < 16; ++m) {
        const int64_t v = 16 * p + m;
        r[m] = v < n_vectors ? _mm512_maskz_loadu_epi32(live, xb + v * L.n_padded + 32 * t) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[pair] = that pair of columns of the 16 vectors
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(bank + ((p * kt + t) * 16 + i) * 32, r[i]);
    }
}

}  // namespace amx

__attribute__((target("amx-tile,amx-bf16"))) bool gemm_amx(const LayerView& L, const uint16_t* xb, int64_t n_vectors,
                                                           float* y, int64_t y_stride, int64_t row_begin,
                                                           int64_t row_end, float* scratch) {
  const int64_t kt = amx::k_tiles(L), passes = (n_vectors + 15) / 16, ld = 32 * kt;
  // Scratch: dequant_rows' (scratch_floats(L, 0)), then 64-byte aligned the tile's bfloat16 rows
  // [16][32 * k_tiles] and the bank [passes][k_tiles][16][32] (gemm_scratch_floats).
  const uintptr_t after = reinterpret_cast<uintptr_t>(scratch + scratch_floats(L, 0));
  uint16_t* tile = reinterpret_cast<uint16_t*>((after + 63) & ~uintptr_t(63));
  uint16_t* bank = tile + kTileRows * ld;
  amx::build_bank(L, xb, n_vectors, bank);
  amx::TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = kTileRows, config.colsb[t] = 64;
  _tile_loadconfig(&config);
  // Columns past n_padded are never written: zero (not NaN) against the bank's zeros. Rows past the
  // last tile's end only reach C rows that are not read.
  memset(tile, 0, sizeof(uint16_t) * kTileRows * ld);
  alignas(64) float c[2][kTileRows * 16];
  const auto multiply = [&](int64_t row0, int64_t tile_end) {  // the tile's rows times every vector
    for (int64_t p = 0; p < passes; ++p) {
      _tile_zero(2);
      _tile_zero(3);  // two accumulators: consecutive products into one C wait for each other
      const uint16_t* b = bank + p * kt * 512;
      for (int64_t t = 0; t < kt; ++t) {
        _tile_loadd(0, tile + 32 * t, ld * 2);
        _tile_loadd(1, b + t * 512, 64);
        if (t % 2) _tile_dpbf16ps(3, 0, 1); else _tile_dpbf16ps(2, 0, 1);  // tile numbers are immediates
      }
      _tile_stored(2, c[0], 64);
      _tile_stored(3, c[1], 64);
      for (int64_t row = row0; row < tile_end; ++row)
        for (int64_t m = 0; m < min64(16, n_vectors - 16 * p); ++m)
          y[(16 * p + m) * y_stride + row] = c[0][(row - row0) * 16 + m] + c[1][(row - row0) * 16 + m];
    }
  };
  bool ok = true;
  if (covers(L)) {
    ok = dequant_rows<true>(L, tile, ld, row_begin, row_end, scratch, multiply);
  } else {
    for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
      const int64_t tile_end = min64(row0 + kTileRows, row_end);
      ok &= detail::dequant_bf16(L, tile, ld, row0, tile_end, scratch);
      multiply(row0, tile_end);
    }
  }
  _tile_release();
  return ok;
}
#endif  // AMX

}  // namespace bf16
}  // namespace isa_avx512bf16

const KernelTable kAvx512Bf16Kernels = {"avx512bf16", &isa_avx512bf16::bf16::matvec,
                                        &isa_avx512bf16::bf16::dequant_f32, &isa_avx512bf16::bf16::dequant_bf16,
                                        nullptr, nullptr, &isa_avx512bf16_planes::planes_matvec,
                                        &isa_avx512bf16_planes::planes_dequant_t,
                                        &isa_avx512bf16_planes::planes_dequant_t_bf16, true};
#if defined(SPQR_HF_AMX_KERNELS)
const KernelTable kAmxKernels = {"amx", &isa_avx512bf16::bf16::matvec, &isa_avx512bf16::bf16::dequant_f32,
                                 &isa_avx512bf16::bf16::dequant_bf16, &isa_avx512bf16::bf16::gemm_amx};
#else
const KernelTable kAmxKernels = {"amx", nullptr, nullptr, nullptr, nullptr};  // not built: has_amx() says no
#endif

}  // namespace cpu
}  // namespace spqr_hf

// The CPU plane layout of a layer's weight codes: the same codes as layout.h's row streams, arranged
// for table-lookup matvecs (csrc/cpu/plane_kernels.inc). Never stored in a checkpoint: SpQRLinear builds
// it from `qweight` on the CPU and converts back whenever the row streams are needed (saving, moving,
// other dtypes), so a module holds one copy of its codes, in one layout or the other.
//
// Why: a row-stream matvec converts every code to a number and multiplies it (AVX2: ~5 instructions
// per 16 weights and row, compute-bound at half the memory bandwidth on a 2-core Zen 3). Split into
// bit planes, the codes of 4 columns of one plane are a 4-bit index into a 16-entry table of partial
// sums of those 4 activations, and one VPSHUFB looks up 32 rows at once. Rows are the vector lanes, so
// per-row statistics are vectors too.
//
// Geometry (layers with groups of 16 columns, n a multiple of 16, codes of kPlaneMinBits..kPlaneMaxBits
// bits): rows in blocks of kPlaneRows = 32 (the last block padded with zero codes), columns in groups
// of 16, each group as 4 quads of 4 columns. The buffer is uint8
//   [blocks][G][bits][2][32]
// byte t of [b][j][p][h] holds, for row b * 32 + plane_row(t), bit p of the codes of quad 2h (low
// nibble) and quad 2h + 1 (high nibble) of group j: bit i of a nibble is column 16 j + 4 quad + i.
// The slot -> row order is what the AVX2 kernel's unpacking produces (32-bit lane l of its v-th result
// vector is row 8 v + l), so its per-row statistics load as they are stored.
//
// In the plane form a layer's second-level parameters (scale_meta, zero_meta) are chunk-major too,
// [R][G][2] instead of layout.h's [G][R][2] (SpQRLinear transposes them with the codes): a block's two
// chunks are then 2 * G contiguous pairs per stream, read in order, where the group-major rows put them
// 64 bytes (a line) apart per group; regathered every 8 blocks those lines cost ~5-11% of a cold call.
// They are held as int16 (the same float16 bits), so that the operator tells the forms apart by dtype
// even where R == G and the shapes agree.
#pragma once

#include <cstdint>
#include <cstring>

#include "spqr_hf/layout.h"

namespace spqr_hf {

constexpr int64_t kPlaneRows = 32;
constexpr int64_t kPlaneGroupCols = 16;
constexpr int kPlaneMinBits = 2;
constexpr int kPlaneMaxBits = 4;

// Row (within its block) whose bits byte slot t (0..31) holds.
SPQR_HD constexpr int plane_row(int t) { return 8 * ((t % 16) / 4) + 4 * (t / 16) + t % 4; }

// Whether a layer's codes can take the plane layout.
SPQR_HD bool plane_layout_fits(int64_t n, int64_t groupsize, int bits) {
  return bits >= kPlaneMinBits && bits <= kPlaneMaxBits && n % kPlaneGroupCols == 0 &&
         groupsize == kPlaneGroupCols;
}

SPQR_HD int64_t plane_blocks(int64_t m) { return num_groups(m, kPlaneRows); }

// Bytes of the plane layout of an m x n layer.
SPQR_HD int64_t plane_bytes(int64_t m, int64_t n, int bits) {
  return plane_blocks(m) * (n / kPlaneGroupCols) * bits * 2 * kPlaneRows;
}

// The 16 codes of group j of one row stream (a row of `row_words` words), as a 64-bit word with
// code i at bits [bits * i, bits * (i + 1)). Groups of 16 codes start on a byte (2 * bits bytes each).
inline uint64_t plane_group_codes(const uint32_t* row, int64_t row_words, int64_t j, int bits) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
  const int64_t first = j * 2 * bits, end = row_words * 4;
  uint64_t w = 0;
  for (int64_t k = 0; k < 2 * bits && first + k < end; ++k) w |= static_cast<uint64_t>(bytes[first + k]) << (8 * k);
  return w;
}

// qweight ([m, words_for(n, bits)] int32 row streams) -> planes (plane_bytes(m, n, bits), every byte
// written). Rows [block_begin * 32, block_end * 32) only, so callers can split the work.
inline void planes_from_rows(const uint32_t* qweight, int64_t m, int64_t n, int bits, uint8_t* planes,
                             int64_t block_begin, int64_t block_end) {
  const int64_t G = n / kPlaneGroupCols, row_words = words_for(n, bits), block_bytes = G * bits * 2 * kPlaneRows;
  for (int64_t b = block_begin; b < block_end; ++b) {
    uint8_t* out = planes + b * block_bytes;
    for (int t = 0; t < kPlaneRows; ++t) {
      const int64_t row = b * kPlaneRows + plane_row(t);
      for (int64_t j = 0; j < G; ++j) {
        const uint64_t w = row < m ? plane_group_codes(qweight + row * row_words, row_words, j, bits) : 0;
        for (int p = 0; p < bits; ++p) {
          unsigned nibbles = 0;  // bit 4 k + i: bit p of code 4 k + i
          for (int c = 0; c < 16; ++c) nibbles |= static_cast<unsigned>((w >> (bits * c + p)) & 1u) << c;
          uint8_t* at = out + (j * bits + p) * 2 * kPlaneRows + t;
          at[0] = static_cast<uint8_t>(nibbles & 0xFF);
          at[kPlaneRows] = static_cast<uint8_t>(nibbles >> 8);
        }
      }
    }
  }
}

// The plane form's statistics codes: where both streams have the same width of kStatBlockMinBits ..
// kStatBlockMaxBits bits and every 16-row half of a block lies inside one second-level chunk
// (stat_blocks_fit), SpQRLinear keeps scale_codes and zero_codes block-major too (uint8; never in a
// checkpoint):
//   [blocks][G][4 SB bytes], then kStatBlockPad zero bytes
// record (b, j) is bytes 4 SB b .. 4 SB b + 4 SB - 1 of group j's row stream: the codes of rows 32 b ..
// 32 b + 31 (zero past the stream's end). Why: the group-major streams put a block's records a row (G
// lines) apart, one line and one page per group; block by block they are read in order. Cold batch-1 calls
// on a Zen 4 took 0.82-0.86x the time on 4096 x 11008, 0.88-0.97x on 11008 x 4096, 0.97-1.0x on 4096 x 4096
// (benchmarks/RESULTS.md).
// The inline decoder reads 8 rows' codes as the 32-bit word at their first byte: the pad keeps the last
// record's words inside the buffer.
constexpr int kStatBlockMinBits = 2;
constexpr int kStatBlockMaxBits = 4;
constexpr int64_t kStatBlockPad = 4;

// Bytes of one record (32 rows of SB-bit codes).
SPQR_HD constexpr int64_t stat_record_bytes(int stat_bits) { return kPlaneRows * stat_bits / 8; }

// Whether a plane-form layer's statistics codes take the block-major form; qq_groupsize as the kernels
// see it (at most m).
SPQR_HD bool stat_blocks_fit(int scale_bits, int zero_bits, int64_t qq_groupsize) {
  return scale_bits == zero_bits && scale_bits >= kStatBlockMinBits && scale_bits <= kStatBlockMaxBits &&
         qq_groupsize % 16 == 0;
}

// Bytes of the block-major form of one statistics stream set ([G] rows of m codes).
SPQR_HD int64_t stat_blocks_bytes(int64_t m, int64_t G, int stat_bits) {
  return plane_blocks(m) * G * stat_record_bytes(stat_bits) + kStatBlockPad;
}

// Row streams (G rows of row_bytes bytes) -> the block-major form (stat_blocks_bytes, every byte written).
inline void stat_blocks_from_rows(const uint8_t* rows, int64_t row_bytes, int64_t m, int64_t G, int stat_bits,
                                  uint8_t* out) {
  const int64_t record = stat_record_bytes(stat_bits), blocks = plane_blocks(m);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < G; ++j)
      for (int64_t k = 0; k < record; ++k) {
        const int64_t at = b * record + k;
        out[(b * G + j) * record + k] = at < row_bytes ? rows[j * row_bytes + at] : 0;
      }
  for (int64_t k = 0; k < kStatBlockPad; ++k) out[blocks * G * record + k] = 0;
}

// The inverse: every byte of the G row streams written (row_bytes <= blocks * record: the streams end
// inside the last block's records).
inline void stat_rows_from_blocks(const uint8_t* blocks_in, int64_t m, int64_t G, int stat_bits, uint8_t* rows,
                                  int64_t row_bytes) {
  const int64_t record = stat_record_bytes(stat_bits);
  for (int64_t j = 0; j < G; ++j)
    for (int64_t at = 0; at < row_bytes; ++at)
      rows[j * row_bytes + at] = blocks_in[((at / record) * G + j) * record + at % record];
}

// spread[bits - kPlaneMinBits][byte]: bit i of byte at bit bits * i (one plane's bits of 8 codes, moved
// to where those codes' bits of that plane sit in a row stream).
struct PlaneSpread {
  uint32_t table[kPlaneMaxBits - kPlaneMinBits + 1][256];
};

inline const PlaneSpread& plane_spread() {
  static const PlaneSpread spread = [] {
    PlaneSpread s{};
    for (int bits = kPlaneMinBits; bits <= kPlaneMaxBits; ++bits)
      for (unsigned byte = 0; byte < 256; ++byte) {
        uint32_t v = 0;
        for (int i = 0; i < 8; ++i) v |= ((byte >> i) & 1u) << (bits * i);
        s.table[bits - kPlaneMinBits][byte] = v;
      }
    return s;
  }();
  return spread;
}

// The inverse: planes -> qweight rows [block_begin * 32, min(block_end * 32, m)), every word of those
// rows written (the padding bits of a row's last word zero, as the packer leaves them). A group's
// plane bytes are contiguous, so the loop runs group by group, its 32 rows in the inner loop.
inline void rows_from_planes(const uint8_t* planes, int64_t m, int64_t n, int bits, uint32_t* qweight,
                             int64_t block_begin, int64_t block_end) {
  const int64_t G = n / kPlaneGroupCols, row_words = words_for(n, bits), block_bytes = G * bits * 2 * kPlaneRows;
  const uint32_t* spread = plane_spread().table[bits - kPlaneMinBits];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* in = planes + b * block_bytes;
    uint8_t* rows[kPlaneRows];
    for (int t = 0; t < kPlaneRows; ++t) {
      const int64_t row = b * kPlaneRows + plane_row(t);
      rows[t] = row < m ? reinterpret_cast<uint8_t*>(qweight + row * row_words) : nullptr;
      if (rows[t] != nullptr)
        for (int64_t k = G * 2 * bits; k < row_words * 4; ++k) rows[t][k] = 0;
    }
    for (int64_t j = 0; j < G; ++j) {
      const uint8_t* group = in + j * bits * 2 * kPlaneRows;
      for (int t = 0; t < kPlaneRows; ++t) {
        if (rows[t] == nullptr) continue;
        uint64_t w = 0;
        for (int p = 0; p < bits; ++p) {
          const uint8_t* at = group + p * 2 * kPlaneRows + t;
          w |= static_cast<uint64_t>(spread[at[0]] | static_cast<uint64_t>(spread[at[kPlaneRows]]) << (8 * bits)) << p;
        }
        memcpy(rows[t] + j * 2 * bits, &w, static_cast<size_t>(2 * bits));  // little-endian, as the streams
      }
    }
  }
}

}  // namespace spqr_hf

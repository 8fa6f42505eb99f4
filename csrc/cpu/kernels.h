// ISA-neutral interface between the operator glue (ops.cpp, built with baseline flags) and the
// per-ISA kernel files (kernels_{scalar,avx2,avx512}.cpp, each built with its own -m flags).
//
// Only plain data and function pointers cross this boundary: no inline code is shared, so no
// AVX-512 copy of a helper can be picked by the linker for the scalar path (see kernel_body.inc).
// Every pointer and size in LayerView has been validated by ops.cpp before a kernel sees it.
#pragma once

#include <cstdint>

namespace spqr_hf {
namespace cpu {

constexpr int64_t kTileRows = 16;  // rows decoded together (statistics are unpacked 16 at a time)
constexpr int64_t kBlockCols = 16;  // weight codes unpacked together
constexpr int kMaxVectors = 4;  // activation vectors one matvec pass serves
// Batches of up to kMatvecMaxBatch vectors take a kernel table's matvec, larger ones a GEMM on
// dequantised tiles (ops.cpp); a table may raise the limit for layers its matvec serves faster
// (KernelTable::matvec_max_batch).
constexpr int64_t kMatvecMaxBatch = 8;
constexpr int kInt16MaxVectors = 16;  // vectors int16_matvec.inc takes (two at a time per superblock)
constexpr int kInt16SuperTiles = 4;  // tiles whose statistics int16_matvec.inc decodes together
constexpr int kInt16MetaChunks = 16;  // second-level chunks whose parameters it gathers together

// One packed layer (see src/spqr_hf/format/layout.py for the meaning of every buffer).
struct LayerView {
  const uint8_t* qweight;  // [m, qweight_row_bytes]
  int64_t qweight_row_bytes;
  const uint8_t* scale_codes;  // [G, scale_row_bytes], or block-major (stat_blocks)
  int64_t scale_row_bytes;
  const uint8_t* zero_codes;  // [G, zero_row_bytes], or block-major (stat_blocks)
  int64_t zero_row_bytes;
  const uint16_t* scale_meta;  // [G, R, 2] float16 bits ([R, G, 2] with planes), or nullptr when scale_bits == 16
  const uint16_t* zero_meta;  // the same for the zero points (zero_bits)
  // uint16 from one group / chunk to the next in both. Only the plane kernels and the generic decoder
  // (decode_stat_lanes) go by them; the row-stream kernels, which never see planes, index [G, R, 2].
  int64_t meta_group_stride, meta_chunk_stride;
  const int32_t* outlier_row_ptr;  // [m + 1], validated: 0, monotone, ends at nnz
  const uint16_t* outlier_col;  // [nnz] permuted columns (checked < n while used)
  const uint16_t* outlier_delta;  // [nnz] float16 bits
  int64_t m, n;  // out_features, in_features
  int64_t n_padded;  // n rounded up to kBlockCols
  int bits, scale_bits, zero_bits;
  int64_t groupsize, qq_groupsize, n_groups, n_chunks;
  const int32_t* lane_group;  // [n_padded] group of each permuted column (clamped to G - 1); row streams only
  const uint8_t* planes;  // the codes in the plane layout (spqr_hf/planes.h) instead of qweight, or nullptr
  bool stat_blocks;  // scale_codes / zero_codes in the block-major form (planes.h; *_row_bytes 0), else row streams
  int x_bits;  // significand bits of the activations' dtype (8 bfloat16, 11 float16, 24 float32): how
               // finely a kernel that quantises them (int8_matvec.inc) must represent them
};

// Per-thread scratch a kernel may use: at least scratch_floats(layer, n_vectors) floats (statistics
// of a tile and second-level parameters of 16 chunks, one dense row, two zero-padded copies of
// packed rows, and per activation vector its group sums, a bfloat16 hi/lo copy and a tile of dot
// products and zero-point terms). Its contents are left over from earlier calls: write before reading.
inline int64_t scratch_floats(const LayerView& layer, int64_t n_vectors) {
  // The integer matvecs: int8_matvec.inc, up to kMaxVectors vectors (statistics block, row-major
  // scales of two superblocks of 4 tiles, and per vector its group units and sums and three int8
  // levels of the activations), and int16_matvec.inc, up to kInt16MaxVectors (a superblock's tiles x
  // chunk vectors blocks of factors and zero-point terms, its tiles' second-level parameters and a
  // block of raw ones; per vector group units, two kinds of sums and two int16 levels; four padded
  // code rows).
  const int64_t G = layer.n_groups, G16 = (G + 15) / 16 * 16;
  const int64_t int8 = 64 * G + 128 * G16 + n_vectors * (G + G16 + 48 * ((G + 3) / 4)) + 16;
  const int64_t int16 = kInt16SuperTiles * (kTileRows * G + kTileRows + 4 * (G + 7)) + 2 * kInt16MetaChunks * (G + 7) +
                        n_vectors * (3 * G + 2 * kBlockCols * G / 2) + (4 * (layer.qweight_row_bytes + 16)) / 4 + 1 + 8;
  const int64_t others = 6 * G * kTileRows + layer.n_padded + (2 * (layer.qweight_row_bytes + 16)) / 4 + 1 +
                         n_vectors * (G + 2 * layer.n_padded + 2 * kTileRows) + 16;
  const int64_t integer = n_vectors < 1 ? 0
                          : n_vectors <= kMaxVectors ? (int8 > int16 ? int8 : int16)
                          : n_vectors <= kInt16MaxVectors ? int16 : 0;
  return others < integer ? integer : others;
}

// y[v, i] (fp32, row stride y_stride) = sum_k W_perm[i, k] * xp[v, k] for rows [row_begin, row_end)
// (a multiple of kTileRows, or m) and v < n_vectors; xp rows have stride n_padded, zero past n.
// Returns false when an outlier column is out of range (the caller raises).
using MatvecFn = bool (*)(const LayerView& layer, const float* xp, int64_t n_vectors, float* y, int64_t y_stride,
                          int64_t row_begin, int64_t row_end, float* scratch);

// Dense rows [row_begin, row_end) of W_perm, outliers included, into dst (row stride ld >= n_padded;
// columns [n, n_padded) set to zero), as float32 (DequantF32Fn) or bfloat16 bits rounded to nearest
// even (DequantBf16Fn). dst points at row row_begin. Returns false on a bad outlier column.
using DequantF32Fn = bool (*)(const LayerView& layer, float* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                              float* scratch);
using DequantBf16Fn = bool (*)(const LayerView& layer, uint16_t* dst, int64_t ld, int64_t row_begin,
                               int64_t row_end, float* scratch);

// y[v, i] (fp32, row stride y_stride) for rows [row_begin, row_end) and 2 <= n_vectors <=
// kGemmMaxVectors bfloat16 activation vectors xb (bits; rows of stride n_padded, zero past n).
// Scratch: scratch_floats(layer, 0) + gemm_scratch_floats(layer, n_vectors). Returns false on a bad
// outlier column.
using GemmFn = bool (*)(const LayerView& layer, const uint16_t* xb, int64_t n_vectors, float* y, int64_t y_stride,
                        int64_t row_begin, int64_t row_end, float* scratch);
constexpr int64_t kGemmMaxVectors = 64;

using MatvecBatchFn = int64_t (*)(const LayerView& layer);

inline int64_t gemm_scratch_floats(const LayerView& layer, int64_t n_vectors) {
  const int64_t k_tiles = (layer.n_padded + 31) / 32, passes = (n_vectors + 15) / 16;
  return 16 + (kTileRows * 32 * k_tiles + passes * k_tiles * 512) / 2;  // bfloat16 tile rows and bank
}

// The 32-row blocks of one plane matvec call, as its threads take them (ops.cpp): claim(ctx, share, &block,
// &stolen) gives the next block of the caller's own share (in order, stolen = false), then, that share
// done, one from the end of another share (stolen = true); false when no block is left. done(ctx,
// row_begin, row_end) hands finished rows (outliers added) back to the caller.
struct PlaneBlocks {
  void* ctx;
  bool (*claim)(void* ctx, int64_t share, int64_t* block, bool* stolen);
  void (*done)(void* ctx, int64_t row_begin, int64_t row_end);
};
// y[v, i] (fp32, row stride y_stride) for the rows of the blocks it claims from `blocks` as `share`, and
// 1 <= n_vectors <= kPlaneMaxVectors vectors xp (float32, as for MatvecFn) from the codes in layer.planes.
// Scratch: planes_scratch_floats(layer, n_vectors, table.planes_dot).
enum PlanesStatus : int { kPlanesOk = 0, kPlanesBadOutlier = 1, kPlanesUnrepresentable = 2 };
using PlanesMatvecFn = int (*)(const LayerView& layer, const float* xp, int64_t n_vectors, float* y, int64_t y_stride,
                               const PlaneBlocks& blocks, int64_t share, float* scratch);
// Beyond: planes_dequant_t and torch's GEMM (faster on a Zen 3 for bfloat16; for float32 the matvec of
// 24 vectors still took 0.67x the GEMM's time on a 4096 x 4096 layer).
constexpr int64_t kPlaneMaxVectors = 24;
// Where the GEMM runs in bfloat16 (bfloat16 activations, a CPU that multiplies them natively) the prefill
// path takes over sooner: on a Zen 4, 16 vectors took the matvec about as long as bfloat16 tiles and the
// GEMM on 4096 x 4096 (6-9 vs 7 ms) and less on 11008 x 4096 (17-20 vs 27 ms; benchmarks/RESULTS.md).
constexpr int64_t kPlaneMaxVectorsBf16Gemm = 16;

// Levels in which the plane matvec represents the activations: one for bfloat16 (2^-12 of a group's
// largest |x|), two for float16 and float32 (2^-24; plane_kernels.inc).
inline int plane_levels(const LayerView& layer) { return layer.x_bits <= 8 ? 1 : 2; }

// W_perm rows [row_begin, row_end) from layer.planes, transposed: dst[k * ld + row - row_begin] (float32,
// outliers included), rows up to the end of the last 32-row block written. Scratch: 64 floats.
using PlanesDequantFn = bool (*)(const LayerView& layer, float* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                                 float* scratch);

// The same as bfloat16 bits, each weight rounded once with its outlier added. Scratch:
// planes_dequant_bf16_scratch_floats.
using PlanesDequantBf16Fn = bool (*)(const LayerView& layer, uint16_t* dst, int64_t ld, int64_t row_begin,
                                     int64_t row_end, float* scratch);
constexpr int64_t kPlaneDequantRows = 256;  // rows the dequantisers take group by group (1 KiB float32 runs)
// Scratch of PlanesDequantBf16Fn for a layer with at most max_nnz outliers in kPlaneDequantRows rows from
// any multiple of 32: a float32 tile of 16 columns, a group's outlier bounds and the sorted outliers.
inline int64_t planes_dequant_bf16_scratch_floats(const LayerView& layer, int64_t max_nnz) {
  return 64 + 16 * kPlaneDequantRows + layer.n_groups + 2 * max_nnz + 16;
}

struct KernelTable {
  const char* name;
  MatvecFn matvec;
  DequantF32Fn dequant_f32;
  DequantBf16Fn dequant_bf16;
  GemmFn gemm;  // small bfloat16 batches on a matrix unit, or nullptr
  MatvecBatchFn matvec_max_batch;  // the largest batch the matvec takes for a layer; nullptr: kMatvecMaxBatch
  PlanesMatvecFn planes_matvec;  // matvec on the plane layout, or nullptr (ops.cpp converts it back)
  PlanesDequantFn planes_dequant_t;  // its prefill dequantiser, or nullptr
  PlanesDequantBf16Fn planes_dequant_t_bf16;  // the same to bfloat16 (for a bfloat16 GEMM), or nullptr
  // Whether planes_matvec has plane_dot.inc's kernel (batches kPlaneDotMinVectors to kPlaneDotMaxVectors
  // run it; it takes up to kPlaneDotMaxVectors) or only the table lookups (up to kPlaneMaxVectors,
  // kPlaneMaxVectorsBf16Gemm where the GEMM would run in bfloat16).
  bool planes_dot;
};

// Whether a table runs the plane layout itself (else ops.cpp converts it back to row streams per call).
inline bool has_plane_kernels(const KernelTable& table) {
  return table.planes_matvec != nullptr && table.planes_dequant_t != nullptr && table.planes_dequant_t_bf16 != nullptr;
}

// The AVX2 plane kernels built with the AVX-512 flags too (kernels_avx2_evex.cpp), which the AVX-512
// tables share: on a Zen 4 a bfloat16 4096 x 4096 matvec took 0.6-0.75x the avx512bf16 row-stream
// kernel's time, and 0.91-0.96x the AVX2 build's (32 vector registers: no spilled accumulators).
namespace isa_avx2_evex {
int planes_matvec(const LayerView& layer, const float* xp, int64_t n_vectors, float* y, int64_t y_stride,
                  const PlaneBlocks& blocks, int64_t share, float* scratch);
bool planes_dequant_t(const LayerView& layer, float* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                      float* scratch);
bool planes_dequant_t_bf16(const LayerView& layer, uint16_t* dst, int64_t ld, int64_t row_begin, int64_t row_end,
                           float* scratch);
}  // namespace isa_avx2_evex

// The same built again for the avx512bf16 and avx512vnni tables (kernels_avx512bf16_planes.cpp,
// kernels_avx512vnni_planes.cpp), with their flags and BITALG: their plane matvec gives batches of
// kPlaneDotMinVectors to kPlaneDotMaxVectors to plane_dot.inc's kernel (fewer: the table lookups, more:
// the prefill path; on a Zen 4 the kernel was as fast as the lookups or faster from 3 vectors on, and as
// fast as the prefill or faster up to 64, for every activation dtype; benchmarks/RESULTS.md).
#define SPQR_HF_PLANE_DOT_DECLS(ns)                                                                          \
  namespace ns {                                                                                             \
  int planes_matvec(const LayerView& layer, const float* xp, int64_t n_vectors, float* y, int64_t y_stride, \
                    const PlaneBlocks& blocks, int64_t share, float* scratch);                               \
  bool planes_dequant_t(const LayerView& layer, float* dst, int64_t ld, int64_t row_begin, int64_t row_end, \
                        float* scratch);                                                                      \
  bool planes_dequant_t_bf16(const LayerView& layer, uint16_t* dst, int64_t ld, int64_t row_begin,          \
                             int64_t row_end, float* scratch);                                                \
  }
SPQR_HF_PLANE_DOT_DECLS(isa_avx512bf16_planes)
SPQR_HF_PLANE_DOT_DECLS(isa_avx512vnni_planes)
#undef SPQR_HF_PLANE_DOT_DECLS
constexpr int64_t kPlaneDotMinVectors = 3;
constexpr int64_t kPlaneDotMaxVectors = 64;
// Whether such a plane matvec gives n_vectors to the dot-product kernel: its dispatch and the scratch
// size below both ask this (a dispatch alone widened overran the lookups' scratch in an experiment).
inline bool plane_dot_takes(int64_t n_vectors) {
  return n_vectors >= kPlaneDotMinVectors && n_vectors <= kPlaneDotMaxVectors;
}

// The dot-product kernel (plane_dot.inc) holds each activation in up to this many 16-bit parts (int16 levels).
constexpr int kPlaneDotMaxParts = 2;

// The most bytes of activation tables the table lookups build per 16-column group and level
// (plane_kernels.inc's kGroupTableBytes in each of its builds).
constexpr int64_t kPlaneGroupTableBytes = 256;

// Scratch of a plane matvec of n_vectors vectors: the table lookups' or, where the table has the
// dot-product kernel (`dots`) and the batch is its, that kernel's.
inline int64_t planes_scratch_floats(const LayerView& layer, int64_t n_vectors, bool dots) {
  const int64_t G = layer.n_groups, G8 = (G + 7) / 8 * 8;
  if (dots && plane_dot_takes(n_vectors))
    // Per vector: a block's 32 accumulators, group sums and units, pairs of the parts; the vectors
    // transposed (16 at a time); second-level parameters of 2 chunks of both streams; 64 statistic
    // lanes; alignment.
    return n_vectors * (32 + 2 * G + 8 * G * kPlaneDotMaxParts) + layer.n * ((n_vectors + 15) / 16 * 16) + 8 * G8 +
           64 + 16;
  // Table lookups, per vector: tables (up to kPlaneGroupTableBytes per group and level), units and group
  // sums; the same rest.
  return n_vectors * (kPlaneGroupTableBytes / 4 * G * plane_levels(layer) + 2 * G) + 8 * G8 + 64 + 16;
}

extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512VnniKernels;
extern const KernelTable kAvx512Bf16Kernels;
extern const KernelTable kAmxKernels;

}  // namespace cpu
}  // namespace spqr_hf

// CPU kernel of spqr_hf::spqr_linear (schema defined in src/spqr_hf/ops/_schema.py).
//
// Validates every shape, dtype, size and index it is given (a corrupted checkpoint raises a
// Python exception, never reads out of bounds), then runs on torch's intra-op thread pool:
//   * bfloat16 batches of kGemmMinBatch..kGemmMaxVectors rows, where the kernels have a matrix unit
//     (AMX): 16-row tiles dequantised into L2 and multiplied there (gemm);
//   * batch <= kMatvecMaxBatch rows (kernels.h; more where the kernels' matvec_max_batch says so): the
//     matvec kernel reads the packed buffers directly;
//   * larger batches (prefill): row tiles of W_perm are dequantised into a cache-sized buffer
//     (float32, or bfloat16 for bfloat16 activations on CPUs that multiply bfloat16 natively) and
//     multiplied by torch's GEMM.
// Both accumulate in float32; the output has the activation dtype. qweight may also hold the codes in
// the CPU plane layout (spqr_hf/planes.h, uint8; SpQRLinear's form where the kernels have it): batches
// up to kPlaneMaxVectors (kPlaneMaxVectorsBf16Gemm where the GEMM would run in bfloat16;
// kPlaneDotMaxVectors where the table has the dot-product kernel) take the plane matvec, larger batches
// transposed tiles dequantised from the planes (float32 or bfloat16, as above) and torch's GEMM; on
// kernels without the plane layout they run on row streams converted back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"
#include "spqr_hf/layout.h"
#include "spqr_hf/planes.h"

namespace spqr_hf {
namespace cpu {
namespace {

constexpr int64_t kGemmMinBatch = 5;  // bfloat16 batches from here to kGemmMaxVectors: the kernels' gemm, if any
                                      // (up to 4 vectors the matvec is as fast or faster)
// Rows of W_perm dequantised per GEMM call. Wide: torch's bfloat16 GEMM (oneDNN, AMX on Intel Xeon)
// took up to twice as long per row at 384-640 output columns as at 768 or more for 512-token
// prefills, and 4 MiB tiles (512 rows of 4096 columns) fell right there: 20 ms instead of 11 for
// a 4096 x 4096 layer (benchmarks/RESULTS.md). Capped in bytes for very wide layers.
constexpr int64_t kGemmTileRows = 1024;
constexpr int64_t kGemmTileMaxBytes = int64_t(24) << 20;
// Rows per thread's tile dequantised from the plane layout, stored transposed ([n, rows]): a column's run
// is one tile row, so tiles of 1024 rows wrote 4 KiB runs to 4096 pages (a 4096-column layer), past the
// TLB, and were slower than the row streams' tiles (Zen 3). At most 128 rows and 4 MiB per thread (Zen 4,
// one tile per thread, bfloat16 at batch 32: 128 rows took 0.99-1.18x the time of 256 on 11008 x 4096,
// 0.83-0.85x on 4096 x 11008; float32 on 4096 x 11008 at batch 512: 32 rows 1.29x the time of 128, 64
// rows 1.08x; benchmarks/RESULTS.md).
constexpr int64_t kPlaneGemmTileRows = 128;
constexpr int64_t kPlaneGemmTileBytes = int64_t(4) << 20;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Rows of W_perm per prefill tile: a multiple of `unit`, at most max_rows and (unless one unit is more)
// max_bytes of row_bytes each, and no more than the layer has.
int64_t tile_rows_for(int64_t m, int64_t unit, int64_t max_rows, int64_t max_bytes, int64_t row_bytes) {
  return std::min(round_up(m, unit), std::max(unit, std::min(max_rows, max_bytes / row_bytes) / unit * unit));
}

// The calling thread's kernel scratch, kept between calls: a decode step makes ~150 small calls,
// and allocating and clearing up to a megabyte for each showed in their time. The kernels write
// every scratch float before reading it; SPQR_HF_POISON_SCRATCH=1 fills it with NaN on every call
// so that the tests catch any that does not (tests/test_cpu_kernels.py).
float* thread_scratch(int64_t floats) {
  static const bool poison = std::getenv("SPQR_HF_POISON_SCRATCH") != nullptr;
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  if (poison) std::fill(buffer.begin(), buffer.end(), std::nanf(""));
  return buffer.data();
}

// A float buffer of the calling thread, at least `floats` long, kept between calls like thread_scratch;
// each Use is its own buffer.
enum class Use { kResult, kActivations };
template <Use U>
float* kept_floats(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}

// The calling thread's float32 result of a matvec / gemm call before finish_rows converts it (the
// worker threads write their rows of it).
float* result_scratch(int64_t floats) { return kept_floats<Use::kResult>(floats); }

// out[v, r] = y[v * m + r] + bias[r] (bias may be null) for rows [row_begin, row_end) of every vector,
// in out's dtype (the same rounding as a float32 tensor's .to()). y may be out's own float32 data.
void finish_rows(float* y, int64_t batch, int64_t m, int64_t row_begin, int64_t row_end, const float* bias,
                 const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "spqr_finish_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t v = 0; v < batch; ++v)
      for (int64_t r = row_begin; r < row_end; ++r) {
        const float value = bias != nullptr ? y[v * m + r] + bias[r] : y[v * m + r];
        o[v * m + r] = static_cast<scalar_t>(value);
      }
  });
}

// A plane matvec's blocks (kernels.h, PlaneBlocks) in one contiguous share per thread, as parallel_for
// would split them, each share's unclaimed blocks [next, end) in one atomic word: its thread takes them
// from the front, threads done with their own from the back. Why: the threads of a cold 4096 x 4096 call
// finished up to 15-20% apart, either one first, the call waiting for the later (benchmarks/RESULTS.md).
class BlockShares {
 public:
  BlockShares(int64_t blocks, int64_t shares) : count_(shares), ranges_(static_cast<size_t>(shares)) {
    const int64_t chunk = (blocks + shares - 1) / shares;
    for (int64_t s = 0; s < shares; ++s) {
      const int64_t begin = std::min(blocks, s * chunk), end = std::min(blocks, begin + chunk);
      ranges_[static_cast<size_t>(s)].word.store(pack(begin, end), std::memory_order_relaxed);
    }
  }
  int64_t count() const { return count_; }

  bool claim(int64_t share, int64_t* block, bool* stolen) {
    std::atomic<uint64_t>& own = ranges_[static_cast<size_t>(share)].word;
    for (uint64_t r = own.load(std::memory_order_relaxed); next(r) < end(r);)
      if (own.compare_exchange_weak(r, pack(next(r) + 1, end(r)), std::memory_order_relaxed)) {
        *block = next(r);
        *stolen = false;
        return true;
      }
    for (int64_t k = 1; k < count_; ++k) {
      std::atomic<uint64_t>& other = ranges_[static_cast<size_t>((share + k) % count_)].word;
      for (uint64_t r = other.load(std::memory_order_relaxed); next(r) < end(r);)
        if (other.compare_exchange_weak(r, pack(next(r), end(r) - 1), std::memory_order_relaxed)) {
          *block = end(r) - 1;
          *stolen = true;
          return true;
        }
    }
    return false;
  }

 private:
  struct alignas(64) Range {  // a line each: a thread's claims do not disturb another's
    std::atomic<uint64_t> word{0};
  };
  static uint64_t pack(int64_t next, int64_t end) { return static_cast<uint64_t>(next) | static_cast<uint64_t>(end) << 32; }
  static int64_t next(uint64_t r) { return static_cast<int64_t>(r & 0xFFFFFFFFu); }
  static int64_t end(uint64_t r) { return static_cast<int64_t>(r >> 32); }

  int64_t count_;
  std::vector<Range> ranges_;
};

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "spqr_linear: packed tensor '", name, "' is on ", t.device(),
              "; move the whole layer to the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "spqr_linear: packed tensor '", name, "' has dtype ", t.scalar_type(),
              ", expected ", dtype, " (corrupted or mismatched checkpoint?)");
  TORCH_CHECK(t.sizes() == shape, "spqr_linear: packed tensor '", name, "' has shape ", t.sizes(), ", expected ",
              shape, " for this layer's in/out features, bits and group sizes (corrupted or mismatched checkpoint?)");
}

bool valid_stat_bits(int64_t b) { return (b >= kMinBits && b <= kMaxBits) || b == kRawStatBits; }

const KernelTable& kernels_or_throw() {
  std::string error;
  const KernelTable* table = select_kernels(&error);
  TORCH_CHECK(table != nullptr, "spqr_linear: ", error);
  return *table;
}

// The calling thread's float32 activations of a plane matvec, permuted (permute_columns_into): a tensor
// per call took 2-4% of a small layer's warm call (192 x 576 to 256 x 2048; 0.4% of 2048 x 2048).
float* activation_scratch(int64_t floats) { return kept_floats<Use::kActivations>(floats); }

// x[:, perm] as rows of length n_padded (zero past n) into out, in `dtype` (float32, or x's own dtype),
// rows split across threads for prefill batches (index_select along the columns took 14 ms for a
// 512 x 11008 bfloat16 batch, a quarter of the GEMM it feeds).
void permute_columns_into(const at::Tensor& x2, const uint16_t* perm, int64_t n, int64_t n_padded,
                          at::ScalarType dtype, void* out) {
  const int64_t rows = x2.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "spqr_permute", [&] {
    const scalar_t* in = x2.data_ptr<scalar_t>();
    const auto gather = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      at::parallel_for(0, rows, rows >= 16 ? 1 : rows, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          out_t* o = out + r * n_padded;
          for (int64_t k = 0; k < n; ++k) o[k] = static_cast<out_t>(in[r * n + perm[k]]);
          for (int64_t k = n; k < n_padded; ++k) o[k] = out_t(0);
        }
      });
    };
    if (dtype == at::kFloat)
      gather(static_cast<float*>(out));
    else
      gather(static_cast<scalar_t*>(out));
  });
}

// permute_columns_into a new tensor [rows, n_padded].
at::Tensor permute_columns(const at::Tensor& x2, const uint16_t* perm, int64_t n, int64_t n_padded,
                           at::ScalarType dtype) {
  at::Tensor xp = at::empty({x2.size(0), n_padded}, x2.options().dtype(dtype));
  permute_columns_into(x2, perm, n, n_padded, dtype, xp.data_ptr());
  return xp;
}

// The geometry checks of the plane layout's ops (the layout needs groups of 16 and 2-4 bit codes).
void check_plane_geometry(const char* op, int64_t n, int64_t m, int64_t bits, int64_t groupsize) {
  TORCH_CHECK(n >= 1 && n <= kMaxInFeatures && m >= 1 && m < (int64_t(1) << 31), op, ": in_features=", n,
              " and out_features=", m, " out of range");
  TORCH_CHECK(plane_layout_fits(n, groupsize, static_cast<int>(bits)), op, ": the plane layout needs bits in [",
              kPlaneMinBits, ", ", kPlaneMaxBits, "], groupsize ", kPlaneGroupCols, " and in_features a multiple of ",
              kPlaneGroupCols, "; got bits=", bits, ", groupsize=", groupsize, ", in_features=", n);
}

// qweight's row streams as the plane layout (uint8 [plane_bytes]); blocks of rows split across threads.
at::Tensor planes_from_rows_cpu(const at::Tensor& qweight, int64_t in_features, int64_t out_features, int64_t bits) {
  const int64_t n = in_features, m = out_features;
  check_plane_geometry("planes_from_rows", n, m, bits, kPlaneGroupCols);
  check_buffer(qweight, "qweight", at::kInt, {m, words_for(n, bits)});
  const at::Tensor qw = qweight.contiguous();
  at::Tensor planes = at::empty({plane_bytes(m, n, static_cast<int>(bits))}, qweight.options().dtype(at::kByte));
  const uint32_t* rows = reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>());
  uint8_t* out = planes.data_ptr<uint8_t>();
  at::parallel_for(0, plane_blocks(m), 1, [&](int64_t begin, int64_t end) {
    planes_from_rows(rows, m, n, static_cast<int>(bits), out, begin, end);
  });
  return planes;
}

// The plane layout back as qweight's row streams (int32 [m, words_for(n, bits)]).
at::Tensor rows_from_planes_cpu(const at::Tensor& planes, int64_t in_features, int64_t out_features, int64_t bits) {
  const int64_t n = in_features, m = out_features;
  check_plane_geometry("rows_from_planes", n, m, bits, kPlaneGroupCols);
  check_buffer(planes, "qweight", at::kByte, {plane_bytes(m, n, static_cast<int>(bits))});
  const at::Tensor pl = planes.contiguous();
  at::Tensor qweight = at::empty({m, words_for(n, bits)}, planes.options().dtype(at::kInt));
  const uint8_t* in = pl.data_ptr<uint8_t>();
  uint32_t* rows = reinterpret_cast<uint32_t*>(qweight.data_ptr<int32_t>());
  at::parallel_for(0, plane_blocks(m), 1, [&](int64_t begin, int64_t end) {
    rows_from_planes(in, m, n, static_cast<int>(bits), rows, begin, end);
  });
  return qweight;
}

// The geometry checks of the block-major statistics form's ops (as check_plane_geometry for the codes').
void check_stat_block_geometry(const char* op, int64_t m, int64_t G, int64_t stat_bits) {
  TORCH_CHECK(m >= 1 && m < (int64_t(1) << 31) && G >= 1 && G <= kMaxInFeatures, op, ": out_features=", m,
              " and n_groups=", G, " out of range");
  TORCH_CHECK(stat_bits >= kStatBlockMinBits && stat_bits <= kStatBlockMaxBits, op,
              ": the block-major statistics form needs stat_bits in [", kStatBlockMinBits, ", ", kStatBlockMaxBits,
              "]; got ", stat_bits);
}

// A statistics stream set's int32 row streams ([G, words_for(m, stat_bits)]) as the block-major form (uint8
// [stat_blocks_bytes]; spqr_hf/planes.h).
at::Tensor stat_blocks_from_rows_cpu(const at::Tensor& codes, int64_t out_features, int64_t stat_bits) {
  const int64_t m = out_features;
  TORCH_CHECK(codes.dim() == 2, "stat_blocks_from_rows: codes must be [groups, words], got ", codes.sizes());
  const int64_t G = codes.size(0);
  check_stat_block_geometry("stat_blocks_from_rows", m, G, stat_bits);
  check_buffer(codes, "codes", at::kInt, {G, words_for(m, stat_bits)});
  const at::Tensor rows = codes.contiguous();
  at::Tensor out = at::empty({stat_blocks_bytes(m, G, static_cast<int>(stat_bits))}, codes.options().dtype(at::kByte));
  stat_blocks_from_rows(static_cast<const uint8_t*>(rows.const_data_ptr()), rows.size(1) * 4, m, G,
                        static_cast<int>(stat_bits), out.data_ptr<uint8_t>());
  return out;
}

// The block-major form back as the int32 row streams [n_groups, words_for(m, stat_bits)], bit for bit.
at::Tensor stat_rows_from_blocks_cpu(const at::Tensor& blocks, int64_t n_groups, int64_t out_features,
                                     int64_t stat_bits) {
  const int64_t m = out_features, G = n_groups;
  check_stat_block_geometry("stat_rows_from_blocks", m, G, stat_bits);
  check_buffer(blocks, "codes", at::kByte, {stat_blocks_bytes(m, G, static_cast<int>(stat_bits))});
  const at::Tensor in = blocks.contiguous();
  at::Tensor rows = at::empty({G, words_for(m, stat_bits)}, blocks.options().dtype(at::kInt));
  stat_rows_from_blocks(in.data_ptr<uint8_t>(), m, G, static_cast<int>(stat_bits),
                        reinterpret_cast<uint8_t*>(rows.data_ptr<int32_t>()), rows.size(1) * 4);
  return rows;
}

at::Tensor spqr_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale_codes,
                           const at::Tensor& zero_codes, const std::optional<at::Tensor>& scale_meta,
                           const std::optional<at::Tensor>& zero_meta, const at::Tensor& perm,
                           const at::Tensor& outlier_row_ptr, const at::Tensor& outlier_col,
                           const at::Tensor& outlier_delta, const std::optional<at::Tensor>& bias, int64_t in_features,
                           int64_t out_features, int64_t bits, int64_t groupsize, int64_t qq_groupsize,
                           int64_t scale_bits, int64_t zero_bits) {
  const int64_t n = in_features, m = out_features;
  // Geometry.
  TORCH_CHECK(n >= 1 && n <= kMaxInFeatures, "spqr_linear: in_features=", n, " must be in [1, ", kMaxInFeatures, "]");
  TORCH_CHECK(m >= 1 && m < (int64_t(1) << 31), "spqr_linear: out_features=", m, " must be in [1, 2^31)");
  TORCH_CHECK(bits >= kMinBits && bits <= kMaxBits, "spqr_linear: bits=", bits, " must be in [", kMinBits, ", ",
              kMaxBits, "]");
  TORCH_CHECK(valid_stat_bits(scale_bits) && valid_stat_bits(zero_bits), "spqr_linear: scale_bits=", scale_bits,
              " and zero_bits=", zero_bits, " must be in [2, 8] or 16");
  TORCH_CHECK(groupsize >= 1 && qq_groupsize >= 1, "spqr_linear: groupsize=", groupsize,
              " and qq_groupsize=", qq_groupsize, " must be positive (whole-row groups are passed as their size)");
  const int64_t G = num_groups(n, std::min(groupsize, n));
  const int64_t R = num_groups(m, std::min(qq_groupsize, m));
  // Activations.
  TORCH_CHECK(x.device().is_cpu(), "spqr_linear: the CPU kernel got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "spqr_linear: x has dtype ", x.scalar_type(), "; use float32, bfloat16 or float16 activations");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, "spqr_linear: x has shape ", x.sizes(), ", expected [..., ", n, "]");
  // Packed buffers.
  // qweight holds the row streams (int32), or the codes in the plane layout (uint8, SpQRLinear's CPU form).
  const bool planes = qweight.scalar_type() == at::kByte;
  if (planes) {
    check_plane_geometry("spqr_linear", n, m, bits, std::min(groupsize, n));
    check_buffer(qweight, "qweight", at::kByte, {plane_bytes(m, n, static_cast<int>(bits))});
  } else {
    check_buffer(qweight, "qweight", at::kInt, {m, words_for(n, bits)});
  }
  // The statistics codes: int32 row streams [G, words], or with planes the block-major form (uint8,
  // spqr_hf/planes.h; SpQRLinear's form where stat_blocks_fit).
  const int64_t qq_seen = std::min(qq_groupsize, m);  // qq_groupsize as the kernels see it
  const bool stat_blocks = scale_codes.scalar_type() == at::kByte;
  if (stat_blocks) {
    TORCH_CHECK(planes && stat_blocks_fit(static_cast<int>(scale_bits), static_cast<int>(zero_bits), qq_seen),
                "spqr_linear: uint8 'scale_codes' (the block-major statistics form) needs the plane layout and "
                "scale_bits == zero_bits in [", kStatBlockMinBits, ", ", kStatBlockMaxBits,
                "] with qq_groupsize a multiple of 16; got scale_bits=", scale_bits, ", zero_bits=", zero_bits,
                ", qq_groupsize=", qq_groupsize);
    check_buffer(scale_codes, "scale_codes", at::kByte, {stat_blocks_bytes(m, G, static_cast<int>(scale_bits))});
    check_buffer(zero_codes, "zero_codes", at::kByte, {stat_blocks_bytes(m, G, static_cast<int>(zero_bits))});
  } else {
    check_buffer(scale_codes, "scale_codes", at::kInt, {G, words_for(m, scale_bits)});
    check_buffer(zero_codes, "zero_codes", at::kInt, {G, words_for(m, zero_bits)});
  }
  // The second-level parameters: float16 [G, R, 2]; with planes chunk-major [R, G, 2] and int16 (the
  // same bits: told apart by dtype where R == G; spqr_hf/planes.h).
  const std::vector<int64_t> meta_shape = planes ? std::vector<int64_t>{R, G, 2} : std::vector<int64_t>{G, R, 2};
  const at::ScalarType meta_dtype = planes ? at::kShort : at::kHalf;
  if (scale_bits != kRawStatBits) {
    TORCH_CHECK(scale_meta.has_value(), "spqr_linear: scale_bits=", scale_bits, " needs 'scale_meta'");
    check_buffer(*scale_meta, "scale_meta", meta_dtype, meta_shape);
  }
  if (zero_bits != kRawStatBits) {
    TORCH_CHECK(zero_meta.has_value(), "spqr_linear: zero_bits=", zero_bits, " needs 'zero_meta'");
    check_buffer(*zero_meta, "zero_meta", meta_dtype, meta_shape);
  }
  check_buffer(perm, "perm", at::kShort, {n});
  check_buffer(outlier_row_ptr, "outlier_row_ptr", at::kInt, {m + 1});
  const int64_t nnz = outlier_col.numel();
  check_buffer(outlier_col, "outlier_col", at::kShort, {nnz});
  check_buffer(outlier_delta, "outlier_delta", at::kHalf, {nnz});
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->size(0) == m,
                "spqr_linear: bias must be a floating CPU tensor of shape [", m, "], got ", bias->sizes(), " ",
                bias->scalar_type(), " on ", bias->device());
  }

  // The plane layout has its kernels where the CPU's kernel table has them; elsewhere calls run on the
  // row streams converted back (correct, but paying a conversion per call).
  const KernelTable& kernels = kernels_or_throw();
  const int64_t batch = x.numel() / n;
  const auto on_rows = [&]() {
    const auto group_major = [](const std::optional<at::Tensor>& meta) -> std::optional<at::Tensor> {
      if (!meta.has_value()) return std::nullopt;
      return meta->transpose(0, 1).contiguous().view(at::kHalf);
    };
    const auto stat_rows = [&](const at::Tensor& codes, int64_t stat_bits) {
      return stat_blocks ? stat_rows_from_blocks_cpu(codes, G, m, stat_bits) : codes;
    };
    return spqr_linear_cpu(x, rows_from_planes_cpu(qweight, n, m, bits), stat_rows(scale_codes, scale_bits),
                           stat_rows(zero_codes, zero_bits),
                           scale_bits != kRawStatBits ? group_major(scale_meta) : scale_meta,
                           zero_bits != kRawStatBits ? group_major(zero_meta) : zero_meta, perm, outlier_row_ptr,
                           outlier_col, outlier_delta, bias, in_features, out_features, bits, groupsize, qq_groupsize,
                           scale_bits, zero_bits);
  };
  // Prefill GEMMs run in bfloat16 for bfloat16 activations on CPUs that multiply bfloat16 natively.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && cpu_has_native_bf16();
  const bool plane_kernels = planes && has_plane_kernels(kernels);
  const int64_t plane_max_vectors = kernels.planes_dot ? kPlaneDotMaxVectors
                                    : bf16_gemm        ? kPlaneMaxVectorsBf16Gemm
                                                       : kPlaneMaxVectors;
  const bool plane_matvec = plane_kernels && batch >= 1 && batch <= plane_max_vectors;
  const bool plane_gemm = plane_kernels && !plane_matvec && batch >= 1;
  if (planes && !plane_matvec && !plane_gemm) return on_rows();

  const at::Tensor qw = planes ? at::Tensor() : qweight.contiguous();
  const at::Tensor pl = planes ? qweight.contiguous() : at::Tensor(), sc = scale_codes.contiguous(), zc = zero_codes.contiguous();
  const at::Tensor sm = scale_bits != kRawStatBits ? scale_meta->contiguous() : at::Tensor();
  const at::Tensor zm = zero_bits != kRawStatBits ? zero_meta->contiguous() : at::Tensor();
  const at::Tensor pm = perm.contiguous(), rp = outlier_row_ptr.contiguous();
  const at::Tensor oc = outlier_col.contiguous(), od = outlier_delta.contiguous();

  // Indices: perm values and the CSR row pointer (outlier columns are checked as they are used).
  const uint16_t* perm_u = reinterpret_cast<const uint16_t*>(pm.data_ptr<int16_t>());
  uint16_t largest = 0;  // one check after a loop that vectorises: this runs on every call
  for (int64_t k = 0; k < n; ++k) largest = std::max(largest, perm_u[k]);
  TORCH_CHECK(largest < n, "spqr_linear: 'perm' holds column ", largest, " >= in_features=", n,
              " (corrupted checkpoint?)");
  const int32_t* row_ptr = rp.data_ptr<int32_t>();
  TORCH_CHECK(row_ptr[0] == 0 && row_ptr[m] == nnz, "spqr_linear: 'outlier_row_ptr' must start at 0 and end at nnz=",
              nnz, ", got ", row_ptr[0], " and ", row_ptr[m], " (corrupted checkpoint?)");
  // Counted, not and-ed: GCC vectorises the count (0.9k cycles for 4096 rows against 5.1k)
  int32_t decreases = 0;
  for (int64_t i = 0; i < m; ++i) decreases += row_ptr[i] > row_ptr[i + 1];
  if (decreases != 0)
    for (int64_t i = 0; i < m; ++i)
      TORCH_CHECK(row_ptr[i] <= row_ptr[i + 1], "spqr_linear: 'outlier_row_ptr' decreases at row ", i,
                  " (corrupted checkpoint?)");

  const int64_t n_padded = round_up(n, kBlockCols);
  const int64_t effective_group = std::min(groupsize, n);
  // lane_group[k] = min(k, n - 1) / effective_group, filled group by group (a division per column
  // cost several microseconds per call, more than a small layer's whole matvec). The row streams'
  // kernels only: the plane kernels go by 16-column groups (building it and the LayerView took 8-14 us
  // of a cold 4096 x 4096 bfloat16 call, timed inside the operator).
  std::vector<int32_t> lane_group(planes ? 0 : n_padded);
  if (!planes) {
    const int32_t last_group = static_cast<int32_t>((n - 1) / effective_group);
    for (int32_t j = 0; j <= last_group; ++j)
      std::fill(lane_group.begin() + j * effective_group,
                lane_group.begin() + std::min<int64_t>((j + 1) * effective_group, n), j);
    std::fill(lane_group.begin() + n, lane_group.end(), last_group);
  }

  LayerView L{};
  L.qweight = planes ? nullptr : reinterpret_cast<const uint8_t*>(qw.data_ptr<int32_t>());
  L.qweight_row_bytes = words_for(n, bits) * 4;
  L.planes = planes ? pl.data_ptr<uint8_t>() : nullptr;
  L.scale_codes = static_cast<const uint8_t*>(sc.const_data_ptr());
  L.scale_row_bytes = stat_blocks ? 0 : sc.size(1) * 4;
  L.zero_codes = static_cast<const uint8_t*>(zc.const_data_ptr());
  L.zero_row_bytes = stat_blocks ? 0 : zc.size(1) * 4;
  L.stat_blocks = stat_blocks;
  L.scale_meta = sm.defined() ? static_cast<const uint16_t*>(sm.const_data_ptr()) : nullptr;  // float16 bits
  L.zero_meta = zm.defined() ? static_cast<const uint16_t*>(zm.const_data_ptr()) : nullptr;
  L.meta_group_stride = planes ? 2 : R * 2;
  L.meta_chunk_stride = planes ? G * 2 : 2;
  L.outlier_row_ptr = row_ptr;
  L.outlier_col = reinterpret_cast<const uint16_t*>(oc.data_ptr<int16_t>());
  L.outlier_delta = reinterpret_cast<const uint16_t*>(od.data_ptr<at::Half>());
  L.m = m;
  L.n = n;
  L.n_padded = n_padded;
  L.bits = static_cast<int>(bits);
  L.scale_bits = static_cast<int>(scale_bits);
  L.zero_bits = static_cast<int>(zero_bits);
  L.groupsize = effective_group;
  L.qq_groupsize = qq_seen;
  L.n_groups = G;
  L.n_chunks = R;
  L.lane_group = planes ? nullptr : lane_group.data();
  L.x_bits = x.scalar_type() == at::kBFloat16 ? 8 : x.scalar_type() == at::kHalf ? 11 : 24;

  const at::Tensor x2 = x.reshape({-1, n}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = m;
  if (batch == 0) return at::empty(out_shape, x.options());

  std::atomic<bool> ok{true};
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor y;  // [batch, m] (prefill path)
  at::Tensor out;  // the result in x's dtype and shape (matvec and gemm paths)
  // out from kernel(y, row_begin, row_end, scratch) over runs of `unit` rows (16-row tiles), split across
  // threads: each thread adds the bias to its rows and converts them to x's dtype. (A float32 result
  // converted afterwards by .to() cost a tensor and a TensorIterator per call: ~2 us of a small layer's
  // ~20.) The plane matvec hands out its blocks by BlockShares instead.
  const auto over_row_tiles = [&](int64_t unit, int64_t floats, auto&& kernel) {
    out = at::empty(out_shape, x.options());
    const bool direct = x.scalar_type() == at::kFloat;
    float* y_ptr = direct ? out.data_ptr<float>() : result_scratch(batch * m);
    at::parallel_for(0, num_groups(m, unit), 1, [&](int64_t begin, int64_t end) {
      const int64_t row_begin = begin * unit, row_end = std::min(end * unit, m);
      if (!kernel(y_ptr, row_begin, row_end, thread_scratch(floats))) ok = false;
      if (!direct || bias_ptr != nullptr) finish_rows(y_ptr, batch, m, row_begin, row_end, bias_ptr, out);
    });
  };
  if (plane_matvec) {
    float* xp_ptr = activation_scratch(batch * n_padded);
    permute_columns_into(x2, perm_u, n, n_padded, at::kFloat, xp_ptr);
    std::atomic<bool> representable{true};
    out = at::empty(out_shape, x.options());
    float* y_ptr = result_scratch(batch * m);
    BlockShares shares(plane_blocks(m), std::min<int64_t>(plane_blocks(m), at::get_num_threads()));
    struct Finish {
      BlockShares* shares;
      float* y;
      int64_t batch, m;
      const float* bias;
      const at::Tensor* out;
    } finish{&shares, y_ptr, batch, m, bias_ptr, &out};
    const PlaneBlocks blocks{
        &finish,
        [](void* ctx, int64_t share, int64_t* block, bool* stolen) {
          return static_cast<Finish*>(ctx)->shares->claim(share, block, stolen);
        },
        [](void* ctx, int64_t row_begin, int64_t row_end) {
          const Finish& f = *static_cast<Finish*>(ctx);
          finish_rows(f.y, f.batch, f.m, row_begin, row_end, f.bias, *f.out);
        }};
    const int64_t floats = planes_scratch_floats(L, batch, kernels.planes_dot);
    at::parallel_for(0, shares.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t share = begin; share < end; ++share) {
        const int status = kernels.planes_matvec(L, xp_ptr, batch, y_ptr, m, blocks, share, thread_scratch(floats));
        if (status == kPlanesUnrepresentable) representable = false;
        if (status == kPlanesBadOutlier) ok = false;
      }
    });
    if (!representable.load()) return on_rows();  // non-finite or tiny activations: the float loops
  } else if (plane_gemm) {
    // Each thread dequantises tiles of its own rows of W_perm from the planes, transposed ([n, rows]),
    // and multiplies x_perm by them with a GEMM of its own (single-threaded inside the parallel region):
    // float32 tiles, or bfloat16 ones for bfloat16 activations on CPUs that multiply bfloat16 natively
    // (a Zen 4's float32 GEMM took 2.7x the time). A tile then never leaves its core: with tiles shared by
    // all threads' dequantisers and one multi-threaded GEMM, a Zen 4 took 1.0-1.3x the time at batch 32
    // (1.7-2.0x in some processes), float32 1.3-1.45x; at batch 512 float32 0.95-1.13x (benchmarks/RESULTS.md).
    const at::ScalarType gemm_dtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
    const at::Tensor xp = permute_columns(x2, perm_u, n, n_padded, gemm_dtype);
    const int64_t tile_rows =
        tile_rows_for(m, kPlaneRows, kPlaneGemmTileRows, kPlaneGemmTileBytes, n_padded * at::elementSize(gemm_dtype));
    y = at::empty({batch, m}, x.options().dtype(gemm_dtype));
    // The bfloat16 dequantiser sorts the outliers of kPlaneDequantRows rows at a time in its scratch.
    int64_t max_nnz = 0;
    for (int64_t row = 0; bf16_gemm && row < m; row += kPlaneRows)
      max_nnz = std::max<int64_t>(max_nnz,
                                  L.outlier_row_ptr[std::min(row + kPlaneDequantRows, m)] - L.outlier_row_ptr[row]);
    at::parallel_for(0, plane_blocks(m), 1, [&](int64_t block_begin, int64_t block_end) {
      at::Tensor w_tile = at::empty({n_padded, tile_rows}, x.options().dtype(gemm_dtype));
      float* scratch = thread_scratch(bf16_gemm ? planes_dequant_bf16_scratch_floats(L, max_nnz) : 64);
      const int64_t end = std::min(block_end * kPlaneRows, m);
      for (int64_t row0 = block_begin * kPlaneRows; row0 < end && ok.load(); row0 += tile_rows) {
        const int64_t rows = std::min(tile_rows, end - row0);
        const bool tile_ok =
            bf16_gemm ? kernels.planes_dequant_t_bf16(L, reinterpret_cast<uint16_t*>(w_tile.data_ptr<at::BFloat16>()),
                                                      tile_rows, row0, row0 + rows, scratch)
                      : kernels.planes_dequant_t(L, w_tile.data_ptr<float>(), tile_rows, row0, row0 + rows, scratch);
        if (!tile_ok) ok = false;
        y.narrow(1, row0, rows).copy_(at::mm(xp, w_tile.narrow(1, 0, rows)));
      }
    });
  } else if (kernels.gemm != nullptr && x.scalar_type() == at::kBFloat16 && batch >= kGemmMinBatch &&
      batch <= kGemmMaxVectors) {
    const at::Tensor xp = permute_columns(x2, perm_u, n, n_padded, at::kBFloat16);
    const uint16_t* xp_ptr = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
    over_row_tiles(kTileRows, scratch_floats(L, 0) + gemm_scratch_floats(L, batch),
                   [&](float* y_ptr, int64_t begin, int64_t end, float* scratch) {
                     return kernels.gemm(L, xp_ptr, batch, y_ptr, m, begin, end, scratch);
                   });
  } else if (batch <= (kernels.matvec_max_batch != nullptr ? kernels.matvec_max_batch(L) : kMatvecMaxBatch)) {
    const at::Tensor xp = permute_columns(x2, perm_u, n, n_padded, at::kFloat);
    const float* xp_ptr = xp.data_ptr<float>();
    over_row_tiles(kTileRows, scratch_floats(L, batch), [&](float* y_ptr, int64_t begin, int64_t end, float* scratch) {
      return kernels.matvec(L, xp_ptr, batch, y_ptr, m, begin, end, scratch);
    });
  } else {
    const at::ScalarType gemm_dtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
    const int64_t element = at::elementSize(gemm_dtype);
    const at::Tensor xp = permute_columns(x2, perm_u, n, n_padded, gemm_dtype);
    // Row tiles of W_perm are dequantised by all threads together, then multiplied by one
    // multi-threaded GEMM (a GEMM nested inside the parallel region would run single-threaded).
    const int64_t tile_rows = tile_rows_for(m, kTileRows, kGemmTileRows, kGemmTileMaxBytes, n_padded * element);
    y = at::empty({batch, m}, x.options().dtype(gemm_dtype));
    at::Tensor w_tile = at::empty({tile_rows, n_padded}, x.options().dtype(gemm_dtype));
    for (int64_t row0 = 0; row0 < m && ok.load(); row0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, m - row0);
      at::parallel_for(0, num_groups(rows, kTileRows), 1, [&](int64_t begin, int64_t end) {
        float* scratch = thread_scratch(scratch_floats(L, 0));
        const int64_t first = row0 + begin * kTileRows, last = std::min(row0 + end * kTileRows, row0 + rows);
        const bool tile_ok =
            bf16_gemm ? kernels.dequant_bf16(L, reinterpret_cast<uint16_t*>(w_tile.data_ptr<at::BFloat16>()) +
                                                    (first - row0) * n_padded,
                                             n_padded, first, last, scratch)
                      : kernels.dequant_f32(L, w_tile.data_ptr<float>() + (first - row0) * n_padded, n_padded, first,
                                            last, scratch);
        if (!tile_ok) ok = false;
      });
      y.narrow(1, row0, rows).copy_(at::mm(xp, w_tile.narrow(0, 0, rows).t()));
    }
  }
  TORCH_CHECK(ok.load(), "spqr_linear: 'outlier_col' holds a column index >= in_features=", n,
              " (corrupted checkpoint?)");
  if (out.defined()) return out;
  if (bias_f.defined()) y = y.to(at::kFloat).add_(bias_f);
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(spqr_hf, CPU, m) {
  m.impl("spqr_linear", &spqr_linear_cpu);
  m.impl("planes_from_rows", &planes_from_rows_cpu);
  m.impl("rows_from_planes", &rows_from_planes_cpu);
  m.impl("stat_blocks_from_rows", &stat_blocks_from_rows_cpu);
  m.impl("stat_rows_from_blocks", &stat_rows_from_blocks_cpu);
}

}  // namespace cpu
}  // namespace spqr_hf

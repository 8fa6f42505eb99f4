// Host harness for the shared tile decoder (decode_tile.h): runs, on the CPU, the exact
// per-thread code of the CUDA kernels in a loop that emulates their grid, so that
// tests/test_shared_decode.py can compare it with the torch reference without a GPU.
//
//   spqr_harness_dequantize : dequantize.cu's per-thread work (chunk + its outliers), then the
//                             column permutation the GEMM path applies to the activations.
//   spqr_harness_matvec     : matvec.cu's per-lane work (chunk_dot on chunk c by lane c % 32,
//                             outlier_dot strided over 32 lanes), then the lane reduction.
//
// Built by the test with g++ -ffp-contract=off (the kernels' exactness-critical adds use
// __fadd_rn, which is never contracted either). Not part of the package.
#include <cstdint>
#include <cstring>
#include <vector>

#include "spqr_hf/decode_tile.h"

using spqr_hf::PackedView;

namespace {

template <int BITS>
void dequantize_layer(const PackedView& v, float* weight) {
  const spqr_hf::LayerDecoder d = spqr_hf::make_layer_decoder(v);
  const int32_t n = v.in_features;
  const int32_t chunks = (n + spqr_hf::kChunkCodes - 1) / spqr_hf::kChunkCodes;
  for (int32_t row = 0; row < v.out_features; ++row) {
    for (int32_t chunk = 0; chunk < chunks; ++chunk) {
      float w[spqr_hf::kChunkCodes];
      spqr_hf::dequantize_chunk<BITS>(d, row, row / d.qq_groupsize, chunk, w);
      spqr_hf::add_chunk_outliers(v, row, chunk, w);
      for (int i = 0; i < spqr_hf::kChunkCodes; ++i) {
        const int32_t k = chunk * spqr_hf::kChunkCodes + i;
        if (k < n) weight[static_cast<int64_t>(row) * n + v.perm[k]] = w[i];
      }
    }
  }
}

// Activations in permuted column order, BT rows, zero past `batch` and past column n.
struct PermutedActivations {
  std::vector<float> data;  // [BT][padded_n]
  int32_t padded_n;
};

struct ChunkX {  // x_at(b, i) of chunk `chunk`, like the kernel's shared-memory tile
  const PermutedActivations* x;
  int32_t chunk;
  float operator()(int b, int i) const {
    return x->data[static_cast<size_t>(b) * x->padded_n + chunk * spqr_hf::kChunkCodes + i];
  }
};

struct ColumnX {  // x_at(b, permuted column), like the kernel's global-memory outlier read
  const PermutedActivations* x;
  float operator()(int b, int32_t col) const { return x->data[static_cast<size_t>(b) * x->padded_n + col]; }
};

template <int BITS, int BT>
void matvec_layer(const PackedView& v, const float* x, int batch, const float* bias, float* out) {
  const spqr_hf::LayerDecoder d = spqr_hf::make_layer_decoder(v);
  const int32_t n = v.in_features, m = v.out_features;
  const int32_t chunks = (n + spqr_hf::kChunkCodes - 1) / spqr_hf::kChunkCodes;
  PermutedActivations xp{std::vector<float>(static_cast<size_t>(BT) * chunks * spqr_hf::kChunkCodes, 0.0f),
                         chunks * spqr_hf::kChunkCodes};
  for (int b = 0; b < batch; ++b) {
    for (int32_t k = 0; k < n; ++k) xp.data[static_cast<size_t>(b) * xp.padded_n + k] = x[static_cast<int64_t>(b) * n + v.perm[k]];
  }
  for (int32_t row = 0; row < m; ++row) {
    float lanes[32][BT] = {};
    for (int32_t chunk = 0; chunk < chunks; ++chunk) {
      spqr_hf::chunk_dot<BITS, BT>(d, row, row / d.qq_groupsize, chunk, ChunkX{&xp, chunk}, lanes[chunk % 32]);
    }
    for (int lane = 0; lane < 32; ++lane) spqr_hf::outlier_dot<BT>(v, row, lane, 32, ColumnX{&xp}, lanes[lane]);
    for (int b = 0; b < batch; ++b) {
      float sum = 0.0f;
      for (int lane = 0; lane < 32; ++lane) sum += lanes[lane][b];
      out[static_cast<int64_t>(b) * m + row] = sum + (bias ? bias[row] : 0.0f);
    }
  }
}

template <int BT>
void matvec_bits(const PackedView& v, const float* x, int batch, const float* bias, float* out) {
  switch (v.bits) {
    case 2: return matvec_layer<2, BT>(v, x, batch, bias, out);
    case 3: return matvec_layer<3, BT>(v, x, batch, bias, out);
    case 4: return matvec_layer<4, BT>(v, x, batch, bias, out);
    case 5: return matvec_layer<5, BT>(v, x, batch, bias, out);
    case 6: return matvec_layer<6, BT>(v, x, batch, bias, out);
    case 7: return matvec_layer<7, BT>(v, x, batch, bias, out);
    default: return matvec_layer<8, BT>(v, x, batch, bias, out);
  }
}

}  // namespace

extern "C" {

// Why the view cannot be decoded, or nullptr.
const char* spqr_harness_check_view(const PackedView* v) { return spqr_hf::check_view(*v); }

// weight: float32 [m, n] in original column order. Returns a spqr_hf::Status.
int spqr_harness_dequantize(const PackedView* v, float* weight) {
  if (spqr_hf::check_view(*v)) return spqr_hf::kInvalidArgument;
  switch (v->bits) {
    case 2: dequantize_layer<2>(*v, weight); break;
    case 3: dequantize_layer<3>(*v, weight); break;
    case 4: dequantize_layer<4>(*v, weight); break;
    case 5: dequantize_layer<5>(*v, weight); break;
    case 6: dequantize_layer<6>(*v, weight); break;
    case 7: dequantize_layer<7>(*v, weight); break;
    default: dequantize_layer<8>(*v, weight); break;
  }
  return spqr_hf::kOk;
}

// x: float32 [batch, n] original column order; out: float32 [batch, m]; bias float32 [m] or null.
int spqr_harness_matvec(const PackedView* v, const float* x, int batch, const float* bias, float* out) {
  if (spqr_hf::check_view(*v)) return spqr_hf::kInvalidArgument;
  if (batch < 1 || batch > 16) return spqr_hf::kInvalidArgument;
  switch (spqr_hf::matvec_batch_tile(batch)) {
    case 1: matvec_bits<1>(*v, x, batch, bias, out); break;
    case 2: matvec_bits<2>(*v, x, batch, bias, out); break;
    case 4: matvec_bits<4>(*v, x, batch, bias, out); break;
    case 8: matvec_bits<8>(*v, x, batch, bias, out); break;
    default: matvec_bits<16>(*v, x, batch, bias, out); break;
  }
  return spqr_hf::kOk;
}

}  // extern "C"

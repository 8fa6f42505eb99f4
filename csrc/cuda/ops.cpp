// CUDA implementation of the spqr_hf::spqr_linear operator (schema defined once, in Python, by
// src/spqr_hf/ops/_schema.py; this file only registers a kernel for the CUDA dispatch key).
//
// Paths, chosen by the flattened batch size B (tokens) and the activation dtype:
//   fp16 / bf16, B <= 16 : fused matvec kernels (matvec.cu), batch reused per decoded chunk;
//   otherwise            : dequantize to a [out, in] workspace of x's dtype in permuted column
//                          order (dequantize.cu), permute x's columns to match, then one GEMM
//                          (at::addmm / at::mm -> cuBLAS on tensor cores). float32 activations
//                          always take this path.
//
// Only device-generic torch headers are used (the stream comes from c10's virtual guard, not
// from ATen/cuda), so this file compiles against any torch build; CUDA is reached only through
// the raw-pointer launchers of launch.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "launch.h"
#include "spqr_hf/decode_tile.h"
#include "spqr_hf/layout.h"

namespace spqr_hf {
namespace cuda {
namespace {

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, "spqr_linear (CUDA): packed tensor '", name, "' has dtype ", t.scalar_type(),
              ", expected ", dtype, " (corrupted or mismatched checkpoint?)");
  TORCH_CHECK(t.sizes() == shape, "spqr_linear (CUDA): packed tensor '", name, "' has shape ", t.sizes(),
              ", expected ", shape, " (corrupted or mismatched checkpoint?)");
  TORCH_CHECK(t.device() == device, "spqr_linear (CUDA): packed tensor '", name, "' is on ", t.device(),
              " but the input is on ", device, "; move the module to the input's device");
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

ActType act_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return ActType::kFloat16;
    case at::kBFloat16: return ActType::kBFloat16;
    case at::kFloat: return ActType::kFloat32;
    default: break;
  }
  TORCH_CHECK(false, "spqr_linear (CUDA): activations must be float16, bfloat16 or float32, got ", dtype,
              "; cast the input (model.to(torch.float16)) or use SPQR_HF_BACKEND=torch");
  return ActType::kFloat32;  // unreachable
}

void check_launch(const LaunchResult& result, const char* what) {
  TORCH_CHECK(result.status == kOk, "spqr_linear (CUDA): ", what, " failed (status ", result.status, "): ",
              result.message ? result.message : "unknown error");
}

at::Tensor spqr_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale_codes,
                            const at::Tensor& zero_codes, const std::optional<at::Tensor>& scale_meta,
                            const std::optional<at::Tensor>& zero_meta, const at::Tensor& perm,
                            const at::Tensor& outlier_row_ptr, const at::Tensor& outlier_col,
                            const at::Tensor& outlier_delta, const std::optional<at::Tensor>& bias,
                            int64_t in_features, int64_t out_features, int64_t bits, int64_t groupsize,
                            int64_t qq_groupsize, int64_t scale_bits, int64_t zero_bits) {
  const at::Device device = x.device();
  TORCH_CHECK(device.is_cuda(), "spqr_linear (CUDA): input must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "spqr_linear (CUDA): input's last dimension is ",
              x.dim() ? x.size(-1) : 0, " but the layer has in_features=", in_features);
  TORCH_CHECK(in_features >= 1 && in_features <= kMaxInFeatures && out_features >= 1 && out_features <= INT32_MAX,
              "spqr_linear (CUDA): unsupported layer size ", out_features, "x", in_features);
  TORCH_CHECK(bits >= kMinBits && bits <= kMaxBits, "spqr_linear (CUDA): bits must be in 2..8, got ", bits);
  for (int64_t stat_bits : {scale_bits, zero_bits}) {
    TORCH_CHECK((stat_bits >= kMinBits && stat_bits <= kMaxBits) || stat_bits == kRawStatBits,
                "spqr_linear (CUDA): statistic bits must be in 2..8 or 16, got ", stat_bits);
  }
  TORCH_CHECK(groupsize >= 1 && qq_groupsize >= 1 && groupsize <= INT32_MAX && qq_groupsize <= INT32_MAX,
              "spqr_linear (CUDA): group sizes must be positive");
  TORCH_CHECK(groupsize % kMinGroupAlign == 0 || groupsize >= in_features,
              "spqr_linear (CUDA): groupsize must be a multiple of 4 or cover the whole row, got ", groupsize,
              "; use SPQR_HF_BACKEND=torch for such layers");
  const ActType type = act_type_of(x.scalar_type());

  const int64_t m = out_features, n = in_features;
  const int64_t n_groups = num_groups(n, groupsize), n_chunks = num_groups(m, qq_groupsize);
  const int64_t nnz = outlier_col.numel();
  check_buffer(qweight, "qweight", at::kInt, {m, words_for(n, static_cast<int>(bits))}, device);
  check_buffer(scale_codes, "scale_codes", at::kInt, {n_groups, words_for(m, static_cast<int>(scale_bits))}, device);
  check_buffer(zero_codes, "zero_codes", at::kInt, {n_groups, words_for(m, static_cast<int>(zero_bits))}, device);
  check_buffer(perm, "perm", at::kShort, {n}, device);
  check_buffer(outlier_row_ptr, "outlier_row_ptr", at::kInt, {m + 1}, device);
  check_buffer(outlier_col, "outlier_col", at::kShort, {nnz}, device);
  check_buffer(outlier_delta, "outlier_delta", at::kHalf, {nnz}, device);
  for (auto [meta, name, stat_bits] : {std::make_tuple(&scale_meta, "scale_meta", scale_bits),
                                       std::make_tuple(&zero_meta, "zero_meta", zero_bits)}) {
    if (stat_bits == kRawStatBits) continue;
    TORCH_CHECK(meta->has_value(), "spqr_linear (CUDA): packed tensor '", name, "' is required for ", stat_bits,
                "-bit statistics");
    check_buffer(**meta, name, at::kHalf, {n_groups, n_chunks, 2}, device);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef{m} && bias->device() == device,
                "spqr_linear (CUDA): bias must have shape [", m, "] on the input's device");
  }

  c10::DeviceGuard guard(device);
  c10::impl::VirtualGuardImpl cuda_impl(c10::DeviceType::CUDA);
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_impl.getStream(device).native_handle());

  // Contiguous views of every buffer (no copies for modules built by SpQRLinear).
  const at::Tensor qweight_c = qweight.contiguous(), scale_c = scale_codes.contiguous(),
                   zero_c = zero_codes.contiguous(), perm_c = perm.contiguous(), row_ptr_c = outlier_row_ptr.contiguous(),
                   col_c = outlier_col.contiguous(), delta_c = outlier_delta.contiguous();
  const at::Tensor scale_meta_c = scale_bits == kRawStatBits ? at::Tensor() : scale_meta->contiguous();
  const at::Tensor zero_meta_c = zero_bits == kRawStatBits ? at::Tensor() : zero_meta->contiguous();

  PackedView view{};
  view.qweight = data_or_null<uint32_t>(qweight_c);
  view.scale_codes = data_or_null<uint32_t>(scale_c);
  view.zero_codes = data_or_null<uint32_t>(zero_c);
  view.scale_meta = scale_meta_c.defined() ? data_or_null<uint16_t>(scale_meta_c) : nullptr;
  view.zero_meta = zero_meta_c.defined() ? data_or_null<uint16_t>(zero_meta_c) : nullptr;
  view.perm = data_or_null<uint16_t>(perm_c);
  view.outlier_row_ptr = data_or_null<int32_t>(row_ptr_c);
  view.outlier_col = data_or_null<uint16_t>(col_c);
  view.outlier_delta = data_or_null<uint16_t>(delta_c);
  view.in_features = static_cast<int32_t>(n);
  view.out_features = static_cast<int32_t>(m);
  view.bits = static_cast<int32_t>(bits);
  view.groupsize = static_cast<int32_t>(groupsize);
  view.qq_groupsize = static_cast<int32_t>(qq_groupsize);
  view.scale_bits = static_cast<int32_t>(scale_bits);
  view.zero_bits = static_cast<int32_t>(zero_bits);
  if (const char* why = check_view(view)) TORCH_CHECK(false, "spqr_linear (CUDA): ", why);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = m;
  const at::Tensor x2 = x.reshape({-1, n}).contiguous();
  const int64_t tokens = x2.size(0);
  if (tokens == 0) return at::empty(out_shape, x.options());

  if (type != ActType::kFloat32 && tokens <= kMaxMatvecBatch) {
    at::Tensor bias_f32;
    if (bias.has_value()) bias_f32 = bias->to(at::kFloat).contiguous();
    at::Tensor out = at::empty({tokens, m}, x.options());
    check_launch(matvec(view, x2.data_ptr(), static_cast<int>(tokens),
                        bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, out.data_ptr(), type, stream),
                 "matvec kernel");
    return out.view(out_shape);
  }

  // Large batch (prefill) or float32: dequantize once, permute activations, one GEMM.
  at::Tensor weight_perm = at::empty({m, n}, x.options());
  check_launch(dequantize(view, weight_perm.data_ptr(), type, stream), "dequantize kernel");
  at::Tensor x_perm = at::empty({tokens, n}, x.options());
  check_launch(permute_columns(x2.data_ptr(), tokens, static_cast<int32_t>(n), view.perm, x_perm.data_ptr(), type,
                               stream),
               "permute_columns kernel");
  at::Tensor out = bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x_perm, weight_perm.t())
                                    : at::mm(x_perm, weight_perm.t());
  return out.view(out_shape);
}

}  // namespace
}  // namespace cuda
}  // namespace spqr_hf

TORCH_LIBRARY_IMPL(spqr_hf, CUDA, m) { m.impl("spqr_linear", &spqr_hf::cuda::spqr_linear_cuda); }

// `import spqr_hf._C_cuda` loads this library (registering the kernel above); the module itself
// is empty.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "SpQR CUDA kernels (spqr_hf::spqr_linear)",
                                      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

// CPUID-based dispatch. Built with baseline flags: nothing here may use AVX itself.
#include "cpu_features.h"

#include <cstdlib>

#if defined(SPQR_HF_X86_KERNELS)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace spqr_hf {
namespace cpu {
namespace {

struct Candidate {
  const char* name;
  const KernelTable* table;
  bool (*supported)();
};

#if defined(SPQR_HF_X86_KERNELS)
// __builtin_cpu_supports checks CPUID and that the OS saves the wider registers (XGETBV).
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
// VBMI for the plane lookups' VPERMB (plane_kernels.inc kSextetTables): every CPU with BITALG has it.
bool has_avx512vnni() {
  return has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bitalg") &&
         __builtin_cpu_supports("avx512vbmi");
}
bool has_avx512bf16() { return has_avx512vnni() && __builtin_cpu_supports("avx512bf16"); }
// AMX-TILE and AMX-BF16 in CPUID, and (Linux) the kernel's permission for this process to use
// the tile data state, asked for once (without it the first tile instruction raises SIGILL).
bool has_amx() {
  static const bool usable = [] {
    if (kAmxKernels.gemm == nullptr || !has_avx512bf16()) return false;  // not built by this compiler
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!tile || !bf16) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const std::vector<Candidate>& candidates() {  // best first
  static const std::vector<Candidate> all = {
#if defined(SPQR_HF_X86_KERNELS)
      {"amx", &kAmxKernels, &has_amx},
      {"avx512bf16", &kAvx512Bf16Kernels, &has_avx512bf16},
      {"avx512vnni", &kAvx512VnniKernels, &has_avx512vnni},
      {"avx512", &kAvx512Kernels, &has_avx512},
      {"avx2", &kAvx2Kernels, &has_avx2},
#endif
      {"scalar", &kScalarKernels, &always},
  };
  return all;
}

}  // namespace

bool cpu_has_native_bf16() {
#if defined(SPQR_HF_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return true;  // other architectures: torch's bfloat16 GEMM, as before
#endif
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Candidate& c : candidates())
    if (c.supported()) names.emplace_back(c.name);
  return names;
}

const KernelTable* select_kernels(std::string* error) {
  const char* env = std::getenv(kIsaEnvVar);
  const std::string requested = env == nullptr ? "" : env;
  const bool automatic = requested.empty() || requested == "auto";
  for (const Candidate& c : candidates()) {
    if (automatic ? c.supported() : requested == c.name) {
      if (c.supported()) return c.table;
      *error = std::string(kIsaEnvVar) + "=" + requested + " but this CPU does not support it; unset it or choose one of the supported instruction sets";
      return nullptr;
    }
  }
  *error = std::string(kIsaEnvVar) + "=" + requested + " is not one of auto, scalar, avx2, avx512, avx512vnni, avx512bf16, amx (or its kernels were not built for this platform)";
  return nullptr;
}

}  // namespace cpu
}  // namespace spqr_hf

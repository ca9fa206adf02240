#include "backends/cpu/cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "devpipe/error.h"

namespace devpipe::cpu {

std::string_view isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline:
      return "baseline";
    case CpuIsa::Avx2:
      return "avx2";
    case CpuIsa::Avx512:
      return "avx512";
  }
  return "baseline";
}

CpuIsa cpu_isa() {
  CpuIsa best = CpuIsa::Baseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = CpuIsa::Avx512;
  }
#endif
  const char* cap = std::getenv("DEVPIPE_CPU_ISA");
  if (!cap || !*cap) return best;
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (isa_name(isa) == cap) return std::min(best, isa);
  }
  throw ConfigError("cpu backend: DEVPIPE_CPU_ISA is '" + std::string(cap) +
                    "'; expected baseline, avx2 or avx512");
}

}  // namespace devpipe::cpu

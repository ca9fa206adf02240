#include "backends/cpu/cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "devpipe/error.h"

namespace devpipe::cpu {

std::string_view isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Portable:
      return "portable";
    case CpuIsa::Avx2:
      return "avx2";
    case CpuIsa::Avx512:
      return "avx512";
  }
  return "portable";
}

CpuIsa cpu_isa() {
  CpuIsa best = CpuIsa::Portable;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (__builtin_cpu_supports("avx512f")) best = CpuIsa::Avx512;
#endif
  const char* cap = std::getenv("DEVPIPE_CPU_ISA");
  if (!cap || !*cap) return best;
  for (CpuIsa isa : {CpuIsa::Portable, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (isa_name(isa) == cap) return std::min(best, isa);
  }
  throw InvalidArgument("cpu backend: DEVPIPE_CPU_ISA is '" + std::string(cap) +
                        "'; expected portable, avx2 or avx512");
}

}  // namespace devpipe::cpu

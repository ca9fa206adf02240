// Internal (cpu backend): the vector instruction set the hand-written kernels (kernels_conv_pool,
// kernels_skinny, kernels_attention) dispatch on, chosen once per kernel when it is built.
#pragma once

#include <string_view>

namespace devpipe::cpu {

enum class CpuIsa { Baseline, Avx2, Avx512 };

/// "baseline" (x86-64 without AVX2, or another architecture), "avx2" (with FMA) or "avx512"
/// (AVX-512 F, BW, VL and DQ).
std::string_view isa_name(CpuIsa isa);

/// The best instruction set this CPU runs, capped by the environment variable DEVPIPE_CPU_ISA
/// ("baseline", "avx2" or "avx512"; unset or empty: no cap) so that every path can be tested on
/// one machine. Throws ConfigError naming the value when it is none of these.
CpuIsa cpu_isa();

}  // namespace devpipe::cpu

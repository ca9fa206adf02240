// Internal (cpu backend): the vector instruction set the hand-written kernels (kernels_conv_pool,
// kernels_skinny) dispatch on, chosen once per kernel at compile time.
#pragma once

#include <string_view>

namespace devpipe::cpu {

enum class CpuIsa { Portable, Avx2, Avx512 };

/// "portable", "avx2" (with FMA) or "avx512" (AVX-512F).
std::string_view isa_name(CpuIsa isa);

/// The best instruction set this CPU runs, capped by the environment variable DEVPIPE_CPU_ISA
/// ("portable", "avx2" or "avx512"; unset: no cap) so that every path can be tested on one
/// machine. Throws InvalidArgument naming the value when it is none of these.
CpuIsa cpu_isa();

}  // namespace devpipe::cpu

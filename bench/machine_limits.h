// The machine's limits, measured at the start of `devpipe bench`: peak float32 FMA throughput
// and memory bandwidth on all threads, for the workloads' roofline times.
#pragma once

#include <string>
#include <vector>

namespace devpipe::bench {

struct MachineLimits {
  double peak_gflops = 0;    ///< float32, best of the timed runs, all threads together
  std::string fma_isa;       ///< the FMA loop that ran: "avx512f" or "avx2+fma"
  double triad_gbs = 0;      ///< a[i] = b[i] + s * c[i], 12 bytes per element counted, best run
  std::size_t triad_bytes = 0;  ///< the three arrays together
  int threads = 0;
  double seconds = 0;        ///< wall time the measurement took
};

/// Measures both limits on `threads` OpenMP threads in a few hundred milliseconds: the FMA loop
/// (independent accumulators in vector registers; AVX-512 when the CPU has it, else AVX2+FMA,
/// picked at run time) and the triad over arrays far larger than the last-level cache.
/// Throws devpipe::StateError when the CPU has neither AVX2+FMA nor AVX-512.
MachineLimits measure_machine_limits(int threads);

/// The CPU's SIMD feature flags of interest present in /proc/cpuinfo (avx2, fma, avx512f, ...).
std::vector<std::string> cpu_isa_flags();

}  // namespace devpipe::bench

// The machine's limits, measured at the start of `devpipe bench`: peak float32 FMA throughput
// and memory bandwidth on all threads, for the workloads' roofline times.
#pragma once

#include <string>
#include <vector>

namespace devpipe::bench {

struct MachineLimits {
  /// float32 GFLOP/s of all threads together, each thread's rate taken per second of its own
  /// CPU time (best run): what the cores reach while they run, even when other processes take
  /// turns on them. The roofline uses this one.
  double peak_gflops = 0;
  double peak_gflops_wall = 0;  ///< the same by wall-clock time (lower on a loaded machine)
  std::string fma_isa;          ///< the FMA loop that ran: "avx512f" or "avx2+fma"
  /// a[i] = b[i] + s * c[i], 12 bytes per element counted, GB/s of all threads, per CPU second
  /// as above (best run). Memory stalls count as CPU time, so this is not inflated by waiting.
  double triad_gbs = 0;
  double triad_gbs_wall = 0;    ///< the same by wall-clock time
  std::size_t triad_bytes = 0;  ///< the three arrays together
  int threads = 0;
  double seconds = 0;           ///< wall time the measurement took
  /// True when the wall-clock figures fall more than 15% below the per-CPU-second ones: other
  /// processes were using the cores, and every wall-clock figure of this run is inflated.
  bool contended() const { return peak_gflops_wall < peak_gflops / 1.15 || triad_gbs_wall < triad_gbs / 1.15; }
};

/// Measures both limits on `threads` OpenMP threads in a few hundred milliseconds: the FMA loop
/// (independent accumulators in vector registers; AVX-512 when the CPU has it, else AVX2+FMA,
/// picked at run time) and the triad over arrays far larger than the last-level cache.
/// Throws devpipe::StateError when the CPU has neither AVX2+FMA nor AVX-512.
MachineLimits measure_machine_limits(int threads);

/// The CPU's SIMD feature flags of interest present in /proc/cpuinfo (avx2, fma, avx512f, ...).
std::vector<std::string> cpu_isa_flags();

}  // namespace devpipe::bench

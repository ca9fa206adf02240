// `kernels_bare` mode of `devpipe bench`: the floor for framework overhead.
//
// The oneDNN primitives a workload needs, created once with preallocated memory and random
// weights (weights reordered once into the layout oneDNN prefers), then executed back to back
// in a plain loop on one OpenMP thread team — no graph, no tensors, no allocation, no copies
// beyond what the primitives themselves do. Only the time is meaningful; the values are not.
#pragma once

#include <stdexcept>  // std::invalid_argument, thrown by run_kernels_bare
#include <string>
#include <vector>

namespace devpipe::bench {

struct BareResult {
  std::vector<double> samples_ms;  ///< one wall-clock sample per timed iteration
  std::string what;                ///< one line: the primitives run (with oneDNN impl names)
};

/// Runs `warmup` untimed and then `iters` timed iterations of `workload` ("seed", "large",
/// "chain8") with `threads` OpenMP threads (omp_set_num_threads; threads <= 0 keeps the
/// current setting; the caller's setting is restored on return). Throws
/// std::invalid_argument for an unknown workload or iters < 1.
BareResult run_kernels_bare(const std::string& workload, int iters, int warmup, int threads);

}  // namespace devpipe::bench

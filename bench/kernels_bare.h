// `kernels_bare` mode of `devpipe bench`: the floor for framework overhead.
//
// The oneDNN primitives a workload needs, created once with preallocated memory (weights
// reordered once into the layout oneDNN prefers), then executed back to back in a plain loop
// on one OpenMP thread team — no graph, no tensors, no allocation, no copies beyond what the
// primitives themselves do. Fed the same weights and inputs as the other modes, its output is
// checked against devpipe's like any peer's.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>  // std::invalid_argument, thrown by KernelsBare
#include <string>
#include <vector>

namespace devpipe::bench {

/// Host values by name, plain row-major float32: weights as "<stage tag>.<checkpoint key>"
/// ("vision_model.conv.weight", "expand.proj.bias", "stage3.fc.weight"), inputs as "input0",
/// "input1", ... An empty map means deterministic random values for everything.
using BareData = std::map<std::string, std::vector<float>>;

/// One workload's primitives, built once; run() as often as wanted (a persistent worker).
class KernelsBare {
 public:
  /// Builds `workload` ("seed", "large", "chain8") for `threads` OpenMP threads (<= 0: the
  /// current setting). Throws std::invalid_argument for an unknown workload, or a name the
  /// workload needs that a non-empty `data` lacks or has with another number of values.
  KernelsBare(const std::string& workload, int threads, const BareData& data = {});
  ~KernelsBare();
  KernelsBare(const KernelsBare&) = delete;
  KernelsBare& operator=(const KernelsBare&) = delete;

  /// Runs `iters` (>= 1) forwards; one wall-clock sample (ms) each. The caller's OpenMP team
  /// size is restored on return.
  std::vector<double> run(int iters);
  /// The final output of the last run, row-major ([32,1024], [46080,8] or [1,64]).
  std::vector<float> output() const;
  /// One line: the primitives run (with oneDNN implementation names).
  const std::string& what() const { return what_; }

  struct Plan;

 private:
  std::unique_ptr<Plan> plan_;
  int threads_;
  std::string what_;
};

}  // namespace devpipe::bench

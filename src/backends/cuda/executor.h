// Internal (cuda backend): per-node steps and the executable that plans memory once, launches
// the steps on the rank's stream, and captures/replays them as CUDA graphs.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "backends/cuda/plan.h"
#include "backends/cuda/runtime.h"
#include "runtime/backend.h"

namespace devpipe::cuda {

/// What a step builder knows at compile time.
struct BuildContext {
  const Graph& graph;
  const Node& node;
  const RankInfo& rank;
  RankContext& ctx;
  /// Per value id: the device address when fixed at compile time (a parameter or a view of
  /// one), else nullptr.
  const std::vector<std::byte*>& fixed;
  /// "linear at 'enc.fc1' ([2, 4] float32, [3, 4] float32) -> [2, 3] float32".
  std::string where;

  int in_id(std::size_t i) const { return node.inputs.at(i); }
  int out_id(std::size_t i = 0) const { return node.outputs.at(i); }
  const ValueInfo& in(std::size_t i) const { return graph.value(in_id(i)); }
  const ValueInfo& out(std::size_t i = 0) const { return graph.value(out_id(i)); }
  std::size_t num_inputs() const { return node.inputs.size(); }
  std::byte* fixed_input(std::size_t i) const { return fixed[static_cast<std::size_t>(in_id(i))]; }
};

/// What a step gets per launch.
struct LaunchContext {
  std::byte* const* values;  // per value id: the device address for this run
  std::byte* scratch;        // the step's planned scratch (nullptr when it asked for none)
  cudaStream_t stream;       // the rank's stream, or the capture stream while capturing
  RankContext& ctx;
  const RankInfo& rank;

  std::byte* at(int value) const { return values[static_cast<std::size_t>(value)]; }
};

/// One node's work: kernels / library calls enqueued on cx.stream, no allocation, no host
/// synchronisation.
class Step {
 public:
  virtual ~Step() = default;
  /// Bytes of device scratch the step needs while it runs (planned into the arena).
  virtual std::size_t scratch_bytes() const { return 0; }
  virtual void launch(const LaunchContext& cx) = 0;
  /// False when the step rendezvous with other ranks' host threads (it cannot be replayed
  /// from a CUDA graph).
  virtual bool capturable() const { return true; }

  std::string where;
};

/// Builds the step of cx.node; throws Unsupported for an op/dtype it cannot run.
std::unique_ptr<Step> make_step(const BuildContext& cx);

// Families (steps_*.cpp).
std::unique_ptr<Step> make_linear_step(const BuildContext& cx);
std::unique_ptr<Step> make_matmul_step(const BuildContext& cx);
std::unique_ptr<Step> make_conv2d_step(const BuildContext& cx);
std::unique_ptr<Step> make_collective_step(const BuildContext& cx);
std::unique_ptr<Step> make_llm_step(const BuildContext& cx);    // ops of decoder LLMs
std::unique_ptr<Step> make_basic_step(const BuildContext& cx);  // every other op

/// The cuda backend's Executable. See executor.cpp for the memory plan and the graph policy.
std::unique_ptr<Executable> make_executable(const Graph& graph, const std::vector<Tensor>& params,
                                            const RankInfo& rank);
/// The collectives of a rank group (steps_collective.cpp): NCCL communicators or the
/// shared-GPU protocol's state, set up when the group's first collective step is built.
std::unique_ptr<DeviceCollectives> make_device_collectives(const GroupPlacement& placement);
/// Throws, as a CollectiveError, the first NCCL collective failure of this process (one that
/// did not complete within the collective timeout, or an NCCL error: steps_collective.cpp);
/// nothing when there was none. Every host wait of the backend (device events, copies) calls it
/// after waiting: once a collective failed, the ranks are out of step for good.
void throw_if_collectives_failed();

}  // namespace devpipe::cuda

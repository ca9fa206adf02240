// Internal (cpu backend): a graph compiled for one rank — kernels built once, intermediate
// memory planned once into one arena, and a run() that only binds the caller's buffers.
#pragma once

#include <cstddef>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

#include "backends/cpu/kernel.h"
#include "runtime/backend.h"

namespace devpipe::cpu {

/// The cpu backend's Executable.
///
/// Memory: every value is a "root" or a view of one (Reshape is a zero-copy alias). A root is a
/// graph input (the caller's buffer, bound per run), a parameter (the host tensor, fixed), a
/// graph output written in place (the caller's output buffer, bound per run) or an
/// intermediate placed in the arena by liveness (first fit, biggest first), next to the
/// kernels' scratch, which lives only during its node. Outputs that cannot be written in place
/// (a graph input or parameter returned as is, a value returned twice) are copied at the end.
class CpuExecutable final : public Executable {
 public:
  CpuExecutable(const Graph& graph, const std::vector<Tensor>& params, const RankInfo& rank);
  ~CpuExecutable() override;

  void run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) override;
  std::size_t workspace_bytes() const override { return arena_bytes_; }

  /// Address of value `id` in the last run (tests: aliasing and in-place outputs).
  const void* value_address(int id) const { return values_.at(static_cast<std::size_t>(id)); }

 private:
  struct Step {
    std::unique_ptr<Kernel> kernel;
    std::byte* scratch = nullptr;
    const char* label = "";  // op name, for timeline spans
  };
  struct Alias {
    int value;
    int root;
    std::size_t offset;
  };
  struct EndCopy {
    std::size_t output;
    int value;
    std::size_t bytes;
  };
  struct ArenaFree {
    void operator()(std::byte* p) const;
  };

  void plan(const std::vector<std::size_t>& scratch_bytes);

  Graph graph_;
  RankInfo rank_;
  std::vector<Tensor> params_;  // keeps the parameters' memory alive
  std::vector<int> root_;
  std::vector<std::size_t> root_offset_;
  std::vector<std::byte*> values_;  // current address of every value
  std::vector<Step> steps_;
  std::vector<int> input_roots_;        // graph input i -> its value
  std::vector<int> output_roots_;       // graph output i -> root written in place, or -1
  std::vector<Alias> dynamic_aliases_;  // views of per-run roots, recomputed each run
  std::vector<EndCopy> end_copies_;
  std::unique_ptr<std::byte, ArenaFree> arena_;
  std::size_t arena_bytes_ = 0;
  dnnl::stream stream_;
};

}  // namespace devpipe::cpu

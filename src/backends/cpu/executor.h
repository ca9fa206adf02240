// Internal (cpu backend): a graph compiled for one rank — kernels built once, intermediate
// memory planned once into one arena, and a run() that only binds the caller's buffers.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"
#include "compiler/memory_plan.h"
#include "runtime/backend.h"

namespace devpipe::cpu {

/// The OpenMP thread count the calling thread's last CpuExecutable::run() gave its kernels (the
/// rank's num_threads, else the thread's own count), or 0 when the thread ran none (tests).
int last_run_threads();

/// What the cpu backend keeps for one rank of a rank group (Backend::make_rank_resources): the
/// rank's WorkPools, one per thread count. A rank's stages run one after another on its thread,
/// so one pool serves them all: at a stage boundary its workers are still spinning from the last
/// stage's tasks and take the next stage's at once, where a pool per executable would have to
/// wake its own sleeping workers (and, on a machine with as many cores as threads, hand the
/// cores from one set of workers to another) at every stage. Executables of one rank run from
/// two threads at once are still correct: the run that finds the pool busy runs its tasks on its
/// own thread (WorkPool::run).
class CpuRankResources final : public RankResources {
 public:
  /// The pool of `threads` threads (>= 1) for the rank's executables: made on first use, shared
  /// while one holds it (the resources hold it weakly: it goes with the last executable using it).
  std::shared_ptr<WorkPool> pool(int threads);

 private:
  std::mutex mu_;
  std::map<int, std::weak_ptr<WorkPool>> pools_;  // by thread count
};

/// The cpu backend's Executable. Memory is planned by the compiler pass plan_views/plan_arena
/// (compiler/memory_plan.h): intermediates and the kernels' scratch share one 64-byte aligned
/// arena; graph inputs and in-place outputs are the caller's buffers, bound per run.
class CpuExecutable final : public Executable {
 public:
  CpuExecutable(const Graph& graph, const std::vector<Tensor>& params, const RankInfo& rank);
  ~CpuExecutable() override;

  void run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) override;
  std::size_t workspace_bytes() const override { return plan_.arena_bytes; }

  /// Address of value `id` in the last run (tests: aliasing and in-place outputs).
  const void* value_address(int id) const { return values_.at(id); }
  /// The work pool its kernels run on, or nullptr (tests: which executables share one).
  const WorkPool* pool() const { return pool_.get(); }

 private:
  struct Step {
    std::unique_ptr<Kernel> kernel;
    std::byte* scratch = nullptr;
    const char* label = "";  // op name, for timeline spans
    bool serial = false;     // runs with one OpenMP thread (see runs_serial in executor.cpp)
    bool parks_pool = false;  // opens OpenMP regions of several threads: the pool's spinning
                              // workers are sent to sleep first (WorkPool::park)
  };
  struct ArenaFree {
    void operator()(std::byte* p) const;
  };

  Graph graph_;
  RankInfo rank_;
  std::vector<Tensor> params_;  // keeps the parameters' memory alive
  MemoryPlan plan_;
  std::unique_ptr<std::byte, ArenaFree> arena_;
  ValueAddresses values_;
  std::vector<Step> steps_;
  /// The thread team of the kernels that want one (nullptr when none does): the rank's, shared
  /// with its other executables (CpuRankResources), or the executable's own when it was compiled
  /// without the resources of a rank group.
  std::shared_ptr<WorkPool> pool_;
  dnnl::stream stream_;
};

}  // namespace devpipe::cpu

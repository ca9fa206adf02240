// Internal: the ranks of one tensor-parallel degree on one device kind, shared by every stage
// with that degree: a stream per rank this process runs (FIFO, so stages chained on the same
// ranks run in order without host synchronisation) and the communicator between the ranks
// (shared memory between threads, or MPI between processes: see devpipe/world.h).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/device.h"
#include "runtime/communicator.h"
#include "runtime/stream.h"

namespace devpipe {

/// Host threads in all when a config leaves num_threads at 0: OMP_NUM_THREADS (its first value)
/// when set to a positive integer, else the cores. A bad OMP_NUM_THREADS is ignored with a
/// warning.
int default_num_threads();
/// Host threads each rank's kernels use: the config's num_threads (or default_num_threads())
/// split between its tp_degree ranks, at least 1. With ranks as processes, the machine's threads
/// are split between the ranks of the world's processes on this machine.
int threads_per_rank(const RuntimeConfig& config);

class RankGroup {
 public:
  /// The shared group for (kind, tp_degree); created on first use, freed with its last user.
  static std::shared_ptr<RankGroup> get(DeviceKind kind, int tp_degree);

  /// The group of `tp_degree` ranks as World::get() places them in this process.
  RankGroup(DeviceKind kind, int tp_degree);
  /// The tensor-parallel degree (ranks in all processes).
  int size() const { return static_cast<int>(streams_.size()); }
  /// The ranks this process runs, ascending (all of them in thread mode).
  const std::vector<int>& ranks() const { return ranks_; }
  DeviceKind kind() const { return kind_; }
  /// The stream of rank `rank`, one this process runs.
  RankStream& stream(int rank) { return *streams_[static_cast<std::size_t>(rank)]; }
  /// Queues `fn(context, r)` on the stream of every rank r this process runs, atomically with
  /// respect to other submissions: every stream sees the group's work in the same order, so the
  /// collectives of two stages submitted from different threads cannot pair up across stages.
  /// Allocates nothing in steady state.
  void submit(void (*fn)(void* context, int rank), void* context);
  Communicator& comm() { return *comm_; }

  /// Marks that a rank failed: aborts the communicator so peers blocked in a collective return.
  void mark_failed();
  /// After a failure: waits for every stream to drain and clears the abort.
  void recover_if_failed();

 private:
  DeviceKind kind_;
  std::vector<int> ranks_;
  std::vector<std::unique_ptr<RankStream>> streams_;  // [rank]; null for ranks of other processes
  std::unique_ptr<Communicator> comm_;
  std::mutex submit_mu_;
  std::atomic<bool> failed_{false};
};

}  // namespace devpipe

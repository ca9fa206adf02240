// Internal: the ranks of one tensor-parallel degree on one device kind, shared by every stage
// with that degree, and the world's registry of them. A group holds, for the ranks this
// process runs, their devices (World::device_of_rank), a stream per rank (FIFO, so stages
// chained on the same ranks run in order without host synchronisation), the communicator
// between the ranks (shared memory between threads, or MPI between processes: see
// devpipe/world.h), the backend's device collectives for them (Backend::make_collectives:
// NCCL on cuda) and the backend's state of each rank (Backend::make_rank_resources: the cpu
// rank's thread teams, the cuda rank's stream and library handles). The World owns the
// registry (World::rank_groups()); a group lives while a stage uses it.
#pragma once

#include <atomic>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/device.h"
#include "runtime/backend.h"
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
  /// World::get()'s group for (kind, tp_degree) on backend_for(kind): the world's rank_groups().
  static std::shared_ptr<RankGroup> get(DeviceKind kind, int tp_degree);

  /// The group of `tp_degree` ranks of `backend` as `world` places them in this process (both
  /// must outlive it). Use RankGroups::get; this makes a group of its own.
  RankGroup(const World& world, Backend& backend, int tp_degree);
  /// Waits for the streams and stops their threads, then lets go of the ranks' resources (freed
  /// here unless an executable still holds them) and frees the collectives.
  ~RankGroup();
  RankGroup(const RankGroup&) = delete;
  RankGroup& operator=(const RankGroup&) = delete;

  /// The tensor-parallel degree (ranks in all processes).
  int size() const { return static_cast<int>(streams_.size()); }
  /// The ranks this process runs, ascending (all of them in thread mode).
  const std::vector<int>& ranks() const { return ranks_; }
  /// devices()[i]: the device of ranks()[i] (World::device_of_rank over the backend's devices).
  const std::vector<Device>& devices() const { return devices_; }
  DeviceKind kind() const { return kind_; }
  Backend& backend() const { return backend_; }
  /// The stream of rank `rank`, one this process runs.
  RankStream& stream(int rank) { return *streams_[static_cast<std::size_t>(rank)]; }
  /// What an executable of rank `rank` (one this process runs) is compiled with: the group's
  /// communicator and device collectives, the rank's resources (made by the backend on the
  /// rank's device on the first call for the rank, the same object on every later one, whatever
  /// `num_threads`), `num_threads` host threads. Called at load, never per forward.
  RankInfo rank_info(int rank, int num_threads);
  /// Queues `fn(context, r)` on the stream of every rank r this process runs (only on rank
  /// `only` when it is >= 0), atomically with respect to other submissions: every stream sees
  /// the group's work in the same order, so the collectives of two stages submitted from
  /// different threads cannot pair up across stages (a task for rank `only` alone goes through
  /// that stream's own lock, since it is in no other stream's order). With `on_caller`, the first of those
  /// ranks' task runs on the calling thread before submit() returns when that rank's stream is
  /// idle (RankStream::claim_if_idle); the others are queued first, so collectives between them
  /// pair up as usual. Allocates nothing in steady state.
  void submit(void (*fn)(void* context, int rank), void* context, int only = -1, bool on_caller = false);
  Communicator& comm() { return *comm_; }
  /// The backend's device collectives for the group, or null (the cpu backend).
  DeviceCollectives* collectives() { return collectives_.get(); }

  /// Marks that a rank failed: aborts the communicator so peers blocked in a collective return.
  void mark_failed();
  /// After a failure: waits for every stream to drain and clears the abort.
  void recover_if_failed();

 private:
  DeviceKind kind_;
  Backend& backend_;
  std::vector<int> ranks_;
  std::vector<Device> devices_;
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<DeviceCollectives> collectives_;
  std::vector<std::unique_ptr<RankStream>> streams_;  // [rank]; null for ranks of other processes
  std::mutex resources_mu_;
  // [i]: the resources of ranks_[i] once made (null until then, or when the backend keeps none).
  std::vector<std::shared_ptr<RankResources>> resources_;
  std::mutex submit_mu_;
  std::atomic<bool> failed_{false};
};

/// A world's rank groups, one per (device kind, tp_degree) while some stage uses it: the one
/// registry of the ranks' streams, devices and communicators (World::rank_groups()).
class RankGroups {
 public:
  /// The group of `tp_degree` ranks of `backend` in `world` (whose registry this is): created
  /// on first use, shared by every later caller while one holds it, freed with its last user.
  std::shared_ptr<RankGroup> get(const World& world, Backend& backend, int tp_degree);
  /// Groups alive now (held by some user).
  std::size_t live() const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<DeviceKind, int>, std::weak_ptr<RankGroup>> groups_;
};

}  // namespace devpipe

// Internal: the narrow device boundary every backend implements.
//
// allocate, copy, compile a graph for a rank, run it. Chaining two stages hands over a buffer
// (and, on asynchronous backends, an event); no host synchronisation in between.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "devpipe/device.h"
#include "devpipe/graph.h"
#include "devpipe/tensor.h"

namespace devpipe {

class Communicator;
class World;

/// The device side of the collectives between the ranks of one rank group
/// (runtime/rank_group.h): made by the backend for its devices (Backend::make_collectives),
/// owned by the group, shared by every executable compiled for the group's ranks, which must
/// not outlive it. On cuda: the NCCL communicators, or the events and buffer slots of the
/// protocol for ranks that share a GPU. The cpu backend has none: its kernels call the group's
/// host Communicator.
class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
};

/// What a backend keeps for one rank of a rank group (runtime/rank_group.h): made by the backend
/// for the rank's device (Backend::make_rank_resources) the first time the group hands out the
/// rank's RankInfo, then shared by every executable compiled for that rank of the group, each of
/// which holds it (RankInfo::resources), so it lives until both the group and the rank's last
/// executable are gone.
/// On cpu: the rank's WorkPools, one per thread count, so that a rank's stages run on one thread
/// team. On cuda: the rank's stream, cuBLASLt and cuDNN handles and workspace (RankContext).
class RankResources {
 public:
  virtual ~RankResources() = default;
};

/// What a backend is told of a rank group when it makes the group's collectives.
struct GroupPlacement {
  const World* world = nullptr;  // the world the group belongs to (not owned)
  int tp_degree = 1;
  std::vector<int> ranks;        // the ranks this process runs, ascending (World::local_ranks)
  std::vector<Device> devices;   // devices[i]: the device of ranks[i] (World::device_of_rank)
};

/// Which rank an executable serves and how it reaches its peers.
struct RankInfo {
  int rank = 0;
  int tp_degree = 1;
  Communicator* comm = nullptr;  // required when tp_degree > 1; not owned
  int num_threads = 1;           // host threads the rank's kernels may use
  // The group's device collectives (not owned); required when tp_degree > 1 on a backend whose
  // make_collectives() makes them (cuda).
  DeviceCollectives* collectives = nullptr;
  // The rank's resources in its group (RankGroup::rank_info), shared with the rank's other
  // executables; null for an executable compiled on its own (it then makes resources of its own,
  // shared with no other executable).
  std::shared_ptr<RankResources> resources;
};

/// Completion of device work queued on a rank's queue (a CUDA event on cuda). The cpu backend
/// has none: its run() returns once the work is done.
class DeviceEvent {
 public:
  virtual ~DeviceEvent() = default;
  /// Blocks the calling thread until the work recorded before the event has run on the device.
  virtual void synchronize() = 0;
};

/// A graph compiled for one rank, weights bound. Not thread-safe: one caller at a time (the
/// rank's own thread).
class Executable {
 public:
  virtual ~Executable() = default;
  /// An event for this executable's queue, or null when run() returns only once its work is
  /// done (the cpu backend). Created once per rank and reused.
  virtual std::unique_ptr<DeviceEvent> create_event() { return nullptr; }
  /// Records `event` after the work queued so far on this executable's queue.
  virtual void record(DeviceEvent& event) {}
  /// Makes work queued from now on on this executable's queue wait for `event`, without
  /// blocking the host (a ranked input produced on another queue).
  virtual void wait(DeviceEvent& event) {}
  /// Runs the graph. `inputs`: device pointers to the graph inputs (graph.inputs order), each
  /// contiguous with the graph's shape/dtype. `outputs`: preallocated device pointers for the
  /// graph outputs (graph.outputs order). Blocking on the cpu backend; on cuda it queues the
  /// work on the rank's stream and returns (record() an event to know when it ran). Makes no
  /// heap allocation in steady state.
  virtual void run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) = 0;
  /// Bytes of intermediate memory planned for one run.
  virtual std::size_t workspace_bytes() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind kind() const = 0;
  /// Devices of this kind that this process sees (>= 1).
  virtual int device_count() const = 0;
  /// The device rank `rank` of `tp_degree` ranks runs on: World::device_of_rank over this
  /// backend's devices.
  Device device_for_rank(int rank, int tp_degree) const;
  /// The device collectives of a new rank group (runtime/rank_group.h), or null when the
  /// backend's collectives need nothing beyond the group's host Communicator (the default).
  virtual std::unique_ptr<DeviceCollectives> make_collectives(const GroupPlacement& placement) {
    return nullptr;
  }
  /// The state of a new rank group's rank `rank` on `device` (the device the group gives it),
  /// shared by the executables compiled for that rank of the group, or null when the backend
  /// keeps none (the default).
  virtual std::shared_ptr<RankResources> make_rank_resources(int rank, Device device) {
    return nullptr;
  }
  /// Compiles `graph` for one rank. `params`: host tensors in graph.params order with the
  /// per-rank shapes and the graph's dtypes; the executable may keep views of them (callers
  /// keep them alive) or copy them to the device. Throws Unsupported for an op it lacks.
  virtual std::unique_ptr<Executable> compile(const Graph& graph, const std::vector<Tensor>& params,
                                              const RankInfo& rank) = 0;
  /// A device tensor; memory comes from a cache and returns to it when the last handle dies.
  virtual Tensor allocate(const Shape& shape, DType dtype, Device device) = 0;
  /// Like allocate(), into an existing handle (its previous memory is let go): a backend that
  /// overrides this reuses `out`'s shape buffer, so that a runtime reusing its handles makes no
  /// heap allocation in steady state. The default assigns allocate()'s result.
  virtual void allocate_into(Tensor& out, const Shape& shape, DType dtype, Device device) {
    out = allocate(shape, dtype, device);
  }
  /// Blocking byte copy between host and device or within a device.
  virtual void copy(void* dst, Device dst_dev, const void* src, Device src_dev,
                    std::size_t bytes) = 0;
  /// True when the device memory of every rank is the host's memory (the cpu backend): host
  /// inputs that need no padding are then read where they lie instead of being copied.
  virtual bool device_memory_is_host() const { return false; }
  /// True when an executable's run() does its work on the calling host thread, on any thread
  /// (the cpu backend): the runtime may then run a light stage on the thread that submits it
  /// instead of handing it to the rank's stream.
  virtual bool runs_on_calling_thread() const { return false; }
  /// Sets `bytes` bytes at `dst` to zero. The default serves host memory only.
  virtual void fill_zero(void* dst, Device device, std::size_t bytes);
};

/// The backend for a device kind; throws Unsupported when it is not built in.
Backend& backend_for(DeviceKind kind);

}  // namespace devpipe

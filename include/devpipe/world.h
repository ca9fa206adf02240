// devpipe — the world: which tensor-parallel ranks this process runs and how ranks talk.
//
// A World is derived once per process from how the program was started:
//   ./app                 threads: one process runs every rank of every stage as threads,
//                         collectives over shared memory.
//   mpirun -np N ./app    mpi: N processes (when devpipe is built with MPI); a stage of
//                         tp_degree N runs rank p in process p, collectives over MPI; of
//                         tp_degree k*N, ranks [k*p, k*(p+1)) as threads of process p (shared
//                         memory inside a process, MPI between processes); a stage of
//                         tp_degree 1 runs in every process (each its own copy).
// A rank r of a stage of tp_degree ranks on a device kind runs on device r % (devices of that
// kind this process sees): World::device_of_rank is the one place that mapping is computed.
// The world owns the rank groups (src/runtime/rank_group.h): per (device kind, tp_degree) the
// streams of the ranks it runs, their devices and the communicator between them.
// DEVPIPE_WORLD=threads forces thread mode under a launcher; DEVPIPE_WORLD=mpi insists on MPI
// (an error when devpipe was built without it or no launcher started the process).
// DEVPIPE_COLLECTIVE_TIMEOUT_S (default 300) bounds how long a collective between processes
// waits for its peers before it fails with CollectiveError (a peer process died or hangs).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "devpipe/device.h"
#include "devpipe/tensor.h"

namespace devpipe {

class RankGroups;  // internal: the world's rank groups (src/runtime/rank_group.h)

/// How the ranks of a world reach each other.
enum class Transport { Threads, Mpi };

/// "threads" / "mpi".
const char* transport_name(Transport t);

class World {
 public:
  /// The world of this process (detected on first use; MPI is initialised then, and finalised
  /// at exit).
  static const World& get();

  Transport transport() const { return transport_; }
  /// Processes in the world (1 in thread mode).
  int num_processes() const { return num_processes_; }
  /// This process's index in [0, num_processes()).
  int process() const { return process_; }
  bool multi_process() const { return num_processes_ > 1; }
  /// Processes of the world on this machine (they share its cores).
  int local_processes() const { return local_processes_; }

  /// The ranks of a stage of `tp_degree` ranks that this process runs, ascending. Thread mode:
  /// all of them. MPI: with tp_degree = k * num_processes(), the k consecutive ranks
  /// [k * process(), k * (process() + 1)) (one rank per process when k is 1; else the k ranks
  /// are threads of the process); {0} when tp_degree is 1 (replicated in every process).
  /// Throws ConfigError for any other degree, naming it.
  std::vector<int> local_ranks(int tp_degree) const;

  /// The device of rank `rank` of a stage of `tp_degree` ranks on `kind` when this process sees
  /// `device_count` devices of that kind: index rank % device_count (ranks share devices when
  /// there are fewer devices than ranks). The one place ranks are mapped to devices; the
  /// backends' device_for_rank, the rank groups and the cuda backend's streams and
  /// communicators all take it from here. Throws InvalidArgument for a rank outside
  /// [0, tp_degree) or a device_count below 1, naming them.
  static Device device_of_rank(DeviceKind kind, int rank, int tp_degree, int device_count);
  /// The devices of local_ranks(tp_degree), in that order.
  std::vector<Device> local_devices(DeviceKind kind, int tp_degree, int device_count) const;

  /// Seconds a collective between processes waits for its peers (DEVPIPE_COLLECTIVE_TIMEOUT_S).
  double collective_timeout_s() const { return collective_timeout_s_; }

  /// Process 0's `t` on every process (host memory): inputs given on process 0 only. Every
  /// process calls it (a collective); the others' `t` is ignored (pass Tensor()). In thread
  /// mode, `t` itself. Throws InvalidArgument on every process when process 0's is undefined.
  Tensor broadcast_from_process0(const Tensor& t) const;

  /// "threads (1 process)" / "mpi: process 1 of 2".
  std::string describe() const;

  /// A world for tests and tools: `transport` with `num_processes` processes, this one
  /// `process`. Only get() is used by the runtime.
  World(Transport transport, int num_processes, int process, double collective_timeout_s,
        int local_processes = 1);

  /// Internal: the rank groups of this world (src/runtime/rank_group.h); copies of a World
  /// share them.
  RankGroups& rank_groups() const { return *groups_; }

 private:
  Transport transport_;
  int num_processes_;
  int process_;
  double collective_timeout_s_;
  int local_processes_;
  std::shared_ptr<RankGroups> groups_;
};

}  // namespace devpipe

// Internal: the MPI side of a multi-process world (src/runtime/mpi.cpp). Built with MPI when
// CMake finds it (DEVPIPE_HAVE_MPI); without it every function below but the first two throws
// Unsupported. No MPI type appears here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/device.h"
#include "runtime/communicator.h"

namespace devpipe::mpi {

/// Whether devpipe was built with MPI.
bool built_with_mpi();
/// The world size an MPI launcher announced in the environment (OMPI_COMM_WORLD_SIZE, PMI_SIZE),
/// or 0 when no launcher started this process.
int launcher_world_size();
/// Initialises MPI once (MPI_THREAD_MULTIPLE; leaves it alone when the application already
/// did) and returns {this process's rank, the world size}; later calls return the same (and
/// ignore the timeout). At exit the processes meet within `timeout_s` and MPI is finalised; the
/// job is aborted instead when a collective failed or a peer does not come (so that peers stuck
/// in a collective are ended too).
std::pair<int, int> init(double timeout_s);
/// Processes of the world on this machine (MPI_COMM_TYPE_SHARED), after init().
int local_size();
/// Collectives for the ranks of a stage with tp_degree a multiple k of the world size: rank r in
/// process r / k (one rank per process when k is 1; else the process's k ranks are threads that
/// meet in shared memory and its first rank talks to the other processes), on an MPI
/// communicator of its own (duplicated now from the one of device kind `kind`: a collective
/// every process makes at the same point, when it makes the rank group, waiting at most
/// `timeout_s`; freed with the Communicator). Every call waits at most `timeout_s` for the peers, then
/// throws CollectiveError; a failure (a timeout, or abort() after a local rank failed) leaves the
/// ranks out of step, so every later call throws too.
std::unique_ptr<Communicator> make_communicator(DeviceKind kind, int tp_degree, double timeout_s);
/// Marks the processes out of step (as a failed collective does): later MPI collectives and
/// control-plane calls refuse, and at exit the job is aborted (MPI_Abort) instead of finalised,
/// which also ends a hung peer. For collectives outside MPI that failed (the cuda backend's
/// NCCL). A no-op without MPI or before init().
void mark_out_of_step();
/// Control plane: process 0's `bytes` at `data` copied to `data` on every process (MPI_Ibcast),
/// waiting at most `timeout_s` (0: without bound).
void broadcast_from_process0(void* data, std::size_t bytes, double timeout_s);
/// Control plane, for compile() and load() on the caller's thread: every process's `text`, in
/// process order. Waits at most `timeout_s` (0: without bound) for the peers.
std::vector<std::string> all_gather_text(const std::string& text, double timeout_s);

/// The collectives this process's MPI communicators ran while the timeline was recording
/// (timeline::start; nothing is counted otherwise, so the hot path only reads the flag the
/// collective's span reads anyway): per collective and buffer size, the calls.
struct CollectiveCount {
  std::string op;     ///< "all_reduce" / "all_gather"
  std::size_t bytes;  ///< all_reduce: the buffer; all_gather: the gathered output
  std::uint64_t calls;
};
std::vector<CollectiveCount> recorded_collectives();
void clear_recorded_collectives();

}  // namespace devpipe::mpi

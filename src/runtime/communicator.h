// Internal: collectives between the tensor-parallel ranks of one stage.
//
// Every rank of a group must make the same sequence of calls (like NCCL). Calls block until all
// ranks have contributed. The in-process implementation serves ranks that are threads of this
// process (the cpu backend); the interface is what an NCCL or Gloo implementation provides.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "devpipe/dtype.h"

namespace devpipe {

/// Work a rank has open for its peers: tasks any thread may claim and run, one at a time.
class HelpJob {
 public:
  virtual ~HelpJob() = default;
  /// Claims one task and runs it as helper `slot` (in [0, HelpBoard::helpers())); false when
  /// none was left to claim.
  virtual bool help(int slot) = 0;
};

/// Where the ranks of a communicator that are threads of one process lend each other their
/// waiting time: a rank posts a job of independent tasks (a batch-split stage's convolution
/// bands), and a peer blocked in a collective of the same communicator runs tasks of it until
/// the collective completes or the job has none left. A rank whose core is slower (shared with
/// another process, or throttled) is so helped by the one that finished first, instead of that
/// one idling at the next collective. A job's tasks must not call collectives or take locks a
/// waiting rank may hold.
class HelpBoard {
 public:
  virtual ~HelpBoard() = default;
  /// The most helpers a job can have at once (the other ranks): helper slots [0, helpers()).
  virtual int helpers() const = 0;
  /// Opens `job` of rank `rank` (one job per rank at a time) to its peers and wakes those that
  /// are waiting. Allocates nothing.
  virtual void post(int rank, HelpJob* job) = 0;
  /// Closes rank `rank`'s job: no helper starts a task of it after this returns, and none is
  /// still inside its help() (the job may be freed).
  virtual void withdraw(int rank) = 0;
  /// Tasks run by helpers so far (tests, reports).
  virtual std::int64_t helped() const = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  /// Number of ranks.
  virtual int size() const = 0;
  /// In place: data := sum over ranks of data (`count` elements of `dtype`).
  virtual void all_reduce_sum(int rank, void* data, std::size_t count, DType dtype) = 0;
  /// out[o][r][:] := rank r's in[o][:] for o in [0, outer), each slab `inner_bytes` long.
  /// This is a concatenation along one dim when outer = product of the dims before it.
  virtual void all_gather(int rank, const void* in, void* out, std::size_t outer,
                          std::size_t inner_bytes) = 0;
  /// Returns when every rank has called it.
  virtual void barrier(int rank) = 0;
  /// Makes every blocked and future call throw (a rank failed mid-forward), so peers never hang.
  virtual void abort() = 0;
  /// Clears an abort once every rank is idle again.
  virtual void reset() = 0;
  /// The board on which this communicator's ranks in this process help each other while they
  /// wait in its collectives, or null when they do not (ranks in other processes).
  virtual HelpBoard* help_board() { return nullptr; }
};

/// Collectives for `size` ranks that are threads of this process, over shared memory.
std::unique_ptr<Communicator> make_local_communicator(int size);

/// The arithmetic of every all-reduce: out[i] := sources[0][i] + sources[1][i] + ... (the ranks
/// in rank order), accumulated in float32 and converted from and to `dtype`, for i in [0, n).
/// `out` may be one of the sources. Every communicator (shared memory, MPI, a group of ranks
/// per process) sums through this one function, so threads and processes give the same bits.
void sum_in_rank_order(const void* const* sources, std::size_t num_sources, void* out,
                       std::size_t n, DType dtype);

}  // namespace devpipe

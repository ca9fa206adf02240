// Internal: collectives between the tensor-parallel ranks of one stage.
//
// Every rank of a group must make the same sequence of calls (like NCCL). Calls block until all
// ranks have contributed. The in-process implementation serves ranks that are threads of this
// process (the cpu backend); the interface is what an NCCL or Gloo implementation provides.
#pragma once

#include <cstddef>
#include <memory>

#include "devpipe/dtype.h"

namespace devpipe {

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

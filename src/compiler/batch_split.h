// Internal: whether a stage's graph can run each rank on its share of the batch rows (the batch
// split of replicated stages at tp > 1, see ModelWrapper::compile).
#pragma once

#include <cstdint>
#include <string>

#include "devpipe/graph.h"

namespace devpipe {

/// Why `graph`, traced for a bucket of `batch` rows, cannot be split by batch rows over the
/// ranks, or "" when it can. It can when every rank would compute the same values (no sharded
/// parameter, no collective, no rank-dependent embedding or slice), it has no state (a state is
/// indexed by its own rows, not the batch's), and every row of every output depends only on the
/// same row of the data inputs: each op is checked to keep dim 0 as the batch rows (a reduction,
/// softmax, concat, slice, permute or reshape over dim 0, a matmul contracting it, a parameter
/// or constant with `batch` rows broadcast against them, or an op not known to keep rows apart
/// all mix rows and keep the stage replicated). The check is conservative: a reshape that merges
/// the batch into another dim also keeps the stage replicated.
std::string batch_split_blocker(const Graph& graph, std::int64_t batch);

/// Why the ranks running `graph` would compute different values, or "" when every rank
/// computes the same ones from the same inputs: a sharded parameter, a state (each rank's own),
/// a collective, a state write, an embedding over a vocabulary split over the ranks or a slice
/// taken by rank. A graph without any (a replicated stage whose batch is not split) may be run
/// by one rank for all of them where their memory is shared (see ModelWrapper::forward).
std::string rank_dependence(const Graph& graph);

}  // namespace devpipe

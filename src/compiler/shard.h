// Internal: splitting a checkpoint tensor over tensor-parallel ranks.
#pragma once

#include "devpipe/tensor.h"

namespace devpipe {

/// Rank `rank`'s part of host tensor `full` split into `parts` equal slices along `dim`
/// (a contiguous copy); `dim` < 0 returns `full` itself (replicated).
Tensor shard_tensor(const Tensor& full, int dim, int parts, int rank);

}  // namespace devpipe

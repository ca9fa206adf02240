// Internal: copying a stage's ranked outputs back to the host.
#pragma once

#include <vector>

#include "devpipe/ranked.h"

namespace devpipe::detail {

/// The first rank whose tensors this process holds (0 in thread mode; under MPI, the process's
/// own rank).
std::size_t first_local_rank(const RankedData& data);

/// Copies the first local rank's outputs (every rank holds the same whole outputs) of `data`, cut to its real batch, into `out` (resized to the output
/// count; each tensor rebound to pooled host memory) and counts the bytes as device-to-host.
/// `scratch` is reused for shapes, so a steady state of calls allocates nothing. The outputs
/// must be ready.
/// Returns the bytes copied.
std::uint64_t copy_rank0_to_host(const RankedData& data, std::vector<Tensor>& out, Shape& scratch);

}  // namespace devpipe::detail

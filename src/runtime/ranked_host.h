// Internal: copying a stage's ranked outputs back to the host.
#pragma once

#include <vector>

#include "devpipe/ranked.h"

namespace devpipe::detail {

/// Copies rank 0's outputs of `data`, cut to its real batch, into `out` (resized to the output
/// count; each tensor rebound to pooled host memory) and counts the bytes as device-to-host.
/// `scratch` is reused for shapes, so a steady state of calls allocates nothing. The outputs
/// must be ready.
void copy_rank0_to_host(const RankedData& data, std::vector<Tensor>& out, Shape& scratch);

}  // namespace devpipe::detail

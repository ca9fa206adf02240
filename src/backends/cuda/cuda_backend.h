// Internal: the cuda backend (cuBLASLt, cuDNN 9, NCCL and its own kernels).
//
// No CUDA type appears here, so tests and the runtime can include it without the CUDA headers.
//
// Streams. Rank r runs on the GPU World::device_of_rank gives it (cuda:(r % device_count)) on its
// own non-blocking stream (ranks that share a GPU get distinct streams). Executable::run only enqueues work on that stream.
// Backend::copy is blocking and ordered after all work already enqueued on the device's
// streams (it fences them); fill_zero is asynchronous but ordered both ways (the device's
// streams wait for it).
//
// Memory. allocate() serves blocks from a caching pool per device (size classes, cudaMalloc
// only on a miss). When the last handle of a block dies, the block returns to the cache with a
// fence (events recorded on every stream of the device); the next user of the block makes
// every stream of the device wait for that fence, so pending kernels that still read or write
// the block finish first, without a host synchronisation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "devpipe/device.h"
#include "runtime/backend.h"

namespace devpipe {

/// The process-wide cuda backend. The first call initialises the CUDA runtime and registers
/// the cuda device copy (so Tensor::to_host works for cuda tensors). Throws Unsupported when no
/// CUDA device is usable.
Backend& cuda_backend();

/// Number of usable CUDA devices; 0 when there is none, with the reason in `reason` (the
/// driver's error or "no CUDA device"). Never throws and needs no backend.
int cuda_device_count(std::string* reason = nullptr);

/// cudaMalloc calls the backend made so far (pool misses, staging aside).
std::uint64_t cuda_malloc_count();
/// Host synchronisations (stream/event/device synchronise calls) the backend made so far.
std::uint64_t cuda_host_sync_count();
/// CUDA graphs captured and instantiated so far.
std::uint64_t cuda_graph_capture_count();
/// Executable runs served by replaying a captured CUDA graph.
std::uint64_t cuda_graph_replay_count();
/// Executable runs launched eagerly (kernel by kernel).
std::uint64_t cuda_eager_run_count();
/// Bytes of device memory cached in the pools' free lists.
std::size_t cuda_cached_bytes();
/// Frees every cached block (after waiting for the device to go idle).
void cuda_release_cached();

/// Batch padding copy: dst (on dst_dev, `total_rows` rows of `row_bytes`) gets `rows` rows
/// from src (host or device), the remaining rows zeroed; blocking like Backend::copy.
void cuda_copy_rows_padded(void* dst, Device dst_dev, const void* src, Device src_dev,
                           std::size_t rows, std::size_t total_rows, std::size_t row_bytes);

/// Waits for all work on `device` and throws the first error a kernel recorded there (an
/// embedding index out of range) as InvalidArgument. Backend::copy checks this too.
void cuda_check_device_errors(Device device);

}  // namespace devpipe

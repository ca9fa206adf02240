// Internal (cuda backend): process-wide device state (stream registry, fences, caching pool,
// copy stream and staging, device error record) and the rank contexts of rank groups.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backends/cuda/cuda_util.h"
#include "backends/cuda/kernels.h"
#include "backends/cuda/libs.h"
#include "devpipe/tensor.h"
#include "runtime/backend.h"

namespace devpipe::cuda {

/// Everything the backend keeps per device. Created for every device when the backend starts
/// and never destroyed (tensors may outlive static destruction).
class DeviceState {
 public:
  explicit DeviceState(int device);
  DeviceState(const DeviceState&) = delete;
  DeviceState& operator=(const DeviceState&) = delete;

  int device() const { return device_; }

  // ---- streams and fences ----
  /// Adds a stream of this device to the set that copies, fills and pool fences order against.
  void register_stream(cudaStream_t s);
  /// Takes `s` out of that set again (before it is destroyed).
  void unregister_stream(cudaStream_t s);
  /// Makes `waiter` wait for all work enqueued so far on every registered stream but itself.
  void wait_for_all_streams(cudaStream_t waiter);
  /// Makes every registered stream (but `s`) wait for the work enqueued so far on `s`.
  void make_all_streams_wait(cudaStream_t s);

  // ---- caching pool ----
  /// A block of at least `bytes` bytes (256-byte aligned); returns to the cache when the last
  /// owner goes. Throws OutOfMemory when even an emptied cache cannot serve it.
  std::shared_ptr<void> acquire(std::size_t bytes);
  std::size_t cached_bytes();
  /// Waits for the device to go idle and frees every cached block.
  void release_cached();

  // ---- copies (blocking; serialised per device) ----
  void copy_to_device(void* dst, const void* host_src, std::size_t bytes);
  void copy_to_host(void* host_dst, const void* src, std::size_t bytes);
  /// Device to device on this device (or from a peer device's memory).
  void copy_on_device(void* dst, const void* src, std::size_t bytes, int src_device);
  /// Asynchronous memset, ordered after and before the work of every registered stream.
  void fill_zero(void* dst, std::size_t bytes);
  /// Synchronises the copy stream.
  void sync_copies(const char* why);

  // ---- errors recorded by kernels ----
  /// The record kernels write to (allocated on first use).
  DeviceErrorRecord* error_record();
  /// After the device is idle: throws InvalidArgument for a recorded error and clears it.
  void check_error_record_locked();
  std::mutex& copy_mutex() { return copy_mu_; }
  cudaStream_t copy_stream() const { return copy_stream_.get(); }

 private:
  struct CachedBlock {
    void* ptr = nullptr;
    std::vector<cudaEvent_t> fence;
  };
  cudaEvent_t take_event_locked();
  void give_back(void* p, std::size_t cls);
  void* malloc_block(std::size_t cls);
  void ensure_staging_locked();

  int device_;
  std::mutex mu_;  // streams, events
  std::vector<cudaStream_t> streams_;
  std::vector<Event> events_;
  std::vector<cudaEvent_t> free_events_;

  std::mutex pool_mu_;
  std::unordered_map<std::size_t, std::vector<CachedBlock>> free_blocks_;
  std::size_t cached_bytes_ = 0;

  std::mutex copy_mu_;
  Stream copy_stream_;
  PinnedBuffer staging_[2];
  Event staging_done_[2];
  bool staging_pending_[2] = {false, false};

  std::mutex error_mu_;
  void* error_record_ = nullptr;  // device memory, never freed
  PinnedBuffer error_readback_;
};

/// The state of a rank of a rank group: its device, its stream, library handles and the cuBLASLt
/// workspace. The cuda backend's RankResources (Backend::make_rank_resources): made by the group
/// on the device it gives the rank and shared by every executable compiled for that rank of the
/// group, each holding it; an executable compiled without a group's resources makes its own.
/// `mu` is held for the whole of a run.
class RankContext final : public RankResources {
 public:
  RankContext(int rank, DeviceState& dev);
  /// Gives back the workspace, takes the stream out of the device's set and waits for its work.
  ~RankContext() override;
  RankContext(const RankContext&) = delete;
  RankContext& operator=(const RankContext&) = delete;

  int rank() const { return rank_; }
  int device() const { return dev_.device(); }
  DeviceState& device_state() { return dev_; }
  /// Where this rank's work runs (registered with the device for fences).
  cudaStream_t stream() const { return stream_.get(); }
  /// Private stream on which executables capture CUDA graphs; never executes work.
  cudaStream_t capture_stream() const { return capture_stream_.get(); }
  cublasLtHandle_t lt() const { return lt_.get(); }
  /// cuBLASLt workspace (allocated on first call); its size.
  void* lt_workspace();
  static constexpr std::size_t kLtWorkspaceBytes = 32u << 20;
  /// The cuDNN handle (created on first call).
  cudnnHandle_t cudnn();

  std::mutex mu;

 private:
  int rank_;
  DeviceState& dev_;
  Stream stream_;
  Stream capture_stream_;
  LtHandle lt_;
  std::mutex lazy_mu_;
  std::shared_ptr<void> lt_workspace_;
  CudnnHandle cudnn_;
};

/// Number of devices the backend uses (>= 1 once the backend exists).
int num_devices();
DeviceState& device_state(int device);
/// Registers the description of a node whose kernel may record an error; returns its tag.
int register_error_tag(const std::string& where);
/// Device copy of a host parameter (shared with earlier uploads of the same host tensor while
/// they are alive), or the tensor itself when it already is on `device`.
Tensor upload_parameter(const Tensor& param, int device);
/// A device tensor from the pool.
Tensor device_tensor(const Shape& shape, DType dtype, int device);

/// Counters kept by the executor.
void note_graph_capture();
void note_graph_replay();
void note_eager_run();

}  // namespace devpipe::cuda

// Internal (cuda backend): error checks and RAII wrappers for CUDA runtime resources.
//
// Every CUDA call whose failure matters goes through DEVPIPE_CUDA_CHECK, which throws a
// devpipe::Error subclass naming the call and the CUDA error (OutOfMemory for
// cudaErrorMemoryAllocation). Destructors never throw: they ignore errors (the CUDA runtime may
// already be shutting down at process exit).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace devpipe::cuda {

/// Throws OutOfMemory (cudaErrorMemoryAllocation) or Error: "cuda backend: <call> failed:
/// <error string> (<error name>)[ in <where>]".
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call,
                                   const std::string& where = {});

inline void check_cuda(cudaError_t err, const char* call) {
  if (err != cudaSuccess) throw_cuda_error(err, call);
}

#define DEVPIPE_CUDA_CHECK(call) ::devpipe::cuda::check_cuda((call), #call)

// Counters (tests and reports).
void note_cuda_malloc();
void note_host_sync();
std::uint64_t malloc_count();
std::uint64_t host_sync_count();

/// cudaStreamSynchronize, counted as a host synchronisation.
void sync_stream(cudaStream_t s, const char* why);

/// Makes `device` current for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

/// Move-only owner of a handle released by `Destroy` (which returns a status that is ignored).
template <class H, auto Destroy>
class Handle {
 public:
  Handle() = default;
  explicit Handle(H h) : h_(h) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, H{})) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, H{});
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  H get() const { return h_; }
  explicit operator bool() const { return h_ != H{}; }
  /// Releases the current handle and returns where a creation function writes a new one.
  H* out() {
    reset();
    return &h_;
  }
  /// Gives up ownership: returns the handle (empty afterwards) without releasing it.
  H release() { return std::exchange(h_, H{}); }
  void reset() {
    if (h_ != H{}) {
      (void)Destroy(h_);
      h_ = H{};
    }
  }

 private:
  H h_{};
};

inline cudaError_t destroy_stream(cudaStream_t s) { return cudaStreamDestroy(s); }
inline cudaError_t destroy_event(cudaEvent_t e) { return cudaEventDestroy(e); }
inline cudaError_t destroy_graph(cudaGraph_t g) { return cudaGraphDestroy(g); }
inline cudaError_t destroy_graph_exec(cudaGraphExec_t g) { return cudaGraphExecDestroy(g); }
inline cudaError_t free_host(void* p) { return cudaFreeHost(p); }
inline cudaError_t free_device(void* p) { return cudaFree(p); }

using GraphHandle = Handle<cudaGraph_t, destroy_graph>;
using GraphExecHandle = Handle<cudaGraphExec_t, destroy_graph_exec>;

/// A non-blocking stream on the current device (never synchronises with the legacy stream).
class Stream {
 public:
  Stream() = default;
  static Stream create(int device);
  cudaStream_t get() const { return h_.get(); }
  int device() const { return device_; }

 private:
  Handle<cudaStream_t, destroy_stream> h_;
  int device_ = -1;
};

/// An event without timing on `device`.
class Event {
 public:
  Event() = default;
  static Event create(int device);
  cudaEvent_t get() const { return h_.get(); }

 private:
  Handle<cudaEvent_t, destroy_event> h_;
};

/// Page-locked host memory (cudaHostAlloc).
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static PinnedBuffer allocate(std::size_t bytes);
  void* get() const { return h_.get(); }
  std::size_t size() const { return bytes_; }

 private:
  Handle<void*, free_host> h_;
  std::size_t bytes_ = 0;
};

/// Number of visible CUDA devices; 0 (with `reason` set) when there is none or the driver
/// cannot be reached. Never throws.
int device_count(std::string* reason = nullptr);

/// Element count of a shape as size_t.
inline std::size_t to_size(std::int64_t v) { return static_cast<std::size_t>(v); }

}  // namespace devpipe::cuda

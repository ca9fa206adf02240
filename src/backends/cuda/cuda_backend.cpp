// The cuda backend: device state (stream registry, fences, caching pool, staged copies),
// the rank contexts of rank groups, and the Backend implementation.
#include "backends/cuda/cuda_backend.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <tuple>

#include "backends/cuda/executor.h"
#include "backends/cuda/runtime.h"
#include "core/device_copy.h"
#include "devpipe/error.h"

namespace devpipe {
namespace cuda {

namespace {

constexpr std::size_t kStagingChunk = 8u << 20;  // bytes per pinned staging buffer (two of them)

std::atomic<std::uint64_t> g_captures{0};
std::atomic<std::uint64_t> g_replays{0};
std::atomic<std::uint64_t> g_eager{0};

/// Size classes: multiples of an eighth of the next power of two (at most 12.5% slack), at
/// least 512 bytes.
std::size_t size_class(std::size_t bytes) {
  if (bytes <= 512) return 512;
  std::size_t pow2 = 512;
  while (pow2 < bytes) pow2 <<= 1;
  const std::size_t step = std::max<std::size_t>(pow2 / 8, 512);
  return (bytes + step - 1) / step * step;
}

bool is_pinned_host(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}

std::mutex g_tags_mu;
std::vector<std::string>& error_tags() {
  static auto* tags = new std::vector<std::string>();
  return *tags;
}

std::string tag_description(int tag) {
  std::lock_guard lock(g_tags_mu);
  const auto& tags = error_tags();
  if (tag >= 0 && static_cast<std::size_t>(tag) < tags.size())
    return tags[static_cast<std::size_t>(tag)];
  return "embedding";
}

}  // namespace

void note_graph_capture() { g_captures.fetch_add(1, std::memory_order_relaxed); }
void note_graph_replay() { g_replays.fetch_add(1, std::memory_order_relaxed); }
void note_eager_run() { g_eager.fetch_add(1, std::memory_order_relaxed); }

int register_error_tag(const std::string& where) {
  std::lock_guard lock(g_tags_mu);
  error_tags().push_back(where);
  return static_cast<int>(error_tags().size()) - 1;
}

// ---------------------------------------------------------------------------- DeviceState

DeviceState::DeviceState(int device) : device_(device) {
  copy_stream_ = Stream::create(device);
  streams_.push_back(copy_stream_.get());
}

void DeviceState::register_stream(cudaStream_t s) {
  std::lock_guard lock(mu_);
  streams_.push_back(s);
}

void DeviceState::unregister_stream(cudaStream_t s) {
  std::lock_guard lock(mu_);
  std::erase(streams_, s);
}

cudaEvent_t DeviceState::take_event_locked() {
  if (free_events_.empty()) {
    events_.push_back(Event::create(device_));
    return events_.back().get();
  }
  cudaEvent_t e = free_events_.back();
  free_events_.pop_back();
  return e;
}

void DeviceState::wait_for_all_streams(cudaStream_t waiter) {
  DeviceGuard guard(device_);
  std::lock_guard lock(mu_);
  for (cudaStream_t s : streams_) {
    if (s == waiter) continue;
    cudaEvent_t e = take_event_locked();
    free_events_.push_back(e);  // re-recording later is fine once the wait below is issued
    DEVPIPE_CUDA_CHECK(cudaEventRecord(e, s));
    DEVPIPE_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
  }
}

void DeviceState::make_all_streams_wait(cudaStream_t s) {
  DeviceGuard guard(device_);
  std::lock_guard lock(mu_);
  cudaEvent_t e = take_event_locked();
  free_events_.push_back(e);
  DEVPIPE_CUDA_CHECK(cudaEventRecord(e, s));
  for (cudaStream_t t : streams_) {
    if (t != s) DEVPIPE_CUDA_CHECK(cudaStreamWaitEvent(t, e, 0));
  }
}

void* DeviceState::malloc_block(std::size_t cls) {
  DeviceGuard guard(device_);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, cls);
  note_cuda_malloc();
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    release_cached();
    err = cudaMalloc(&p, cls);
    note_cuda_malloc();
  }
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    std::size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
    throw OutOfMemory("cuda backend: cudaMalloc of " + std::to_string(cls) +
                      " bytes on cuda:" + std::to_string(device_) + " failed: out of memory (" +
                      std::to_string(free_b) + " of " + std::to_string(total_b) +
                      " bytes free after emptying the cache)");
  }
  if (err != cudaSuccess) throw_cuda_error(err, "cudaMalloc", "cuda:" + std::to_string(device_));
  return p;
}

std::shared_ptr<void> DeviceState::acquire(std::size_t bytes) {
  const std::size_t cls = size_class(bytes);
  CachedBlock block;
  bool hit = false;
  {
    std::lock_guard lock(pool_mu_);
    auto it = free_blocks_.find(cls);
    if (it != free_blocks_.end() && !it->second.empty()) {
      block = std::move(it->second.back());
      it->second.pop_back();
      cached_bytes_ -= cls;
      hit = true;
    }
  }
  void* p = nullptr;
  if (hit) {
    p = block.ptr;
    if (!block.fence.empty()) {
      // Work still pending on the block (enqueued before its last owner let go) must finish
      // before any stream touches it again: every stream waits for the fence.
      DeviceGuard guard(device_);
      std::lock_guard lock(mu_);
      cudaError_t err = cudaSuccess;
      for (cudaStream_t s : streams_) {
        for (cudaEvent_t e : block.fence) {
          if (err == cudaSuccess) err = cudaStreamWaitEvent(s, e, 0);
        }
      }
      for (cudaEvent_t e : block.fence) free_events_.push_back(e);
      if (err != cudaSuccess) {
        give_back(p, cls);
        throw_cuda_error(err, "cudaStreamWaitEvent",
                         "the pool fence of cuda:" + std::to_string(device_));
      }
    }
  } else {
    p = malloc_block(cls);
  }
  return std::shared_ptr<void>(p, [this, cls](void* q) { give_back(q, cls); });
}

void DeviceState::give_back(void* p, std::size_t cls) {
  CachedBlock block;
  block.ptr = p;
  try {
    DeviceGuard guard(device_);
    std::lock_guard lock(mu_);
    for (cudaStream_t s : streams_) {
      cudaEvent_t e = take_event_locked();
      if (cudaEventRecord(e, s) == cudaSuccess) {
        block.fence.push_back(e);
      } else {
        (void)cudaGetLastError();  // at process exit the runtime may be gone: no fence needed
        free_events_.push_back(e);
      }
    }
  } catch (...) {
    // No fence could be made (no event): keep the block; it is reused only after the fences
    // of other blocks or copies order the device anyway.
  }
  std::lock_guard lock(pool_mu_);
  free_blocks_[cls].push_back(std::move(block));
  cached_bytes_ += cls;
}

std::size_t DeviceState::cached_bytes() {
  std::lock_guard lock(pool_mu_);
  return cached_bytes_;
}

void DeviceState::release_cached() {
  DeviceGuard guard(device_);
  note_host_sync();
  DEVPIPE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<CachedBlock> blocks;
  {
    std::lock_guard lock(pool_mu_);
    for (auto& [cls, list] : free_blocks_) {
      for (auto& b : list) blocks.push_back(std::move(b));
      list.clear();
    }
    cached_bytes_ = 0;
  }
  std::lock_guard lock(mu_);
  for (auto& b : blocks) {
    (void)cudaFree(b.ptr);
    for (cudaEvent_t e : b.fence) free_events_.push_back(e);
  }
}

void DeviceState::ensure_staging_locked() {
  if (staging_[0].get()) return;
  for (int i = 0; i < 2; ++i) {
    staging_[i] = PinnedBuffer::allocate(kStagingChunk);
    staging_done_[i] = Event::create(device_);
  }
}

void DeviceState::sync_copies(const char* why) {
  sync_stream(copy_stream_.get(), why);
  staging_pending_[0] = staging_pending_[1] = false;
}

void DeviceState::copy_to_device(void* dst, const void* host_src, std::size_t bytes) {
  std::lock_guard lock(copy_mu_);
  DeviceGuard guard(device_);
  cudaStream_t cs = copy_stream_.get();
  wait_for_all_streams(cs);
  if (is_pinned_host(host_src)) {
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, cs));
    sync_copies("copy host to device");
    return;
  }
  ensure_staging_locked();
  // Two pinned buffers: the host fills one while the DMA engine drains the other.
  std::size_t i = 0;
  for (std::size_t off = 0; off < bytes; off += kStagingChunk, ++i) {
    const std::size_t n = std::min(kStagingChunk, bytes - off);
    const std::size_t b = i % 2;
    if (staging_pending_[b]) {
      note_host_sync();
      DEVPIPE_CUDA_CHECK(cudaEventSynchronize(staging_done_[b].get()));
    }
    std::memcpy(staging_[b].get(), static_cast<const char*>(host_src) + off, n);
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + off, staging_[b].get(), n,
                                       cudaMemcpyHostToDevice, cs));
    DEVPIPE_CUDA_CHECK(cudaEventRecord(staging_done_[b].get(), cs));
    staging_pending_[b] = true;
  }
  sync_copies("copy host to device");
}

void DeviceState::copy_to_host(void* host_dst, const void* src, std::size_t bytes) {
  std::lock_guard lock(copy_mu_);
  DeviceGuard guard(device_);
  cudaStream_t cs = copy_stream_.get();
  wait_for_all_streams(cs);
  if (is_pinned_host(host_dst)) {
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, cs));
    sync_copies("copy device to host");
    throw_if_collectives_failed();
    check_error_record_locked();
    return;
  }
  ensure_staging_locked();
  const std::size_t chunks = (bytes + kStagingChunk - 1) / kStagingChunk;
  auto enqueue = [&](std::size_t i) {
    const std::size_t off = i * kStagingChunk, n = std::min(kStagingChunk, bytes - off);
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(staging_[i % 2].get(), static_cast<const char*>(src) + off,
                                       n, cudaMemcpyDeviceToHost, cs));
    DEVPIPE_CUDA_CHECK(cudaEventRecord(staging_done_[i % 2].get(), cs));
  };
  enqueue(0);
  for (std::size_t i = 0; i < chunks; ++i) {
    if (i + 1 < chunks) enqueue(i + 1);  // the other buffer was drained to the host already
    note_host_sync();
    DEVPIPE_CUDA_CHECK(cudaEventSynchronize(staging_done_[i % 2].get()));
    const std::size_t off = i * kStagingChunk, n = std::min(kStagingChunk, bytes - off);
    std::memcpy(static_cast<char*>(host_dst) + off, staging_[i % 2].get(), n);
  }
  sync_copies("copy device to host");
  throw_if_collectives_failed();
  check_error_record_locked();
}

void DeviceState::copy_on_device(void* dst, const void* src, std::size_t bytes, int src_device) {
  std::lock_guard lock(copy_mu_);
  DeviceGuard guard(device_);
  cudaStream_t cs = copy_stream_.get();
  wait_for_all_streams(cs);
  if (src_device != device_) {
    device_state(src_device).wait_for_all_streams(cs);
    DEVPIPE_CUDA_CHECK(cudaMemcpyPeerAsync(dst, device_, src, src_device, bytes, cs));
  } else if (dst != src) {
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cs));
  }
  sync_copies("copy device to device");
  throw_if_collectives_failed();
  check_error_record_locked();
}

void DeviceState::fill_zero(void* dst, std::size_t bytes) {
  std::lock_guard lock(copy_mu_);
  DeviceGuard guard(device_);
  cudaStream_t cs = copy_stream_.get();
  wait_for_all_streams(cs);
  DEVPIPE_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, cs));
  make_all_streams_wait(cs);
}

DeviceErrorRecord* DeviceState::error_record() {
  std::lock_guard elock(error_mu_);
  if (!error_record_) {
    DeviceGuard guard(device_);
    void* p = nullptr;
    DEVPIPE_CUDA_CHECK(cudaMalloc(&p, sizeof(DeviceErrorRecord)));
    note_cuda_malloc();
    std::lock_guard lock(copy_mu_);
    DEVPIPE_CUDA_CHECK(cudaMemsetAsync(p, 0, sizeof(DeviceErrorRecord), copy_stream_.get()));
    error_readback_ = PinnedBuffer::allocate(sizeof(DeviceErrorRecord));
    sync_copies("clear the error record");
    error_record_ = p;  // under copy_mu_, which check_error_record_locked() holds
  }
  return static_cast<DeviceErrorRecord*>(error_record_);
}

void DeviceState::check_error_record_locked() {
  void* rec = error_record_;  // set once under copy_mu_ (held here), never changed afterwards
  if (!rec) return;
  cudaStream_t cs = copy_stream_.get();
  DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(error_readback_.get(), rec, sizeof(DeviceErrorRecord),
                                     cudaMemcpyDeviceToHost, cs));
  sync_copies("read the error record");
  DeviceErrorRecord r;
  std::memcpy(&r, error_readback_.get(), sizeof r);
  if (r.code == 0) return;
  DEVPIPE_CUDA_CHECK(cudaMemsetAsync(rec, 0, sizeof(DeviceErrorRecord), cs));
  sync_copies("clear the error record");
  std::string what;
  switch (r.code) {
    case kErrIndexOutOfRange:
      what = "index " + std::to_string(r.value) + " (at position " + std::to_string(r.position) +
             ") is outside [0, " + std::to_string(r.limit) + ") of the indexed dim";
      break;
    case kErrKvLength:
      what = "kv_lengths[" + std::to_string(r.position) + "] = " + std::to_string(r.value) +
             " is outside [0, " + std::to_string(r.limit) + "] (the cache length)";
      break;
    default:
      what = "index " + std::to_string(r.value) + " (at position " + std::to_string(r.position) +
             ") is out of range for vocabulary size " + std::to_string(r.limit);
      break;
  }
  throw InvalidArgument("cuda backend: " + tag_description(r.tag) + ": " + what + "; found on cuda:" +
                        std::to_string(device_) + " by a kernel of an earlier run, whose outputs are invalid");
}

// ---------------------------------------------------------------------------- RankContext

RankContext::RankContext(int rank, DeviceState& dev) : rank_(rank), dev_(dev) {
  stream_ = Stream::create(dev.device());
  capture_stream_ = Stream::create(dev.device());
  DeviceGuard guard(dev.device());
  DEVPIPE_CUBLAS_CHECK(cublasLtCreate(lt_.out()), "rank " + std::to_string(rank));
  dev.register_stream(stream_.get());
}

RankContext::~RankContext() {
  // Given back while the stream is still registered, so that the block's fence covers the work
  // queued on it; then fences no longer wait for the stream, and its work finishes before the
  // handles and the stream go. At process exit the runtime may be gone: nothing to wait for.
  lt_workspace_.reset();
  dev_.unregister_stream(stream_.get());
  note_host_sync();
  if (cudaStreamSynchronize(stream_.get()) != cudaSuccess) (void)cudaGetLastError();
}

void* RankContext::lt_workspace() {
  std::lock_guard lock(lazy_mu_);
  if (!lt_workspace_) lt_workspace_ = dev_.acquire(kLtWorkspaceBytes);
  return lt_workspace_.get();
}

cudnnHandle_t RankContext::cudnn() {
  std::lock_guard lock(lazy_mu_);
  if (!cudnn_) {
    DeviceGuard guard(device());
    DEVPIPE_CUDNN_CHECK(cudnnCreate(cudnn_.out()), "rank " + std::to_string(rank_));
  }
  return cudnn_.get();
}

// ---------------------------------------------------------------------------- backend

namespace {

/// Process-wide state, created with the backend and never destroyed.
struct Globals {
  std::vector<std::unique_ptr<DeviceState>> devices;
  std::mutex params_mu;
  // (host address, bytes, device) -> (the host tensor, so the address stays its own; the
  // device copy while some executable still uses it)
  std::map<std::tuple<const void*, std::size_t, int>, std::pair<Tensor, std::weak_ptr<void>>>
      uploads;
};

Globals* g_globals = nullptr;

Globals& globals() {
  if (!g_globals) throw StateError("cuda backend: used before cuda_backend() initialised it");
  return *g_globals;
}

void device_copy_fn(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes);

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    std::string reason;
    const int n = cuda::device_count(&reason);
    if (n <= 0) throw Unsupported("cuda backend: no CUDA device: " + reason);
    auto* g = new Globals();
    for (int d = 0; d < n; ++d) g->devices.push_back(std::make_unique<DeviceState>(d));
    g_globals = g;
    detail::register_device_copy(DeviceKind::Cuda, &device_copy_fn);
  }

  DeviceKind kind() const override { return DeviceKind::Cuda; }

  int device_count() const override { return num_devices(); }

  std::unique_ptr<DeviceCollectives> make_collectives(const GroupPlacement& placement) override {
    return make_device_collectives(placement);
  }

  /// The rank's RankContext on `device`, shared by its executables in the group.
  std::shared_ptr<RankResources> make_rank_resources(int rank, Device device) override {
    check_device(device, ("make the context of rank " + std::to_string(rank) + " on").c_str());
    return std::make_shared<RankContext>(rank, device_state(device.index));
  }

  std::unique_ptr<Executable> compile(const Graph& graph, const std::vector<Tensor>& params,
                                      const RankInfo& rank) override {
    if (rank.tp_degree < 1 || rank.rank < 0 || rank.rank >= rank.tp_degree) {
      throw InvalidArgument("cuda backend: rank " + std::to_string(rank.rank) + " of tp_degree " +
                            std::to_string(rank.tp_degree) + " is out of range");
    }
    return make_executable(graph, params, rank);
  }

  Tensor allocate(const Shape& shape, DType dtype, Device device) override {
    check_device(device, "allocate on");
    return device_tensor(shape, dtype, device.index);
  }

  void copy(void* dst, Device dst_dev, const void* src, Device src_dev,
            std::size_t bytes) override {
    if (bytes == 0) return;
    if (dst_dev.is_host() && src_dev.is_host()) {
      if (dst != src) std::memmove(dst, src, bytes);
      return;
    }
    if (!dst_dev.is_host()) check_device(dst_dev, "copy to");
    if (!src_dev.is_host()) check_device(src_dev, "copy from");
    if (src_dev.is_host()) {
      device_state(dst_dev.index).copy_to_device(dst, src, bytes);
    } else if (dst_dev.is_host()) {
      device_state(src_dev.index).copy_to_host(dst, src, bytes);
    } else {
      device_state(dst_dev.index).copy_on_device(dst, src, bytes, src_dev.index);
    }
  }

  void fill_zero(void* dst, Device device, std::size_t bytes) override {
    if (bytes == 0) return;
    if (device.is_host()) {
      std::memset(dst, 0, bytes);
      return;
    }
    check_device(device, "fill_zero on");
    device_state(device.index).fill_zero(dst, bytes);
  }

 private:
  static void check_device(Device d, const char* what) {
    if (d.kind != DeviceKind::Cuda || d.index < 0 || d.index >= num_devices()) {
      throw InvalidArgument(std::string("cuda backend: cannot ") + what + " " + d.to_string() +
                            " (" + std::to_string(num_devices()) + " CUDA device(s))");
    }
  }
};

void device_copy_fn(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  cuda_backend().copy(dst, dst_dev, src, src_dev, bytes);
}

}  // namespace

int num_devices() { return static_cast<int>(globals().devices.size()); }

DeviceState& device_state(int device) {
  auto& devs = globals().devices;
  if (device < 0 || static_cast<std::size_t>(device) >= devs.size()) {
    throw InvalidArgument("cuda backend: no device cuda:" + std::to_string(device));
  }
  return *devs[static_cast<std::size_t>(device)];
}

Tensor device_tensor(const Shape& shape, DType dtype, int device) {
  const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  std::shared_ptr<void> block = device_state(device).acquire(bytes);
  void* p = block.get();
  return Tensor::from_blob(p, shape, dtype, Device::cuda(device), std::move(block));
}

Tensor upload_parameter(const Tensor& param, int device) {
  if (param.device() == Device::cuda(device)) return param;
  if (!param.device().is_host()) {
    throw InvalidArgument("cuda backend: parameter on " + param.device().to_string() +
                          " cannot be used on cuda:" + std::to_string(device));
  }
  Globals& g = globals();
  const auto key = std::make_tuple(param.raw_data(), param.nbytes(), device);
  {
    std::lock_guard lock(g.params_mu);
    for (auto it = g.uploads.begin(); it != g.uploads.end();) {
      it = it->second.second.expired() ? g.uploads.erase(it) : std::next(it);
    }
    auto it = g.uploads.find(key);
    if (it != g.uploads.end() && it->second.first.same_memory(param)) {
      if (auto block = it->second.second.lock()) {
        return Tensor::from_blob(block.get(), param.shape(), param.dtype(), Device::cuda(device),
                                 std::move(block));
      }
    }
  }
  Tensor t = device_tensor(param.shape(), param.dtype(), device);
  if (t.nbytes()) device_state(device).copy_to_device(t.raw_data(), param.raw_data(), t.nbytes());
  // The Tensor's owner is the pool block; keep a weak reference to share it with later
  // uploads of the same host tensor (other buckets of the same stage).
  std::shared_ptr<void> block(t.raw_data(), [t](void*) {});  // ties lifetime to t
  Tensor shared = Tensor::from_blob(t.raw_data(), t.shape(), t.dtype(), t.device(), block);
  std::lock_guard lock(g.params_mu);
  g.uploads[key] = {param, std::weak_ptr<void>(block)};
  return shared;
}

}  // namespace cuda

// ---------------------------------------------------------------------------- public API

Backend& cuda_backend() {
  static cuda::CudaBackend* backend = new cuda::CudaBackend();  // never destroyed
  return *backend;
}

int cuda_device_count(std::string* reason) { return cuda::device_count(reason); }
std::uint64_t cuda_malloc_count() { return cuda::malloc_count(); }
std::uint64_t cuda_host_sync_count() { return cuda::host_sync_count(); }
std::uint64_t cuda_graph_capture_count() { return cuda::g_captures.load(); }
std::uint64_t cuda_graph_replay_count() { return cuda::g_replays.load(); }
std::uint64_t cuda_eager_run_count() { return cuda::g_eager.load(); }

std::size_t cuda_cached_bytes() {
  cuda_backend();
  std::size_t total = 0;
  for (int d = 0; d < cuda::num_devices(); ++d) total += cuda::device_state(d).cached_bytes();
  return total;
}

void cuda_release_cached() {
  cuda_backend();
  for (int d = 0; d < cuda::num_devices(); ++d) cuda::device_state(d).release_cached();
}

void cuda_copy_rows_padded(void* dst, Device dst_dev, const void* src, Device src_dev,
                           std::size_t rows, std::size_t total_rows, std::size_t row_bytes) {
  if (rows > total_rows) {
    throw InvalidArgument("cuda_copy_rows_padded: " + std::to_string(rows) + " rows do not fit " +
                          std::to_string(total_rows));
  }
  Backend& be = cuda_backend();
  be.copy(dst, dst_dev, src, src_dev, rows * row_bytes);
  be.fill_zero(static_cast<char*>(dst) + rows * row_bytes, dst_dev,
               (total_rows - rows) * row_bytes);
}

void cuda_check_device_errors(Device device) {
  cuda_backend();
  cuda::DeviceState& d = cuda::device_state(device.index);
  std::lock_guard lock(d.copy_mutex());
  cuda::DeviceGuard guard(device.index);
  d.wait_for_all_streams(d.copy_stream());
  d.sync_copies("check device errors");
  d.check_error_record_locked();
}

}  // namespace devpipe

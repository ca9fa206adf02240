// The cpu backend: host memory from a caching pool, memcpy, and executables built on oneDNN.
#include "backends/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backends/cpu/executor.h"
#include "devpipe/error.h"

namespace devpipe {

namespace {

/// Caches 64-byte aligned host blocks in free lists keyed by size class, so that a steady
/// state of allocate/free (one forward after another) reuses the same blocks. Size classes
/// are multiples of an eighth of the next power of two (at most 12.5% slack), at least 64.
/// Never destroyed: tensors may outlive static destruction.
class HostPool {
 public:
  std::shared_ptr<void> acquire(std::size_t bytes) {
    const std::size_t cls = size_class(bytes);
    void* p = nullptr;
    {
      std::lock_guard lock(mutex_);
      auto it = free_.find(cls);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= cls;
      }
    }
    if (!p) {
      p = std::aligned_alloc(64, cls);
      if (!p) {
        release_cached();
        p = std::aligned_alloc(64, cls);
      }
      if (!p) {
        throw OutOfMemory("cpu backend: host allocation of " + std::to_string(bytes) +
                          " bytes failed");
      }
    }
    return std::shared_ptr<void>(p, [this, cls](void* q) { give_back(q, cls); });
  }

  /// Frees every cached block.
  void release_cached() {
    std::lock_guard lock(mutex_);
    for (auto& [cls, blocks] : free_) {
      for (void* p : blocks) std::free(p);
      blocks.clear();
    }
    cached_bytes_ = 0;
  }

 private:
  static std::size_t size_class(std::size_t bytes) {
    if (bytes <= 64) return 64;
    std::size_t pow2 = 64;
    while (pow2 < bytes) pow2 <<= 1;
    const std::size_t step = std::max<std::size_t>(pow2 / 8, 64);
    return (bytes + step - 1) / step * step;
  }

  void give_back(void* p, std::size_t cls) {
    std::lock_guard lock(mutex_);
    free_[cls].push_back(p);
    cached_bytes_ += cls;
  }

  std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  std::size_t cached_bytes_ = 0;
};

HostPool& host_pool() {
  static HostPool* pool = new HostPool();
  return *pool;
}

/// Backend implementation: every rank is a thread on the host.
class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::Cpu; }
  bool device_memory_is_host() const override { return true; }

  Device device_for_rank(int rank, int tp_degree) const override {
    if (tp_degree < 1 || rank < 0 || rank >= tp_degree) {
      throw InvalidArgument("cpu backend: rank " + std::to_string(rank) + " of tp_degree " +
                            std::to_string(tp_degree) + " is out of range");
    }
    return Device::cpu(0);
  }

  std::unique_ptr<Executable> compile(const Graph& graph, const std::vector<Tensor>& params,
                                      const RankInfo& rank) override {
    if (rank.tp_degree < 1 || rank.rank < 0 || rank.rank >= rank.tp_degree) {
      throw InvalidArgument("cpu backend: rank " + std::to_string(rank.rank) + " of tp_degree " +
                            std::to_string(rank.tp_degree) + " is out of range");
    }
    return std::make_unique<cpu::CpuExecutable>(graph, params, rank);
  }

  Tensor allocate(const Shape& shape, DType dtype, Device device) override {
    if (!device.is_host()) {
      throw InvalidArgument("cpu backend: cannot allocate on " + device.to_string());
    }
    const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
    std::shared_ptr<void> block = host_pool().acquire(bytes);
    void* data = block.get();
    return Tensor::from_blob(data, shape, dtype, device, std::move(block));
  }

  void copy(void* dst, Device dst_dev, const void* src, Device src_dev,
            std::size_t bytes) override {
    if (!dst_dev.is_host() || !src_dev.is_host()) {
      throw InvalidArgument("cpu backend: cannot copy from " + src_dev.to_string() + " to " +
                            dst_dev.to_string());
    }
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace devpipe

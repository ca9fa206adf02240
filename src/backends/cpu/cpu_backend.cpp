// The cpu backend: host memory from the caching host pool, memcpy, and executables built on oneDNN.
#include "backends/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>

#include "backends/cpu/executor.h"
#include "core/pool.h"
#include "devpipe/error.h"

namespace devpipe {

namespace {

/// Backend implementation: every rank is a thread on the host.
class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::Cpu; }
  bool device_memory_is_host() const override { return true; }
  bool runs_on_calling_thread() const override { return true; }

  /// Every rank runs on the host: one device, cpu:0.
  int device_count() const override { return 1; }

  /// The rank's WorkPools (CpuRankResources), shared by its executables in the group.
  std::shared_ptr<RankResources> make_rank_resources(int rank, Device device) override {
    if (!device.is_host()) {
      throw InvalidArgument("cpu backend: rank " + std::to_string(rank) + " cannot run on " +
                            device.to_string());
    }
    return std::make_shared<cpu::CpuRankResources>();
  }

  std::unique_ptr<Executable> compile(const Graph& graph, const std::vector<Tensor>& params,
                                      const RankInfo& rank) override {
    if (rank.tp_degree < 1 || rank.rank < 0 || rank.rank >= rank.tp_degree) {
      throw InvalidArgument("cpu backend: rank " + std::to_string(rank.rank) + " of tp_degree " +
                            std::to_string(rank.tp_degree) + " is out of range");
    }
    return std::make_unique<cpu::CpuExecutable>(graph, params, rank);
  }

  // Memory from the process-wide caching host pool (core/pool.h): a steady state of
  // allocate/free (one forward after another) reuses the same blocks, and the tensor's storage
  // comes from a free list, so allocate_into() makes no heap allocation in steady state.
  Tensor allocate(const Shape& shape, DType dtype, Device device) override {
    Tensor t;
    allocate_into(t, shape, dtype, device);
    return t;
  }

  void allocate_into(Tensor& out, const Shape& shape, DType dtype, Device device) override {
    if (!device.is_host()) {
      throw InvalidArgument("cpu backend: cannot allocate on " + device.to_string());
    }
    for (auto d : shape.dims()) {
      if (d < 0) throw ShapeError("negative dimension in shape " + shape.to_string());
    }
    detail::TensorAccess::rebind_host_pool(out, shape, dtype, device);
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

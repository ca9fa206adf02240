// Internal: what ModelWrapper's compile/load (model_wrapper.cpp) and forward (forward.cpp)
// share: the loaded state of a wrapper and small shape/message helpers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "compiler/artifact.h"
#include "core/pool.h"
#include "devpipe/error.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/safetensors.h"
#include "runtime/backend.h"
#include "runtime/rank_group.h"

namespace devpipe {

namespace wrapper_detail {
class JobPool;
/// A new, empty pool of reusable forward jobs (forward.cpp).
std::shared_ptr<JobPool> make_job_pool();
}  // namespace wrapper_detail

/// A bucket whose graph asks for at most this much work (graph_cost: FLOPs, and the bytes of its
/// parameters, inputs, outputs and intermediates) is light (Impl::light): it runs in about the
/// microseconds that waking a rank's stream thread and waiting for it take.
inline constexpr double kLightFlops = 1 << 20;
inline constexpr std::uint64_t kLightBytes = 256 << 10;

struct ModelWrapper::Impl {
  Manifest manifest;
  Backend* backend = nullptr;
  std::shared_ptr<RankGroup> group;
  std::vector<safetensors::File> weight_files;          // keep the mappings alive
  std::vector<std::vector<Tensor>> rank_params;         // [rank][graph.params order]
  // executables_[bucket index][rank]
  std::vector<std::vector<std::unique_ptr<Executable>>> executables;
  // Per bucket, how a forward runs it (see run_forward): `once`: every local rank would compute
  // the same values (no rank_dependence) into memory all of them read (the backend's device
  // memory is the host's, one device): the first local rank runs it and the others' outputs
  // are its buffers. `light`: so little work (kLightFlops, kLightBytes) that handing it to a
  // stream costs more than running it: on a backend that runs on the calling thread, the first
  // local rank's task runs on the thread that calls forward() when that rank's stream is idle.
  std::vector<char> once, light;
  // rank_device[r]: the device of local rank r (RankGroup::devices()), indexed by rank (other
  // processes' ranks hold a default Device, never read).
  std::vector<Device> rank_device;
  // Reusable per-forward state, shared with the jobs handed out (they come back to it).
  std::shared_ptr<wrapper_detail::JobPool> jobs;
  // States: the store's buffers [rank][manifest.states order], and the pointers runs get
  // (the store's, or scratch copies during warm-up).
  std::shared_ptr<StateStore> states;
  std::vector<std::vector<Tensor>> state_bufs;
  std::vector<std::vector<void*>> state_ptrs;
  // Named dims: their names (sorted), per input/output sample dim the index of its name (-1:
  // fixed), and per bucket its full input/output shapes and the size of each named dim.
  std::vector<std::string> named;
  std::vector<std::vector<int>> in_named, out_named;
  std::vector<std::vector<Shape>> in_shapes, out_shapes;  // [bucket][io]
  std::vector<std::vector<std::int64_t>> bucket_named;    // [bucket][named index]
  bool has_named = false;

  ~Impl() {
    // Executables may be referenced by queued tasks: drain the streams first.
    if (group) {
      for (int r : group->ranks()) group->stream(r).synchronize();
    }
  }
};

namespace wrapper_detail {


inline std::string prefix(const std::string& tag) { return "[" + tag + "] "; }

/// Marks a call that reads a wrapper's loaded state (forward(), graph_text(), ...) as in flight
/// for its scope, so that load() refuses to replace that state meanwhile; throws StateError when
/// a load() is replacing it now. Both sides use sequentially consistent operations: either the
/// call sees the load, or the load sees the call.
class CallGuard {
 public:
  CallGuard(std::atomic<int>& in_flight, const std::atomic<bool>& loading, const std::string& tag, const char* call)
      : in_flight_(in_flight) {
    in_flight_.fetch_add(1);
    if (loading.load()) {
      in_flight_.fetch_sub(1);
      throw StateError(prefix(tag) + call + " called while load() replaces the loaded artifact in another thread: "
                       "wait for load() to return");
    }
  }
  ~CallGuard() { in_flight_.fetch_sub(1); }
  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;

 private:
  std::atomic<int>& in_flight_;
};

inline Shape sample_shape(const Shape& s) {
  return Shape(std::vector<std::int64_t>(s.dims().begin() + 1, s.dims().end()));
}

inline Shape with_batch(const Shape& sample, std::int64_t batch) {
  Shape s;
  detail::set_with_batch(s, sample, batch);
  return s;
}

inline std::string join(const std::vector<std::string>& xs, std::size_t max_items = 20) {
  std::string s;
  for (std::size_t i = 0; i < xs.size() && i < max_items; ++i) s += (i ? ", " : "") + xs[i];
  if (xs.size() > max_items) s += ", ... (" + std::to_string(xs.size() - max_items) + " more)";
  return s;
}

}  // namespace wrapper_detail
}  // namespace devpipe

// The world of this process: threads, or one rank per MPI process (devpipe/world.h).
#include "devpipe/world.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#include "core/log.h"
#include "devpipe/error.h"
#include "runtime/mpi.h"
#include "runtime/rank_group.h"

namespace devpipe {

const char* transport_name(Transport t) {
  switch (t) {
    case Transport::Threads:
      return "threads";
    case Transport::Mpi:
      return "mpi";
  }
  return "?";
}

World::World(Transport transport, int num_processes, int process, double collective_timeout_s,
             int local_processes)
    : transport_(transport),
      num_processes_(num_processes),
      process_(process),
      collective_timeout_s_(collective_timeout_s),
      local_processes_(local_processes),
      groups_(std::make_shared<RankGroups>()) {
  if (local_processes < 1 || local_processes > num_processes) {
    throw InvalidArgument("World: " + std::to_string(local_processes) +
                          " processes on this machine of " + std::to_string(num_processes) +
                          " in all");
  }
  if (num_processes < 1 || process < 0 || process >= num_processes) {
    throw InvalidArgument("World: process " + std::to_string(process) + " of " +
                          std::to_string(num_processes) + " is out of range");
  }
  if (transport == Transport::Threads && num_processes != 1) {
    throw InvalidArgument("World: thread mode has one process, got " +
                          std::to_string(num_processes));
  }
  if (!(collective_timeout_s > 0)) {
    throw InvalidArgument("World: the collective timeout must be > 0 seconds, got " +
                          std::to_string(collective_timeout_s));
  }
}

namespace {

double timeout_from_env() {
  constexpr double kDefault = 300;
  const char* v = std::getenv("DEVPIPE_COLLECTIVE_TIMEOUT_S");
  if (!v || !*v) return kDefault;
  char* end = nullptr;
  double t = std::strtod(v, &end);
  if (end && *end == '\0' && t > 0 && t <= 1e6) return t;
  throw ConfigError("DEVPIPE_COLLECTIVE_TIMEOUT_S='" + std::string(v) +
                    "' is not a number of seconds in (0, 1e6]");
}

World detect() {
  const double timeout = timeout_from_env();
  const char* forced = std::getenv("DEVPIPE_WORLD");
  const std::string mode = forced ? forced : "";
  if (!mode.empty() && mode != "threads" && mode != "mpi") {
    throw ConfigError("DEVPIPE_WORLD='" + mode + "': expected 'threads' or 'mpi'");
  }
  const int launched = mpi::launcher_world_size();
  if (mode == "threads") return World(Transport::Threads, 1, 0, timeout);
  if (mode == "mpi" || launched > 1) {
    if (!mpi::built_with_mpi()) {
      if (mode == "mpi") {
        throw ConfigError(
            "DEVPIPE_WORLD=mpi, but devpipe was built without MPI (install libopenmpi-dev and "
            "reconfigure)");
      }
      log::warn(
          "started by an MPI launcher with " + std::to_string(launched) +
          " processes, but devpipe was built without MPI: every process runs all ranks as threads");
      return World(Transport::Threads, 1, 0, timeout);
    }
    auto [rank, size] = mpi::init(timeout);
    if (size > 1) return World(Transport::Mpi, size, rank, timeout, mpi::local_size());
  }
  return World(Transport::Threads, 1, 0, timeout);
}

}  // namespace

const World& World::get() {
  static const World world = detect();
  return world;
}

std::vector<int> World::local_ranks(int tp_degree) const {
  if (tp_degree < 1)
    throw InvalidArgument("tp_degree must be >= 1, got " + std::to_string(tp_degree));
  std::vector<int> ranks;
  if (transport_ == Transport::Threads) {
    for (int r = 0; r < tp_degree; ++r) ranks.push_back(r);
  } else if (tp_degree == 1) {
    ranks.push_back(0);
  } else if (tp_degree % num_processes_ == 0) {
    const int k = tp_degree / num_processes_;  // a group of k consecutive ranks per process
    for (int r = process_ * k; r < (process_ + 1) * k; ++r) ranks.push_back(r);
  } else {
    throw ConfigError("tp_degree " + std::to_string(tp_degree) + " under " + std::to_string(num_processes_) +
                      " MPI processes: with ranks as processes a stage's tp_degree must be a multiple of the "
                      "number of processes (" +
                      std::to_string(num_processes_) +
                      ") or 1 (run in every process); launch with another -np or run as threads "
                      "(DEVPIPE_WORLD=threads)");
  }
  return ranks;
}

Device World::device_of_rank(DeviceKind kind, int rank, int tp_degree, int device_count) {
  if (tp_degree < 1 || rank < 0 || rank >= tp_degree) {
    throw InvalidArgument("rank " + std::to_string(rank) + " of tp_degree " + std::to_string(tp_degree) +
                          " on " + std::string(device_kind_name(kind)) + " is out of range");
  }
  if (device_count < 1) {
    throw InvalidArgument("rank " + std::to_string(rank) + " of tp_degree " + std::to_string(tp_degree) +
                          " needs a " + std::string(device_kind_name(kind)) + " device, but this process sees " +
                          std::to_string(device_count));
  }
  return Device{kind, rank % device_count};
}

std::vector<Device> World::local_devices(DeviceKind kind, int tp_degree, int device_count) const {
  std::vector<Device> devices;
  for (int r : local_ranks(tp_degree)) devices.push_back(device_of_rank(kind, r, tp_degree, device_count));
  return devices;
}

Tensor World::broadcast_from_process0(const Tensor& t) const {
  auto undefined = [] {
    return InvalidArgument("broadcast_from_process0: process 0 passed an undefined tensor");
  };
  if (!multi_process()) {
    if (!t.defined()) throw undefined();
    return t;
  }
  // Process 0 says what it sends ("<dtype> <dims...>", or "-" for nothing), then the bytes.
  Tensor src;
  std::string header = "-";
  if (process_ == 0 && t.defined()) {
    src = t.to_host();
    header = std::string(dtype_name(src.dtype()));
    for (std::int64_t d : src.shape().dims()) header += " " + std::to_string(d);
  }
  const std::vector<std::string> all = mpi::all_gather_text(process_ == 0 ? header : std::string(), collective_timeout_s_);
  const std::string& head = all.at(0);
  if (head == "-") throw undefined();
  std::istringstream in(head);
  std::string dt;
  in >> dt;
  std::vector<std::int64_t> dims;
  for (std::int64_t d; in >> d;) dims.push_back(d);
  Tensor out = process_ == 0 ? src : Tensor::empty(Shape(dims), dtype_from_name(dt));
  mpi::broadcast_from_process0(out.raw_data(), out.nbytes(), collective_timeout_s_);
  return out;
}

std::string World::describe() const {
  if (transport_ == Transport::Threads) return "threads (1 process)";
  return "mpi: process " + std::to_string(process_) + " of " + std::to_string(num_processes_);
}

}  // namespace devpipe

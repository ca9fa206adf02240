#include "runtime/rank_group.h"

#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "core/log.h"
#include "devpipe/world.h"
#include "runtime/mpi.h"

namespace devpipe {

RankGroup::RankGroup(DeviceKind kind, int tp_degree) : kind_(kind) {
  const World& world = World::get();
  ranks_ = world.local_ranks(tp_degree);
  streams_.resize(static_cast<std::size_t>(tp_degree));
  for (int r : ranks_)
    streams_[static_cast<std::size_t>(r)] =
        std::make_unique<RankStream>("rank" + std::to_string(r));
  comm_ = world.multi_process() && tp_degree > 1
              ? mpi::make_communicator(kind, tp_degree, world.collective_timeout_s())
              : make_local_communicator(tp_degree);
}

int default_num_threads() {
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (!env || !*env) return cores;
  // OpenMP's syntax: a list of positive integers, one per nesting level; the first applies.
  char* end = nullptr;
  errno = 0;
  long n = std::strtol(env, &end, 10);
  while (end && (*end == ' ' || *end == '\t')) ++end;
  if (errno == 0 && end != env && n >= 1 && n <= RuntimeConfig::kMaxThreads && (*end == '\0' || *end == ',')) {
    return static_cast<int>(n);
  }
  static std::once_flag warned;
  std::call_once(warned, [&] {
    log::warn("OMP_NUM_THREADS='" + std::string(env) + "' is not a thread count in [1, " +
              std::to_string(RuntimeConfig::kMaxThreads) + "]; using the " + std::to_string(cores) + " cores");
  });
  return cores;
}

int threads_per_rank(const RuntimeConfig& config) {
  int total = config.num_threads > 0 ? config.num_threads : default_num_threads();
  const World& world = World::get();
  if (world.multi_process()) {
    // The machine's threads are shared by the world's processes on it, each running its ranks.
    const int ranks_here =
        world.local_processes() * static_cast<int>(world.local_ranks(config.tp_degree).size());
    return std::max(1, total / ranks_here);
  }
  return std::max(1, total / config.tp_degree);
}

std::shared_ptr<RankGroup> RankGroup::get(DeviceKind kind, int tp_degree) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::weak_ptr<RankGroup>> groups;
  std::lock_guard lock(mu);
  auto key = std::make_pair(static_cast<int>(kind), tp_degree);
  if (auto g = groups[key].lock()) return g;
  auto g = std::make_shared<RankGroup>(kind, tp_degree);
  groups[key] = g;
  return g;
}

void RankGroup::submit(void (*fn)(void* context, int rank), void* context) {
  std::lock_guard lock(submit_mu_);
  for (int r : ranks_) stream(r).enqueue(StreamTask{fn, context, r});
}

void RankGroup::mark_failed() {
  failed_ = true;
  comm_->abort();
}

void RankGroup::recover_if_failed() {
  if (!failed_) return;
  for (auto& s : streams_) {
    if (s) s->synchronize();
  }
  comm_->reset();
  failed_ = false;
}

}  // namespace devpipe

#include "runtime/rank_group.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "core/log.h"
#include "devpipe/error.h"
#include "devpipe/world.h"
#include "runtime/mpi.h"

namespace devpipe {

RankGroup::RankGroup(const World& world, Backend& backend, int tp_degree)
    : kind_(backend.kind()), backend_(backend) {
  ranks_ = world.local_ranks(tp_degree);
  devices_ = world.local_devices(kind_, tp_degree, backend.device_count());
  comm_ = world.multi_process() && tp_degree > 1
              ? mpi::make_communicator(kind_, tp_degree, world.collective_timeout_s())
              : make_local_communicator(tp_degree);
  collectives_ = backend.make_collectives(GroupPlacement{&world, tp_degree, ranks_, devices_});
  resources_.resize(ranks_.size());
  streams_.resize(static_cast<std::size_t>(tp_degree));
  for (int r : ranks_)
    streams_[static_cast<std::size_t>(r)] =
        std::make_unique<RankStream>("rank" + std::to_string(r));
}

RankGroup::~RankGroup() {
  // The streams' tasks may use the communicator, the collectives and the ranks' resources:
  // finish and stop them first.
  for (auto& s : streams_) {
    if (s) s->synchronize();
  }
  streams_.clear();
}

RankInfo RankGroup::rank_info(int rank, int num_threads) {
  const auto it = std::find(ranks_.begin(), ranks_.end(), rank);
  if (it == ranks_.end()) {
    throw InvalidArgument("RankGroup::rank_info: rank " + std::to_string(rank) + " of tp_degree " +
                          std::to_string(size()) + " is not one this process runs");
  }
  const auto i = static_cast<std::size_t>(it - ranks_.begin());
  std::lock_guard lock(resources_mu_);
  // A backend that keeps nothing (null) is simply asked again.
  if (!resources_[i]) resources_[i] = backend_.make_rank_resources(rank, devices_[i]);
  return RankInfo{rank, size(), comm_.get(), num_threads, collectives_.get(), resources_[i]};
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
  const World& world = World::get();
  return world.rank_groups().get(world, backend_for(kind), tp_degree);
}

std::shared_ptr<RankGroup> RankGroups::get(const World& world, Backend& backend, int tp_degree) {
  if (&world.rank_groups() != this) {
    throw StateError("RankGroups::get: the world " + world.describe() + " owns another registry");
  }
  std::lock_guard lock(mu_);
  for (auto it = groups_.begin(); it != groups_.end();) {
    it = it->second.expired() ? groups_.erase(it) : std::next(it);
  }
  const auto key = std::make_pair(backend.kind(), tp_degree);
  if (auto g = groups_[key].lock()) {
    if (&g->backend() != &backend) {
      throw StateError("RankGroups::get: the " + std::string(device_kind_name(backend.kind())) +
                       " group of tp_degree " + std::to_string(tp_degree) + " belongs to another backend");
    }
    return g;
  }
  auto g = std::make_shared<RankGroup>(world, backend, tp_degree);
  groups_[key] = g;
  return g;
}

std::size_t RankGroups::live() const {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& [key, g] : groups_) n += g.expired() ? 0 : 1;
  return n;
}

void RankGroup::submit(void (*fn)(void* context, int rank), void* context, int only, bool on_caller) {
  const int here = only >= 0 ? only : ranks_.front();  // the rank the caller may run
  // A task for one rank alone goes through that stream's own lock, which orders it against every
  // other submission to the stream; no other stream gets a task whose order against it matters.
  std::unique_lock lock(submit_mu_, std::defer_lock);
  if (only < 0) {
    lock.lock();
    for (int r : ranks_) {
      if (r != here) stream(r).enqueue(StreamTask{fn, context, r});
    }
  }
  // Claimed under the lock: a later submission queues behind this task on every stream.
  const bool claimed = on_caller && stream(here).claim_if_idle();
  if (!claimed) stream(here).enqueue(StreamTask{fn, context, here});
  if (lock.owns_lock()) lock.unlock();
  if (claimed) {
    fn(context, here);
    stream(here).end_claim();
  }
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

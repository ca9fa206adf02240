#include "runtime/rank_group.h"

#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace devpipe {

RankGroup::RankGroup(DeviceKind kind, int tp_degree) : kind_(kind), comm_(make_local_communicator(tp_degree)) {
  for (int r = 0; r < tp_degree; ++r) {
    streams_.push_back(std::make_unique<RankStream>("rank" + std::to_string(r)));
  }
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads_per_rank_ = std::max(1, cores / tp_degree);
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
  for (int r = 0; r < size(); ++r) stream(r).enqueue(StreamTask{fn, context, r});
}

void RankGroup::mark_failed() {
  failed_ = true;
  comm_->abort();
}

void RankGroup::recover_if_failed() {
  if (!failed_) return;
  for (auto& s : streams_) s->synchronize();
  comm_->reset();
  failed_ = false;
}

}  // namespace devpipe

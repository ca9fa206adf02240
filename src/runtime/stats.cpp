#include "runtime/stats.h"

#include <algorithm>
#include <mutex>
#include <vector>

namespace devpipe {

TransferStats& TransferStats::operator+=(const TransferStats& o) {
  host_to_device_bytes += o.host_to_device_bytes;
  device_to_host_bytes += o.device_to_host_bytes;
  device_to_device_bytes += o.device_to_device_bytes;
  ranked_inputs_in_place += o.ranked_inputs_in_place;
  ranked_inputs_copied += o.ranked_inputs_copied;
  host_inputs_in_place += o.host_inputs_in_place;
  forwards += o.forwards;
  return *this;
}

namespace stats {
namespace {

struct Registry {
  std::mutex mu;
  std::vector<Shard*> live;                 // every counting thread's shard
  std::uint64_t retired[kNumCounters] = {};  // the counts of threads that ended
  std::uint64_t base[kNumCounters] = {};     // the total at the last reset
};

Registry& registry() {
  static Registry* r = new Registry();  // outlives static destruction: threads may count late
  return *r;
}

/// Owns a thread's shard: unregisters it when the thread ends, keeping its counts.
struct Owner {
  Shard shard;
  Owner() {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    r.live.push_back(&shard);
  }
  ~Owner() {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    for (int c = 0; c < kNumCounters; ++c) r.retired[c] += shard.value[c].load(std::memory_order_relaxed);
    r.live.erase(std::find(r.live.begin(), r.live.end(), &shard));
    t_shard = nullptr;
    t_dead = true;  // a count during the rest of this thread's exit goes to `retired`
  }
  static inline thread_local bool t_dead = false;
};

/// The sum over every thread, past and present (registry's mutex held).
void total(Registry& r, std::uint64_t out[kNumCounters]) {
  for (int c = 0; c < kNumCounters; ++c) out[c] = r.retired[c];
  for (const Shard* s : r.live) {
    for (int c = 0; c < kNumCounters; ++c) out[c] += s->value[c].load(std::memory_order_relaxed);
  }
}

}  // namespace

void add_slow(Counter c, std::uint64_t n) {
  if (Owner::t_dead) {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    r.retired[c] += n;
    return;
  }
  thread_local Owner owner;
  t_shard = &owner.shard;
  add(c, n);
}

}  // namespace stats

TransferStats transfer_stats() {
  stats::Registry& r = stats::registry();
  std::uint64_t v[stats::kNumCounters];
  {
    std::lock_guard lock(r.mu);
    stats::total(r, v);
    for (int c = 0; c < stats::kNumCounters; ++c) v[c] -= r.base[c];
  }
  TransferStats s;
  s.host_to_device_bytes = v[stats::kH2d];
  s.device_to_host_bytes = v[stats::kD2h];
  s.device_to_device_bytes = v[stats::kD2d];
  s.ranked_inputs_in_place = v[stats::kInPlace];
  s.ranked_inputs_copied = v[stats::kCopied];
  s.host_inputs_in_place = v[stats::kHostInPlace];
  s.forwards = v[stats::kForwards];
  return s;
}

void reset_transfer_stats() {
  stats::Registry& r = stats::registry();
  std::lock_guard lock(r.mu);
  stats::total(r, r.base);
}

}  // namespace devpipe

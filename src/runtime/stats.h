// Internal: the counters behind devpipe/stats.h.
//
// Sharded by thread: each thread that counts gets its own counters, which only it writes (a
// relaxed load and store, no locked instruction on the hot path), registered in a list that
// transfer_stats() sums under a mutex. A thread's counts are kept when it ends (folded into a
// retired total). reset_transfer_stats() records the current values as a baseline rather than
// writing other threads' counters, so it races with no counting thread.
#pragma once

#include <atomic>
#include <cstdint>

#include "devpipe/stats.h"

namespace devpipe::stats {

enum Counter : int { kH2d, kD2h, kD2d, kInPlace, kCopied, kHostInPlace, kForwards, kNumCounters };

/// One thread's counters.
struct Shard {
  std::atomic<std::uint64_t> value[kNumCounters] = {};
};

/// add() without a shard yet: registers the calling thread's and counts there, or, once the
/// thread's shard has gone (a count during its exit), counts in the retired total.
void add_slow(Counter c, std::uint64_t n);

inline thread_local Shard* t_shard = nullptr;  // trivially destructible: the fast path's check

/// Adds `n` to the calling thread's counter `c`.
inline void add(Counter c, std::uint64_t n = 1) {
  Shard* s = t_shard;
  if (!s) return add_slow(c, n);
  std::atomic<std::uint64_t>& v = s->value[c];
  v.store(v.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

}  // namespace devpipe::stats

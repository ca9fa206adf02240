#include "backends/cpu/work_pool.h"

#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace devpipe::cpu {

namespace {

/// How long an idle thread spins before it sleeps (a worker) or yields (the caller waiting for
/// claimed tasks).
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

/// Spins until pred() or kSpin passes; returns pred().
template <class Pred>
bool spin_until(Pred&& pred) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return pred();
  }
}

}  // namespace

WorkPool::WorkPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

WorkPool::~WorkPool() {
  stop_.store(true, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void WorkPool::work(std::uint32_t gen, int thread) {
  std::uint64_t u = unclaimed_.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<std::uint32_t>(u >> 32) != gen) return;
    const auto left = static_cast<std::uint32_t>(u);
    if (left == 0) return;
    if (!unclaimed_.compare_exchange_weak(u, u - 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire)) {
      continue;
    }
    // Claimed task left - 1 of this generation: the run is still waiting for it, so fn_ and
    // ctx_ are this generation's.
    fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), left - 1, thread);
    done_.fetch_add(1, std::memory_order_release);
    u = unclaimed_.load(std::memory_order_acquire);
  }
}

void WorkPool::worker_loop(int thread) {
  std::uint32_t seen = 0;
  for (;;) {
    std::uint32_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      spin_until([&] { return (g = generation_.load(std::memory_order_acquire)) != seen; });
    }
    if (g == seen) {
      generation_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = g;
    if (stop_.load(std::memory_order_relaxed)) return;
    work(g, thread);
  }
}

void WorkPool::run_tasks(std::int64_t tasks, TaskFn fn, void* ctx) {
  const std::uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  unclaimed_.store((static_cast<std::uint64_t>(gen) << 32) | static_cast<std::uint64_t>(tasks),
                   std::memory_order_release);
  generation_.store(gen, std::memory_order_release);
  generation_.notify_all();
  work(gen, 0);
  auto all_done = [&] { return done_.load(std::memory_order_acquire) == tasks; };
  while (!spin_until(all_done)) std::this_thread::yield();  // a claimed task runs elsewhere
  busy_.store(false, std::memory_order_release);
}

}  // namespace devpipe::cpu

#include "backends/cpu/work_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace devpipe::cpu {

namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

/// Spins until pred() or `limit` passes; returns pred().
template <class Pred>
bool spin_until(std::chrono::nanoseconds limit, Pred&& pred) {
  const auto until = Clock::now() + limit;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (Clock::now() >= until) return pred();
  }
}

/// The caller waiting for tasks claimed by others spins this long, then yields.
constexpr std::chrono::nanoseconds kCallerSpin = WorkPool::kMinSpin;

}  // namespace

HelpBoard* rank_help_board(const RankInfo& rank) {
  const char* v = std::getenv("DEVPIPE_RANK_HELP");
  if (rank.tp_degree <= 1 || rank.comm == nullptr || (v != nullptr && std::strcmp(v, "0") == 0)) return nullptr;
  return rank.comm->help_board();
}

WorkPool::WorkPool(int threads, std::chrono::microseconds max_spin)
    : spin_ns_(std::chrono::nanoseconds(kMinSpin).count()),
      max_spin_ns_(std::chrono::nanoseconds(std::max(max_spin, kMinSpin)).count()) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

WorkPool::~WorkPool() {
  stop_.store(true, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

bool WorkPool::work_one(std::uint32_t gen, int thread) {
  std::uint64_t u = unclaimed_.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<std::uint32_t>(u >> 32) != gen) return false;
    const auto left = static_cast<std::uint32_t>(u);
    if (left == 0) return false;
    if (unclaimed_.compare_exchange_weak(u, u - 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      break;
    }
  }
  // Claimed task left - 1 of this generation: the run is still waiting for it, so fn_ and ctx_
  // are this generation's.
  const auto task = static_cast<std::uint32_t>(u) - 1;
  fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), task, thread);
  done_.fetch_add(1, std::memory_order_release);
  return true;
}

void WorkPool::worker_loop(int thread) {
  std::uint32_t seen = 0;
  for (;;) {
    std::uint32_t g = generation_.load(std::memory_order_acquire);
    if (g == seen) {
      const std::uint32_t parks = parks_.load(std::memory_order_relaxed);
      spin_until(std::chrono::nanoseconds(spin_ns_.load(std::memory_order_relaxed)), [&] {
        return (g = generation_.load(std::memory_order_acquire)) != seen ||
               parks_.load(std::memory_order_relaxed) != parks;
      });
    }
    if (g == seen) {
      sleeps_.fetch_add(1, std::memory_order_relaxed);
      generation_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = g;
    if (stop_.load(std::memory_order_relaxed)) return;
    work(g, thread);
  }
}

/// A shared run's tasks as a HelpBoard job: helper `slot` runs tasks as thread threads() + slot.
class WorkPool::Helped final : public HelpJob {
 public:
  Helped(WorkPool& pool, std::uint32_t gen) : pool_(pool), gen_(gen) {}
  bool help(int slot) override { return pool_.work_one(gen_, pool_.threads() + slot); }

 private:
  WorkPool& pool_;
  std::uint32_t gen_;
};

void WorkPool::run_tasks(std::int64_t tasks, TaskFn fn, void* ctx, HelpBoard* board, int rank) {
  // How long the workers spin after this run: 1.5 times the longest recent gap between runs
  // that spinning could have bridged (it decays by 1/16 a run); a longer gap (the pool idle)
  // forgets them.
  const std::int64_t start = now_ns();
  if (last_end_ns_ != 0) {
    const std::int64_t gap = start - last_end_ns_;
    longest_gap_ns_ = gap > max_spin_ns_ ? 0 : std::max(gap, longest_gap_ns_ - longest_gap_ns_ / 16);
    const std::int64_t min_ns = std::chrono::nanoseconds(kMinSpin).count();
    spin_ns_.store(std::clamp(longest_gap_ns_ * 3 / 2, min_ns, max_spin_ns_),
                   std::memory_order_relaxed);
  }
  const std::uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  unclaimed_.store((static_cast<std::uint64_t>(gen) << 32) | static_cast<std::uint64_t>(tasks),
                   std::memory_order_release);
  generation_.store(gen, std::memory_order_release);
  if (!workers_.empty()) generation_.notify_all();
  Helped job(*this, gen);
  // Posted to the board, if any, and withdrawn however this scope ends: no helper is inside the
  // job after, nor starts a task of it.
  struct Posted {
    HelpBoard* board;
    int rank;
    ~Posted() {
      if (board != nullptr) board->withdraw(rank);
    }
  } posted{board, rank};
  if (board != nullptr) board->post(rank, &job);
  work(gen, 0);
  auto all_done = [&] { return done_.load(std::memory_order_acquire) == tasks; };
  while (!spin_until(kCallerSpin, all_done)) std::this_thread::yield();  // claimed elsewhere
  last_end_ns_ = now_ns();
  busy_.store(false, std::memory_order_release);
}

}  // namespace devpipe::cpu

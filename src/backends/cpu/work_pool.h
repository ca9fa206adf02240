// Internal (cpu backend): a small team of threads for the hand-written decode kernels.
//
// OpenMP's parallel regions end in a barrier: on a machine whose cores other processes share,
// a thread of the team that is not running stalls the region until the scheduler gives it a
// time slice back, and a decode step has hundreds of regions. Here the tasks of a parallel
// run are claimed one by one from a counter by whichever threads are running, the caller
// included: a descheduled worker simply claims nothing, and the caller only ever waits for
// tasks already claimed. Idle workers spin, then sleep on the counter's futex: they spin for
// 1.5 times the longest recent gap between runs that was under max_spin (at least 50 us, at
// most max_spin, 500 us by default), so that back-to-back work (the kernels of a step, the
// stages and forwards of a pipeline run back to back) finds them awake (waking a sleeping one
// costs tens to hundreds of microseconds, most on a virtual machine's idle vCPU), and an idle
// pool spins only 50 us after each run.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

#include "runtime/backend.h"
#include "runtime/communicator.h"

namespace devpipe::cpu {

/// The board on which a kernel built now for `rank` opens its tasks to the rank's peers
/// (WorkPool::run_shared): its communicator's at tp > 1 (null when the ranks are not threads of
/// one process), and null when DEVPIPE_RANK_HELP is 0 (read at each call; kernels call this when
/// built, at load).
HelpBoard* rank_help_board(const RankInfo& rank);

class WorkPool {
 public:
  static constexpr std::chrono::microseconds kMinSpin{50};
  static constexpr std::chrono::microseconds kDefaultMaxSpin{500};

  /// A pool of `threads` threads in all: the caller of run() and threads - 1 workers, which
  /// spin at most `max_spin` between runs (at least kMinSpin).
  explicit WorkPool(int threads, std::chrono::microseconds max_spin = kDefaultMaxSpin);
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  /// Sends the workers spinning for the next run to sleep now: the caller is about to use the
  /// cores otherwise (an OpenMP region, whose threads would take turns with spinning workers).
  void park() { parks_.fetch_add(1, std::memory_order_relaxed); }

  /// How long idle workers spin now before they sleep (from the gaps between the last runs).
  std::chrono::nanoseconds spin() const {
    return std::chrono::nanoseconds(spin_ns_.load(std::memory_order_relaxed));
  }
  /// How many times a worker has gone to sleep (tests).
  std::int64_t sleeps() const { return sleeps_.load(std::memory_order_relaxed); }

  /// Runs body(i) for every i in [0, tasks), each once, over the caller and the workers, and
  /// returns when all have run. No heap allocation. A body taking (i, thread) also gets the
  /// index of the thread running it, in [0, threads()) (the caller is 0): per-thread scratch
  /// for tasks that need some. The pool may be shared (the executables of one rank): a run
  /// from a thread that finds another thread's run in progress runs all its tasks on its
  /// caller, as thread 0 (not from inside a task: that thread 0 would be the other run's).
  template <class Body>
  void run(std::int64_t tasks, Body&& body) {
    run_shared(tasks, body, nullptr, 0);
  }

  /// Like run(), with the tasks also open on `board` (when not null) to the peers of rank
  /// `rank` (HelpBoard, runtime/communicator.h): a peer waiting in a collective runs some of
  /// them, as thread threads() + its helper slot, so a body taking (i, thread) must have
  /// scratch for threads() + board->helpers() threads. Each run takes the board's lock twice:
  /// for tasks of tens of microseconds or more (a conv band), whose results do not depend on
  /// which thread ran which task.
  template <class Body>
  void run_shared(std::int64_t tasks, Body&& body, HelpBoard* board, int rank) {
    using B = std::remove_reference_t<Body>;
    if (board != nullptr && board->helpers() == 0) board = nullptr;
    if (tasks <= 1 || (workers_.empty() && board == nullptr) || busy_.exchange(true, std::memory_order_acquire)) {
      for (std::int64_t i = 0; i < tasks; ++i) call(body, i, 0);
      return;
    }
    run_tasks(
        tasks, [](void* b, std::int64_t i, int thread) { call(*static_cast<B*>(b), i, thread); },
        const_cast<void*>(static_cast<const void*>(&body)), board, rank);
  }

 private:
  using TaskFn = void (*)(void*, std::int64_t, int);
  class Helped;
  template <class Body>
  static void call(Body& body, std::int64_t i, int thread) {
    if constexpr (std::is_invocable_v<Body&, std::int64_t, int>) {
      body(i, thread);
    } else {
      body(i);
    }
  }
  void run_tasks(std::int64_t tasks, TaskFn fn, void* ctx, HelpBoard* board, int rank);
  /// Claims and runs one task of generation `gen` as thread `thread`; false when none is left.
  bool work_one(std::uint32_t gen, int thread);
  /// Claims and runs tasks of generation `gen` until none is left, as thread `thread`.
  void work(std::uint32_t gen, int thread) {
    while (work_one(gen, thread)) {
    }
  }
  void worker_loop(int thread);

  std::vector<std::thread> workers_;
  /// Bumped once per run (and once to stop); workers wait on it.
  alignas(64) std::atomic<std::uint32_t> generation_{0};
  /// (generation << 32) | tasks not yet claimed; a task is claimed by a compare-exchange that
  /// also checks the generation, so a late worker never claims from the next run.
  alignas(64) std::atomic<std::uint64_t> unclaimed_{0};
  alignas(64) std::atomic<std::int64_t> done_{0};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<bool> stop_{false};
  /// Set while a run uses the workers (run_tasks clears it).
  std::atomic<bool> busy_{false};
  /// Bumped by park(); a spinning worker that sees it change sleeps.
  std::atomic<std::uint32_t> parks_{0};
  /// How long idle workers spin (ns), set by run_tasks.
  std::atomic<std::int64_t> spin_ns_;
  std::atomic<std::int64_t> sleeps_{0};
  // The caller's (under busy_): the longest spin a run may set, when the last run ended (steady
  // clock ns, 0 before the first) and the longest recent gap between runs under max_spin.
  std::int64_t max_spin_ns_;
  std::int64_t last_end_ns_ = 0;
  std::int64_t longest_gap_ns_ = 0;
};

}  // namespace devpipe::cpu

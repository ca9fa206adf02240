// Internal (cpu backend): a small team of threads for the hand-written decode kernels.
//
// OpenMP's parallel regions end in a barrier: on a machine whose cores other processes share,
// a thread of the team that is not running stalls the region until the scheduler gives it a
// time slice back, and a decode step has hundreds of regions. Here the tasks of a parallel
// run are claimed one by one from a counter by whichever threads are running, the caller
// included: a descheduled worker simply claims nothing, and the caller only ever waits for
// tasks already claimed. Idle workers spin briefly (the next kernel of a step usually follows
// within microseconds), then sleep on the counter's futex.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace devpipe::cpu {

class WorkPool {
 public:
  /// A pool of `threads` threads in all: the caller of run() and threads - 1 workers.
  explicit WorkPool(int threads);
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  /// Runs body(i) for every i in [0, tasks), each once, over the caller and the workers, and
  /// returns when all have run. No heap allocation. A body taking (i, thread) also gets the
  /// index of the thread running it, in [0, threads()) (the caller is 0): per-thread scratch
  /// for tasks that need some. The pool may be shared (the executables of one rank): a run
  /// from a thread that finds another thread's run in progress runs all its tasks on its
  /// caller, as thread 0 (not from inside a task: that thread 0 would be the other run's).
  template <class Body>
  void run(std::int64_t tasks, Body&& body) {
    using B = std::remove_reference_t<Body>;
    if (tasks <= 1 || workers_.empty() || busy_.exchange(true, std::memory_order_acquire)) {
      for (std::int64_t i = 0; i < tasks; ++i) call(body, i, 0);
      return;
    }
    run_tasks(
        tasks, [](void* b, std::int64_t i, int thread) { call(*static_cast<B*>(b), i, thread); },
        const_cast<void*>(static_cast<const void*>(&body)));
  }

 private:
  using TaskFn = void (*)(void*, std::int64_t, int);
  template <class Body>
  static void call(Body& body, std::int64_t i, int thread) {
    if constexpr (std::is_invocable_v<Body&, std::int64_t, int>) {
      body(i, thread);
    } else {
      body(i);
    }
  }
  void run_tasks(std::int64_t tasks, TaskFn fn, void* ctx);
  /// Claims and runs tasks of generation `gen` until none is left, as thread `thread`.
  void work(std::uint32_t gen, int thread);
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
};

}  // namespace devpipe::cpu

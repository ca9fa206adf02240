// The cpu backend's work pool (src/backends/cpu/work_pool.h), on its own so that it also runs
// under ThreadSanitizer (scripts/sanitize.sh; test_cpu_backend replaces operator new and cannot
// link there): every task of every run runs exactly once, and what the tasks write with plain
// stores is visible to the caller when run() returns (TSan reports a race if the pool's
// completion does not order them).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "backends/cpu/work_pool.h"
#include "runtime/communicator.h"

namespace devpipe {
namespace {

// On 1 to 3 threads, task counts below, at and above the thread count, back to back (workers
// still spinning) and after a pause long enough for them to sleep; the caller takes part (one
// thread: all on it).
TEST(WorkPool, RunsEveryTaskOnceAndPublishesItsWrites) {
  for (int threads : {1, 2, 3}) {
    cpu::WorkPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    std::vector<int> ran(64);          // plain ints: run() must order the tasks' stores
    std::vector<std::int64_t> value(64);
    const std::thread::id caller = std::this_thread::get_id();
    for (int rep = 0; rep < 300; ++rep) {
      const std::int64_t tasks = rep % 64;
      for (std::size_t i = 0; i < ran.size(); ++i) ran[i] = 0;
      std::atomic<int> on_caller{0};
      pool.run(tasks, [&](std::int64_t i) {
        ++ran[static_cast<std::size_t>(i)];
        value[static_cast<std::size_t>(i)] = rep * 1000 + i;
        if (std::this_thread::get_id() == caller) on_caller.fetch_add(1);
      });
      for (std::int64_t i = 0; i < 64; ++i) {
        ASSERT_EQ(ran[static_cast<std::size_t>(i)], i < tasks ? 1 : 0)
            << threads << " threads, run " << rep << ", task " << i << " of " << tasks;
        if (i < tasks) ASSERT_EQ(value[static_cast<std::size_t>(i)], rep * 1000 + i);
      }
      if (threads == 1) EXPECT_EQ(on_caller.load(), tasks);
      if (rep % 100 == 99) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
}

// A body taking (task, thread) gets the index of the thread running it: the caller is 0, the
// index is in [0, threads()), and one index always names the same thread (per-thread scratch).
TEST(WorkPool, GivesEachTaskItsThreadIndex) {
  for (int threads : {1, 2, 3}) {
    cpu::WorkPool pool(threads);
    std::vector<std::thread::id> owner(static_cast<std::size_t>(threads));
    std::vector<int> index(256, -1);
    std::vector<std::thread::id> ran_on(256);
    const std::thread::id caller = std::this_thread::get_id();
    for (int rep = 0; rep < 50; ++rep) {
      pool.run(256, [&](std::int64_t i, int thread) {
        index[static_cast<std::size_t>(i)] = thread;
        ran_on[static_cast<std::size_t>(i)] = std::this_thread::get_id();
      });
      for (std::size_t i = 0; i < index.size(); ++i) {
        const int t = index[i];
        ASSERT_TRUE(t >= 0 && t < threads)
            << "task " << i << " got thread " << t << " of " << threads;
        if (t == 0) ASSERT_EQ(ran_on[i], caller) << "task " << i;
        auto& o = owner[static_cast<std::size_t>(t)];
        if (o == std::thread::id()) o = ran_on[i];
        ASSERT_EQ(o, ran_on[i]) << "thread index " << t << " named two threads (task " << i << ")";
      }
    }
  }
}

// A pool shared by two threads (the executables of one rank, CpuRankResources in executor.h): a run
// that starts while another thread's run holds the workers runs every one of its tasks on its
// own caller, as thread 0, and returns without waiting for the other; the other's tasks are
// unaffected, and the pool takes part in later runs again.
TEST(WorkPool, RunFromAnotherThreadDuringARunRunsOnItsCaller) {
  for (int threads : {2, 3}) {
    cpu::WorkPool pool(threads);
    std::atomic<bool> second_done{false};
    std::atomic<int> first_started{0};
    std::vector<int> first_ran(static_cast<std::size_t>(threads)), second_ran(40);
    std::vector<int> second_index(40, -1);
    std::vector<std::thread::id> second_on(40);
    std::thread::id second_caller;
    // The first run's tasks, one per thread of the pool, hold the workers (and the first
    // caller) until the second run has finished: it cannot have had a worker's help.
    std::thread first([&] {
      pool.run(threads, [&](std::int64_t i) {
        first_started.fetch_add(1);
        while (!second_done.load()) std::this_thread::yield();
        ++first_ran[static_cast<std::size_t>(i)];
      });
    });
    while (first_started.load() == 0) std::this_thread::yield();
    std::thread second([&] {
      second_caller = std::this_thread::get_id();
      pool.run(40, [&](std::int64_t i, int thread) {
        ++second_ran[static_cast<std::size_t>(i)];
        second_index[static_cast<std::size_t>(i)] = thread;
        second_on[static_cast<std::size_t>(i)] = std::this_thread::get_id();
      });
      second_done.store(true);
    });
    second.join();
    first.join();
    for (std::size_t i = 0; i < second_ran.size(); ++i) {
      EXPECT_EQ(second_ran[i], 1) << threads << " threads, second run's task " << i;
      EXPECT_EQ(second_index[i], 0) << threads << " threads, second run's task " << i;
      EXPECT_EQ(second_on[i], second_caller) << threads << " threads, second run's task " << i;
    }
    for (std::size_t i = 0; i < first_ran.size(); ++i) {
      EXPECT_EQ(first_ran[i], 1) << threads << " threads, first run's task " << i;
    }
    // Free again: a later run's tasks are shared with the workers.
    std::vector<std::thread::id> ran_on(256);
    for (int rep = 0; rep < 20; ++rep) {
      pool.run(256, [&](std::int64_t i) {
        ran_on[static_cast<std::size_t>(i)] = std::this_thread::get_id();
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      });
      bool helped = false;
      for (const auto& id : ran_on) helped = helped || id != std::this_thread::get_id();
      if (helped) break;
      ASSERT_LT(rep, 19) << threads << " threads: no worker took a task in 20 runs after the busy one";
    }
  }
}

// Two threads calling run() on one pool over and over (the executables of one rank run from two
// threads): every task of every run runs once and its writes are visible to its caller, whichever
// threads ran it (under TSan: no race between the runs).
TEST(WorkPool, ConcurrentRunsFromTwoThreadsEachRunEveryTaskOnce) {
  cpu::WorkPool pool(2);
  auto caller = [&](int who) {
    std::vector<int> ran(97);
    for (int rep = 0; rep < 400; ++rep) {
      const std::int64_t tasks = 1 + (rep * 7 + who) % 97;
      for (int& r : ran) r = 0;
      pool.run(tasks, [&](std::int64_t i) { ++ran[static_cast<std::size_t>(i)]; });
      for (std::int64_t i = 0; i < 97; ++i) {
        ASSERT_EQ(ran[static_cast<std::size_t>(i)], i < tasks ? 1 : 0)
            << "caller " << who << ", run " << rep << ", task " << i << " of " << tasks;
      }
    }
  };
  std::thread a(caller, 0), b(caller, 1);
  a.join();
  b.join();
}

// Waits up to 10 s for `flag` (a task that must see a helper run first): false if it never came.
bool wait_for(const std::atomic<bool>& flag) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!flag.load()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

// A rank waiting at a collective runs tasks of the shared run of a peer rank (HelpBoard of a
// shared-memory communicator), as thread threads() + its slot: the owner's tasks here wait
// until a helper has run one, so the run only ends if the waiting peer helps. Every task runs
// once, and the helper's plain stores are visible to the owner when run_shared returns.
TEST(WorkPool, ASharedRunIsHelpedByAPeerWaitingAtACollective) {
  constexpr int kTasks = 16;
  for (int threads : {1, 2}) {
    auto comm = make_local_communicator(2);
    HelpBoard* board = comm->help_board();
    ASSERT_NE(board, nullptr);
    ASSERT_EQ(board->helpers(), 1);
    cpu::WorkPool pool(threads);
    for (int rep = 0; rep < 30; ++rep) {
      std::vector<int> ran(kTasks), by(kTasks, -1);
      std::atomic<bool> helped{false}, timed_out{false};
      std::thread peer([&] { comm->barrier(1); });
      pool.run_shared(
          kTasks,
          [&](std::int64_t i, int thread) {
            ++ran[static_cast<std::size_t>(i)];
            by[static_cast<std::size_t>(i)] = thread;
            if (thread == pool.threads()) {
              helped.store(true);
            } else if (!wait_for(helped)) {
              timed_out.store(true);
            }
          },
          board, 0);
      comm->barrier(0);
      peer.join();
      ASSERT_FALSE(timed_out.load()) << threads << " threads, run " << rep << ": the waiting peer never helped";
      int on_helper = 0;
      for (int i = 0; i < kTasks; ++i) {
        ASSERT_EQ(ran[static_cast<std::size_t>(i)], 1) << threads << " threads, run " << rep << ", task " << i;
        const int t = by[static_cast<std::size_t>(i)];
        ASSERT_TRUE(t >= 0 && t <= threads) << "task " << i << " ran as thread " << t;
        on_helper += t == threads;
      }
      EXPECT_GE(on_helper, 1);
    }
    EXPECT_GE(board->helped(), 30);
  }
}

// Three ranks: ranks 0 and 1 each post a run whose tasks wait until some helper ran one of
// them; rank 2, waiting at the barrier, helps the first, finds it spent, and goes on to the
// second (a job with no tasks left is not picked again). Helpers of a run have distinct slots.
TEST(WorkPool, AWaitingRankHelpsEveryPeersRunInTurn) {
  constexpr int kTasks = 12;
  auto comm = make_local_communicator(3);
  HelpBoard* board = comm->help_board();
  ASSERT_EQ(board->helpers(), 2);
  for (int rep = 0; rep < 20; ++rep) {
    std::atomic<bool> timed_out{false};
    auto owner = [&](int rank) {
      cpu::WorkPool pool(1);
      std::vector<int> ran(kTasks), by(kTasks, -1);
      std::atomic<bool> helped{false};
      pool.run_shared(
          kTasks,
          [&](std::int64_t i, int thread) {
            ++ran[static_cast<std::size_t>(i)];
            by[static_cast<std::size_t>(i)] = thread;
            if (thread >= 1) {
              helped.store(true);
            } else if (!wait_for(helped)) {
              timed_out.store(true);
            }
          },
          board, rank);
      comm->barrier(rank);
      for (int i = 0; i < kTasks; ++i) {
        EXPECT_EQ(ran[static_cast<std::size_t>(i)], 1) << "rank " << rank << ", task " << i;
        EXPECT_TRUE(by[static_cast<std::size_t>(i)] >= 0 && by[static_cast<std::size_t>(i)] <= 2)
            << "rank " << rank << ", task " << i << " ran as thread " << by[static_cast<std::size_t>(i)];
      }
    };
    std::thread waiter([&] { comm->barrier(2); });
    std::thread r0(owner, 0), r1(owner, 1);
    r0.join();
    r1.join();
    waiter.join();
    ASSERT_FALSE(timed_out.load()) << "run " << rep << ": a posted run was never helped";
  }
}

// Idle workers spin for 1.5 times the longest recent gap between runs, within [kMinSpin,
// max_spin]: first kMinSpin; runs about 1 ms apart raise the spin to 1.5 ms or more (so the
// workers are awake for the next one); a gap longer than max_spin (the pool idle) takes it back
// to kMinSpin. (max_spin 200 ms: far above the 1 ms gaps even when the test thread is
// descheduled for a while.)
TEST(WorkPool, WorkersSpinThroughTheRecentGapsBetweenRuns) {
  using std::chrono::milliseconds;
  cpu::WorkPool pool(2, milliseconds(200));
  std::atomic<int> sum{0};
  auto run = [&] { pool.run(8, [&](std::int64_t i) { sum.fetch_add(static_cast<int>(i)); }); };
  EXPECT_EQ(pool.spin(), cpu::WorkPool::kMinSpin);
  run();
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(milliseconds(1));
    run();
  }
  EXPECT_GE(pool.spin(), std::chrono::microseconds(1500));
  EXPECT_LE(pool.spin(), milliseconds(200));
  std::this_thread::sleep_for(milliseconds(250));  // idle longer than max_spin
  run();
  EXPECT_EQ(pool.spin(), cpu::WorkPool::kMinSpin);
  EXPECT_EQ(sum.load(), 7 * 28);
}

// A worker goes to sleep once its spin runs out, and at once on park(): here the spin is about
// 600 ms (runs 400 ms apart), so a worker that sleeps within 300 ms of park() was sent there by
// it; the next run wakes it and it takes tasks again.
TEST(WorkPool, ParkSendsSpinningWorkersToSleep) {
  using std::chrono::milliseconds;
  using Clock = std::chrono::steady_clock;
  cpu::WorkPool pool(2, milliseconds(2000));
  auto run = [&] { pool.run(2, [](std::int64_t) {}); };
  run();
  std::this_thread::sleep_for(milliseconds(400));
  run();
  ASSERT_GE(pool.spin(), milliseconds(600));
  // The worker may have been asleep since before the second run and be waking now: wait until
  // it is back spinning, i.e. its sleep count holds still for 20 ms.
  std::int64_t before = pool.sleeps();
  for (;;) {
    std::this_thread::sleep_for(milliseconds(20));
    if (pool.sleeps() == before) break;
    before = pool.sleeps();
  }
  const auto parked = Clock::now();
  pool.park();
  while (pool.sleeps() == before && Clock::now() - parked < milliseconds(1000)) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  EXPECT_GT(pool.sleeps(), before) << "no worker slept within 1 s of park()";
  EXPECT_LT(Clock::now() - parked, milliseconds(300)) << "the worker slept only when its spin ran out";
  // Woken by the next run: it takes a task when the caller's first one waits for it.
  std::atomic<bool> helped{false};
  const std::thread::id caller = std::this_thread::get_id();
  pool.run(2, [&](std::int64_t) {
    if (std::this_thread::get_id() != caller) {
      helped.store(true);
      return;
    }
    const auto until = Clock::now() + milliseconds(2000);
    while (!helped.load() && Clock::now() < until) std::this_thread::yield();
  });
  EXPECT_TRUE(helped.load());
}

}  // namespace
}  // namespace devpipe

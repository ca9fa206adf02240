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

}  // namespace
}  // namespace devpipe

// Forwards from several threads on wrappers that share their ranks (same tp_degree: same rank
// streams and communicator), results read on other threads and outliving their wrappers.
//
// Each thread drives its own two-stage pipeline of tensor-parallel MLPs (an all-reduce per
// stage), with batches that pad, chunk and re-pad, keeping a window of earlier ranked results
// alive and handing some to a reader thread. Every result must equal the one computed alone:
// the collectives of two stages submitted from different threads must never pair up.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#include "core/pool.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

std::unique_ptr<TestWrapper<ParallelMlp>> build(const TempDir& dir, const std::string& tag, bool last,
                                                std::int64_t bucket) {
  InferenceConfig c(RuntimeConfig{.batch_size = bucket, .tp_degree = 2});
  auto w = std::make_unique<TestWrapper<ParallelMlp>>(
      c, WrapperOptions{.pipeline_execution = true, .return_ranked_to_cpu = last, .tag = tag},
      std::vector<std::vector<Tensor>>{{Tensor::zeros({bucket, 16})}});
  safetensors::save(dir.str(tag + ".safetensors"), nn::random_state_dict(ParallelMlp(), 7));
  w->compile(dir.str(tag + ".safetensors"), dir.str(tag));
  w->load(dir.str(tag));
  return w;
}

}  // namespace

TEST(Concurrency, ThreadsSharingRanksGetTheirOwnResults) {
  constexpr int kThreads = 3;
  constexpr int kIters = 300;
  TempDir dir;
  std::vector<std::unique_ptr<TestWrapper<ParallelMlp>>> first, second;
  for (int t = 0; t < kThreads; ++t) {
    first.push_back(build(dir, "a" + std::to_string(t), false, 4));
    // the last thread's second stage has bucket 8: ranked inputs are re-padded on the device
    second.push_back(build(dir, "b" + std::to_string(t), true, t == kThreads - 1 ? 8 : 4));
  }
  const std::int64_t batches[] = {4, 3, 6, 1, 9};  // exact, padded, chunked
  std::vector<Tensor> xs, expected_first, expected;
  for (int i = 0; i < 5; ++i) {
    xs.push_back(Tensor::randn({batches[i], 16}, 100 + static_cast<std::uint64_t>(i)));
    Output ranked = first[0]->forward({xs.back()});
    expected_first.push_back(ranked.ranked().to_host()[0]);
    expected.push_back(second[0]->forward({ranked}).tensor().clone());
  }

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<int, Output>> handed;  // ranked results read on another thread
  bool done = false;
  std::atomic<int> wrong{0};
  std::thread reader([&] {
    for (;;) {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return done || !handed.empty(); });
      if (handed.empty()) return;
      auto [i, out] = std::move(handed.front());
      handed.pop_front();
      lock.unlock();
      auto host = out.ranked().to_host();
      if (host.size() != 1 || max_abs_diff(host[0], expected_first[static_cast<std::size_t>(i)]) > 1e-5) ++wrong;
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 gen(static_cast<unsigned>(t));
      std::deque<Output> window;  // earlier results kept alive for a while
      for (int it = 0; it < kIters; ++it) {
        const int i = static_cast<int>(gen() % 5);
        Output ranked = first[static_cast<std::size_t>(t)]->forward({xs[static_cast<std::size_t>(i)]});
        window.push_back(ranked);
        if (window.size() > 5 || gen() % 2) window.pop_front();
        if (gen() % 4 == 0) {
          std::lock_guard lock(mu);
          handed.emplace_back(i, ranked);
          cv.notify_one();
        }
        Output y = second[static_cast<std::size_t>(t)]->forward({ranked});
        if (max_abs_diff(y.tensor(), expected[static_cast<std::size_t>(i)]) > 1e-5) ++wrong;
      }
    });
  }
  for (auto& w : workers) w.join();
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_all();
  reader.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(Concurrency, ResultsOutliveTheirWrappers) {
  TempDir dir;
  Tensor x = Tensor::randn({4, 16}, 3);
  Output ranked, host;
  Tensor copy;
  {
    auto a = build(dir, "a", false, 4);
    auto b = build(dir, "b", true, 4);
    ranked = a->forward({x});
    host = b->forward({ranked});
    copy = b->forward({a->forward({x})}).tensor();  // a handle outliving its Output
  }
  ASSERT_EQ(host.shape(), (Shape{4, 16}));
  EXPECT_EQ(max_abs_diff(host.tensor(), copy), 0.0);
  auto h = ranked.ranked().to_host();
  ASSERT_EQ(h.size(), 1u);
  EXPECT_EQ(h[0].shape(), (Shape{4, 16}));
}

// The host pool's per-thread cache of small blocks (tensor.cpp, LocalHostBlocks): blocks live
// at once never overlap, whichever list they come from; a small block let go on one thread is
// the one that thread takes next; and the blocks a thread holds when it ends go back to the
// shared lists, where another thread then finds them.
TEST(Concurrency, SmallHostBlocksAreReusedOnTheirThreadAndOutliveIt) {
  using devpipe::detail::host_pool_acquire;
  using devpipe::detail::host_pool_release;
  struct Block {
    void* p;
    std::size_t bytes, cls;
  };
  // Sizes below, at and above the per-thread cache's 4 KiB classes, 6 live blocks of each
  // (more than the 4 per class a thread keeps).
  std::vector<Block> live;
  for (std::size_t bytes : {1, 64, 65, 200, 256, 1000, 4096, 4097, 10000}) {
    for (int k = 0; k < 6; ++k) {
      std::size_t cls = 0;
      void* p = host_pool_acquire(bytes, &cls);
      ASSERT_GE(cls, bytes);
      live.push_back({p, bytes, cls});
    }
  }
  auto fill_and_check = [&](int round) {
    for (std::size_t i = 0; i < live.size(); ++i) {
      std::memset(live[i].p, static_cast<int>((i * 7 + static_cast<std::size_t>(round)) & 0xff), live[i].bytes);
    }
    for (std::size_t i = 0; i < live.size(); ++i) {
      const auto* b = static_cast<const unsigned char*>(live[i].p);
      const auto want = static_cast<unsigned char>((i * 7 + static_cast<std::size_t>(round)) & 0xff);
      for (std::size_t j = 0; j < live[i].bytes; ++j) ASSERT_EQ(b[j], want) << "block " << i << " byte " << j;
    }
  };
  fill_and_check(0);
  // Let go of all, take the same sizes again (now partly from this thread's cache): still apart.
  for (const Block& b : live) host_pool_release(b.p, b.cls);
  for (Block& b : live) b.p = host_pool_acquire(b.bytes, &b.cls);
  fill_and_check(1);
  for (const Block& b : live) host_pool_release(b.p, b.cls);

  // Reuse on one thread: the 256-byte block let go last is the next one taken.
  std::size_t cls = 0;
  void* a = host_pool_acquire(256, &cls);
  host_pool_release(a, cls);
  EXPECT_EQ(host_pool_acquire(256, &cls), a);
  host_pool_release(a, cls);

  // A thread's cached blocks outlive it: 3 blocks of 3000 bytes (class 3072) taken and let go
  // on a thread that then ends are the 3 this thread takes next. This thread first holds 4
  // blocks of that class, so its own cache of them (at most 4) is empty.
  std::vector<void*> held;
  for (int k = 0; k < 4; ++k) held.push_back(host_pool_acquire(3000, &cls));
  std::vector<void*> theirs;
  std::thread t([&] {
    std::size_t c = 0;
    for (int k = 0; k < 3; ++k) theirs.push_back(host_pool_acquire(3000, &c));
    for (void* p : theirs) host_pool_release(p, c);
  });
  t.join();
  std::vector<void*> mine;
  for (int k = 0; k < 3; ++k) mine.push_back(host_pool_acquire(3000, &cls));
  EXPECT_EQ(cls, 3072u);
  std::sort(theirs.begin(), theirs.end());
  std::sort(mine.begin(), mine.end());
  EXPECT_EQ(mine, theirs);
  for (void* p : mine) host_pool_release(p, cls);
  for (void* p : held) host_pool_release(p, cls);
}

// The process-wide counters are kept per thread (runtime/stats.h): a thread's counts stay after
// it ends, threads counting at once sum, and reset_transfer_stats() zeroes what is seen without
// writing the threads' own counters.
TEST(Concurrency, TransferStatsSumEveryThreadIncludingEndedOnes) {
  TempDir dir;
  auto w = build(dir, "stats", /*last=*/true, 4);
  const Tensor x = Tensor::randn({4, 16}, 3);
  const std::uint64_t out_bytes = 4 * 16 * sizeof(float);
  auto forwards = [&](int n) {
    for (int i = 0; i < n; ++i) EXPECT_EQ(w->forward({x}).shape(), (Shape{4, 16}));
  };
  reset_transfer_stats();
  std::thread ended([&] { forwards(3); });
  ended.join();
  TransferStats s = transfer_stats();
  EXPECT_EQ(s.forwards, 3u);
  EXPECT_EQ(s.device_to_host_bytes, 3 * out_bytes);
  std::thread a([&] { forwards(5); }), b([&] { forwards(7); });
  a.join();
  b.join();
  forwards(1);
  s = transfer_stats();
  EXPECT_EQ(s.forwards, 16u);
  EXPECT_EQ(s.device_to_host_bytes, 16 * out_bytes);
  reset_transfer_stats();
  EXPECT_EQ(transfer_stats(), TransferStats());
  forwards(2);
  EXPECT_EQ(transfer_stats().forwards, 2u);
}

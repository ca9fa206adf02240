// Forwards from several threads on wrappers that share their ranks (same tp_degree: same rank
// streams and communicator), results read on other threads and outliving their wrappers.
//
// Each thread drives its own two-stage pipeline of tensor-parallel MLPs (an all-reduce per
// stage), with batches that pad, chunk and re-pad, keeping a window of earlier ranked results
// alive and handing some to a reader thread. Every result must equal the one computed alone:
// the collectives of two stages submitted from different threads must never pair up.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

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

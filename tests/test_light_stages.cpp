// Two ways a forward skips the hand-offs that cost more than a small stage's work:
// - a replicated stage at tp > 1 whose batch does not split (every rank would compute the same
//   values) runs on the first rank only where the ranks share memory (the cpu backend), and the
//   other ranks' outputs are its buffers;
// - a light stage's first rank runs on the thread that calls forward() when that rank's stream
//   is idle (RankStream::claim_if_idle), in order with the stream's other work.
// Results are checked against double-precision references; the sharing, the claims and the
// caller's OpenMP thread count are checked directly.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "pipeline_util.h"
#include "runtime/rank_group.h"
#include "runtime/stream.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

constexpr std::int64_t kK = 16;

using StateDict = std::vector<std::pair<std::string, Tensor>>;

const Tensor& param(const StateDict& sd, const std::string& key) {
  for (const auto& [k, t] : sd) {
    if (k == key) return t;
  }
  throw std::out_of_range("no parameter " + key);
}

/// y = gelu(x @ W^T + b), W [16, 16]: nothing parallel, every row on its own.
struct Block : nn::Module {
  nn::Linear& fc;
  Block() : fc(register_module("fc", std::make_unique<nn::Linear>(kK, kK))) {}
  Var forward(Var x) const { return F::gelu(fc(x)); }
};

/// Linear in double: x [n, in] @ w[out, in]^T + b.
std::vector<double> linear(const std::vector<double>& x, const Tensor& w, const Tensor* b) {
  const auto wv = w.to_float_vector();
  const std::size_t out = static_cast<std::size_t>(w.shape()[0]), in = static_cast<std::size_t>(w.shape()[1]);
  const std::size_t n = x.size() / in;
  std::vector<double> bv(out, 0.0);
  if (b) {
    const auto v = b->to_float_vector();
    bv.assign(v.begin(), v.end());
  }
  std::vector<double> y(n * out);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t o = 0; o < out; ++o) {
      double acc = bv[o];
      for (std::size_t k = 0; k < in; ++k) acc += x[i * in + k] * wv[o * in + k];
      y[i * out + o] = acc;
    }
  }
  return y;
}

std::vector<double> doubles(const Tensor& t) {
  const auto v = t.to_float_vector();
  return {v.begin(), v.end()};
}

Tensor as_tensor(const std::vector<double>& v, const Shape& shape) {
  return Tensor::from_vector(std::vector<float>(v.begin(), v.end()), shape);
}

/// Block's output in double.
std::vector<double> block_ref(const std::vector<double>& x, const StateDict& sd) {
  std::vector<double> y = linear(x, param(sd, "fc.weight"), &param(sd, "fc.bias"));
  for (double& v : y) v = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  return y;
}

/// ParallelMlp's output in double (RMSNorm eps 1e-6 over the 16 features).
std::vector<double> mlp_ref(const std::vector<double>& x, const StateDict& sd) {
  std::vector<double> y = linear(linear(x, param(sd, "up.weight"), &param(sd, "up.bias")), param(sd, "down.weight"),
                                 &param(sd, "down.bias"));
  const auto g = param(sd, "norm.weight").to_float_vector();
  for (std::size_t i = 0; i < y.size() / 16; ++i) {
    double ms = 0;
    for (std::size_t k = 0; k < 16; ++k) ms += y[i * 16 + k] * y[i * 16 + k] / 16;
    for (std::size_t k = 0; k < 16; ++k) y[i * 16 + k] = y[i * 16 + k] / std::sqrt(ms + 1e-6) * g[k];
  }
  return y;
}

InferenceConfig config(int tp, std::int64_t batch) {
  InferenceConfig c(RuntimeConfig{.batch_size = batch, .dtype = DType::Float32, .tp_degree = tp});
  c.mutable_runtime_config().buckets = {batch};
  return c;
}

template <class M>
std::unique_ptr<TestWrapper<M>> load(const TempDir& dir, const std::string& ckpt, int tp, std::int64_t batch,
                                     const std::string& tag, bool ranked) {
  WrapperOptions o{.tag = tag};
  o.pipeline_execution = ranked;
  o.return_ranked_to_cpu = !ranked;
  auto w = std::make_unique<TestWrapper<M>>(config(tp, batch), o,
                                            std::vector<std::vector<Tensor>>{{Tensor::zeros({batch, kK})}});
  w->compile(ckpt, dir.str(tag));
  w->load(dir.str(tag));
  return w;
}

}  // namespace

// ------------------------------------------------------------------------- stream claims

TEST(RankStreamClaim, TasksQueuedDuringAClaimRunAfterItInOrder) {
  RankStream s("claim");
  std::vector<int> order;
  std::mutex mu;
  auto push = [](void* ctx, int v) {
    auto* p = static_cast<std::pair<std::mutex*, std::vector<int>*>*>(ctx);
    std::lock_guard lock(*p->first);
    p->second->push_back(v);
  };
  std::pair<std::mutex*, std::vector<int>*> ctx{&mu, &order};
  ASSERT_TRUE(s.claim_if_idle());
  EXPECT_FALSE(s.claim_if_idle());  // one claim at a time
  s.enqueue({push, &ctx, 2});
  s.enqueue({push, &ctx, 3});
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  {
    std::lock_guard lock(mu);
    EXPECT_TRUE(order.empty()) << "a task ran while the stream was claimed";
    order.push_back(1);  // the claiming thread's own task
  }
  // synchronize() waits for the claim too
  std::atomic<bool> synced{false};
  std::thread waiter([&] {
    s.synchronize();
    synced = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(synced.load());
  s.end_claim();
  waiter.join();
  EXPECT_TRUE(synced.load());
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(s.claimed_runs(), 1u);
}

TEST(RankStreamClaim, AStreamWithWorkIsNotClaimed) {
  RankStream s("busy");
  std::atomic<bool> release{false};
  auto block = [](void* ctx, int) {
    while (!static_cast<std::atomic<bool>*>(ctx)->load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  };
  s.enqueue({block, &release, 0});
  EXPECT_FALSE(s.claim_if_idle());  // queued or running
  release = true;
  s.synchronize();
  EXPECT_TRUE(s.claim_if_idle());
  s.end_claim();
}

// ------------------------------------------------------------------- replicated, once

TEST(LightStages, AnUnsplitReplicatedStageRunsOnceAndItsRanksShareTheBuffer) {
  TempDir dir;
  const StateDict sd = nn::random_state_dict(Block(), 11);
  safetensors::save(dir.str("block.safetensors"), sd);
  const StateDict mlp_sd = nn::random_state_dict(ParallelMlp(), 12);
  safetensors::save(dir.str("mlp.safetensors"), mlp_sd);
  // batch 1 at tp 2: the batch cannot split, so the stage is replicated
  auto block = load<Block>(dir, dir.str("block.safetensors"), 2, 1, "block", true);
  auto mlp = load<ParallelMlp>(dir, dir.str("mlp.safetensors"), 2, 1, "mlp", false);
  const Tensor x = Tensor::randn({1, kK}, 13);

  Output out = block->forward({x});
  ASSERT_TRUE(out.is_ranked());
  const RankedTensors& r = out.ranked();
  r.wait();
  EXPECT_EQ(r[1][0].raw_data(), r[0][0].raw_data()) << "rank 1 should hold rank 0's buffer";
  const std::vector<double> want = block_ref(doubles(x), sd);
  EXPECT_TRUE(tensors_close(r[0][0].to_host(), as_tensor(want, {1, kK}), 1e-5, 1e-6));
  const TransferStats stats = r.transfer_stats();
  EXPECT_EQ(stats.host_inputs_in_place, 1u) << "one rank read the input";
  EXPECT_EQ(stats.forwards, 1u);

  // A parallel stage reads both ranks' (shared) inputs; its own ranks keep their buffers.
  Output y = mlp->forward({out.ranked()});
  EXPECT_TRUE(tensors_close(y.tensor(), as_tensor(mlp_ref(want, mlp_sd), {1, kK}), 1e-5, 1e-6));
  EXPECT_EQ(y.transfer_stats().ranked_inputs_in_place, 2u);
}

TEST(LightStages, SplitAndParallelStagesKeepABufferPerRank) {
  TempDir dir;
  const StateDict sd = nn::random_state_dict(Block(), 21);
  safetensors::save(dir.str("block.safetensors"), sd);
  const StateDict mlp_sd = nn::random_state_dict(ParallelMlp(), 22);
  safetensors::save(dir.str("mlp.safetensors"), mlp_sd);
  auto split = load<Block>(dir, dir.str("block.safetensors"), 2, 2, "split", true);  // batch 2: split
  auto mlp = load<ParallelMlp>(dir, dir.str("mlp.safetensors"), 2, 1, "mlp", true);
  const Tensor x2 = Tensor::randn({2, kK}, 23), x1 = Tensor::randn({1, kK}, 24);
  for (auto* w : {static_cast<ModelWrapper*>(split.get()), static_cast<ModelWrapper*>(mlp.get())}) {
    const Tensor& x = w == split.get() ? x2 : x1;
    Output out = w->forward({x});
    const RankedTensors& r = out.ranked();
    r.wait();
    EXPECT_NE(r[1][0].raw_data(), r[0][0].raw_data()) << w->tag();
    const std::vector<double> want = w == split.get() ? block_ref(doubles(x), sd) : mlp_ref(doubles(x), mlp_sd);
    for (int rank : {0, 1}) {
      EXPECT_TRUE(tensors_close(r[rank][0].to_host(), as_tensor(want, x.shape()), 1e-5, 1e-6)) << w->tag() << rank;
    }
  }
}

// ---------------------------------------------------------------- light, on the caller

TEST(LightStages, ALightStageRunsOnTheCallingThreadAndLeavesItsThreadCount) {
  const int caller_threads = 3;  // not the rank threads' count (1 or 2 here)
  omp_set_num_threads(caller_threads);
  TempDir dir;
  const StateDict sd = nn::random_state_dict(ParallelMlp(), 31);
  safetensors::save(dir.str("mlp.safetensors"), sd);
  auto light = load<ParallelMlp>(dir, dir.str("mlp.safetensors"), 2, 4, "light", false);
  // per rank 2 x 8192 rows x (16x16 + 16x16) flops: 8 times kLightFlops
  auto heavy = load<ParallelMlp>(dir, dir.str("mlp.safetensors"), 2, 8192, "heavy", false);
  auto group = RankGroup::get(DeviceKind::Cpu, 2);
  EXPECT_EQ(omp_get_max_threads(), caller_threads) << "the loads' warm-ups changed the caller's OpenMP thread count";
  for (auto* w : {light.get(), heavy.get()}) {
    const std::int64_t batch = w == light.get() ? 4 : 8192;
    const std::size_t claimed = group->stream(0).claimed_runs(), claimed1 = group->stream(1).claimed_runs();
    for (int i = 0; i < 5; ++i) {
      // A stream may still be finishing its last task when forward() sees its result: wait.
      group->stream(0).synchronize();
      const Tensor x = Tensor::randn({batch, kK}, 40 + static_cast<std::uint64_t>(i));
      EXPECT_TRUE(tensors_close(w->forward({x}).tensor(), as_tensor(mlp_ref(doubles(x), sd), x.shape()), 1e-5, 1e-6))
          << w->tag() << " forward " << i;
    }
    EXPECT_EQ(group->stream(0).claimed_runs() - claimed, w == light.get() ? 5u : 0u) << w->tag();
    EXPECT_EQ(group->stream(1).claimed_runs(), claimed1) << "rank 1 always runs on its stream";
    EXPECT_EQ(omp_get_max_threads(), caller_threads) << "the caller's OpenMP thread count changed";
  }
  omp_set_num_threads(omp_get_num_procs());
}

TEST(LightStages, LightStagesWithCollectivesFromTwoThreadsStayInOrder) {
  // Two host threads forward light tp-2 stages (an all-reduce each) at once: every forward's
  // collectives must pair with their own stage's, whether rank 0 ran on a caller or a stream.
  TempDir dir;
  const StateDict a_sd = nn::random_state_dict(ParallelMlp(), 51), b_sd = nn::random_state_dict(ParallelMlp(), 52);
  safetensors::save(dir.str("a.safetensors"), a_sd);
  safetensors::save(dir.str("b.safetensors"), b_sd);
  auto a = load<ParallelMlp>(dir, dir.str("a.safetensors"), 2, 2, "a", false);
  auto b = load<ParallelMlp>(dir, dir.str("b.safetensors"), 2, 2, "b", false);
  const Tensor xa = Tensor::randn({2, kK}, 53), xb = Tensor::randn({2, kK}, 54);
  const Tensor want_a = as_tensor(mlp_ref(doubles(xa), a_sd), {2, kK});
  const Tensor want_b = as_tensor(mlp_ref(doubles(xb), b_sd), {2, kK});
  std::atomic<int> bad{0};
  auto loop = [&](ModelWrapper* w, const Tensor* x, const Tensor* want) {
    for (int i = 0; i < 200; ++i) {
      if (!tensors_close(w->forward({*x}).tensor(), *want, 1e-5, 1e-6)) ++bad;
    }
  };
  std::atomic<int> finished{0};
  auto run = [&](ModelWrapper* w, const Tensor* x, const Tensor* want) {
    loop(w, x, want);
    ++finished;
  };
  std::thread ta(run, a.get(), &xa, &want_a), tb(run, b.get(), &xb, &want_b);
  // Collectives paired across stages hang: fail in bounded time instead of waiting for ctest's.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (finished.load() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (finished.load() < 2) {
    std::fprintf(stderr, "FAILED: the forwards of two threads did not finish within 120 s (a deadlock)\n");
    std::_Exit(1);
  }
  ta.join();
  tb.join();
  EXPECT_EQ(bad.load(), 0);
}

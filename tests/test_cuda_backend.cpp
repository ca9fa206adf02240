// The cuda backend: the backend conformance suite (every op case against run_reference, see
// backend_conformance.h), plus what is cuda-specific: host-side planning (CudaPlanning.*, no GPU
// needed), the caching pool, CUDA graph replay, asynchronous runs, copies and the shared-GPU
// collectives. Every device test skips, printing why, when no CUDA device is present; the whole
// file reduces to one skipped test in builds without -DDEVPIPE_CUDA=ON.
#include <gtest/gtest.h>

#ifdef DEVPIPE_HAVE_CUDA

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "backend_conformance.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/plan.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"
#include "graph/reference.h"
#include "devpipe/world.h"
#include "runtime/communicator.h"
#include "runtime/rank_group.h"
#include "test_util.h"

namespace devpipe {
namespace {

/// Empty when a CUDA device is usable, else why not.
const std::string& no_gpu_reason() {
  static const std::string reason = [] {
    std::string why;
    if (cuda_device_count(&why) > 0) return std::string();
    return why.empty() ? std::string("no device") : why;
  }();
  return reason;
}

using namespace testing;  // the shared helpers of backend_conformance.h: trace, param, vi, ...

/// The cuda backend under the conformance suite: every case skips, printing why, without a
/// usable device. Skip list: state_write and sample, which the cuda backend refuses with
/// Unsupported (not implemented there yet), and the fused conv + global average pool, which
/// compile() makes only for the cpu backend; every other case runs, float16 and bfloat16 natively.
constexpr const char* kCpuOnlyFusion =
    "compile() fuses a conv with its global average pool only for the cpu backend; the cuda "
    "backend runs the conv (cuDNN) and the pool as they are and refuses the fused op with "
    "Unsupported";
constexpr const char* kCpuOnlyFold =
    "compile() folds a conv + global average pool into patch means only for the cpu backend; the "
    "cuda backend refuses conv_patch_mean with Unsupported";

const BackendUnderTest& cuda_target() {
  static const BackendUnderTest target{
      .name = "cuda",
      .backend = []() -> Backend& { return cuda_backend(); },
      .unavailable =
          [] { return no_gpu_reason().empty() ? "" : "no CUDA device: " + no_gpu_reason(); },
      .skips = {{"state_write", DType::Float32, "not implemented on cuda: refused with Unsupported"},
                {"state_write", DType::BFloat16, "not implemented on cuda: refused with Unsupported"},
                {"state_write", DType::Float16, "not implemented on cuda: refused with Unsupported"},
                {"sample", DType::Float32, "not implemented on cuda: refused with Unsupported"},
                {"sample", DType::BFloat16, "not implemented on cuda: refused with Unsupported"},
                {"sample", DType::Float16, "not implemented on cuda: refused with Unsupported"},
                {"conv2d_global_avg_pool", DType::Float32, kCpuOnlyFusion},
                {"conv2d_global_avg_pool", DType::BFloat16, kCpuOnlyFusion},
                {"conv2d_global_avg_pool", DType::Float16, kCpuOnlyFusion},
                {"conv_patch_mean", DType::Float32, kCpuOnlyFold},
                {"conv_patch_mean", DType::BFloat16, kCpuOnlyFold},
                {"conv_patch_mean", DType::Float16, kCpuOnlyFold}},
  };
  return target;
}

DEVPIPE_BACKEND_CONFORMANCE(CudaConformance, cuda_target);

/// Skips the test, printing why, when no CUDA device is usable.
#define REQUIRE_GPU()                                                    \
  do {                                                                   \
    const std::string why_ = testing::unavailable_reason(cuda_target()); \
    if (!why_.empty()) GTEST_SKIP() << why_;                             \
  } while (0)

/// Host tensor -> new device tensor on `dev`.
Tensor to_device(const Tensor& host, Device dev) {
  Backend& be = cuda_backend();
  Tensor t = be.allocate(host.shape(), host.dtype(), dev);
  be.copy(t.raw_data(), dev, host.raw_data(), Device::cpu(), host.nbytes());
  return t;
}

// ---- host-side planning (runs without a GPU) ----

/// Offsets of operand 0 and 1 for flat index i of a planned iteration space (as the kernels).
std::pair<std::int64_t, std::int64_t> strided_offsets(const cuda::StridedDims& d, std::int64_t i) {
  std::int64_t o0 = 0, o1 = 0;
  for (int k = d.ndim - 1; k >= 0; --k) {
    const std::int64_t c = i % d.size[k];
    i /= d.size[k];
    o0 += c * d.stride0[k];
    o1 += c * d.stride1[k];
  }
  return {o0, o1};
}

TEST(CudaPlanning, BroadcastIterationSpaceMatchesReference) {
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 4, 5}, {3, 4, 5}},      {{3, 4, 5}, {5}}, {{5}, {3, 4, 5}},
      {{3, 1, 5}, {1, 4, 1}},      {{7, 1}, {1}},    {{1, 3, 1, 2}, {4, 1}},
      {{2, 3, 4, 5}, {1, 3, 1, 5}}};
  for (const auto& [as, bs] : cases) {
    SCOPED_TRACE(as.to_string() + " . " + bs.to_string());
    Graph g = trace(DType::Float32, {{"a", vi(as, DType::Float32)}, {"b", vi(bs, DType::Float32)}},
                    [](const std::vector<Var>& v) { return std::vector<Var>{v[0] + v[1]}; });
    auto in = random_inputs(g);
    const Shape& os = g.value(g.outputs[0]).shape;
    auto dims = cuda::collapse_dims(os.dims(), cuda::broadcast_strides(as, os),
                                    cuda::broadcast_strides(bs, os));
    auto a = in[0].to_float_vector(), b = in[1].to_float_vector();
    std::vector<float> y(static_cast<std::size_t>(os.numel()));
    for (std::int64_t i = 0; i < os.numel(); ++i) {
      auto [oa, ob] = strided_offsets(dims, i);
      y[static_cast<std::size_t>(i)] =
          a[static_cast<std::size_t>(oa)] + b[static_cast<std::size_t>(ob)];
    }
    auto want = run_reference(g, in, {})[0].to_float_vector();
    EXPECT_EQ(y, want);
  }
}

TEST(CudaPlanning, PermuteAndStridedSliceIterationSpaces) {
  Shape xs{2, 3, 2, 3, 2};
  std::vector<std::int64_t> perm{4, 2, 0, 3, 1};
  Graph g = trace(DType::Float32, {{"x", vi(xs, DType::Float32)}}, [&](const std::vector<Var>& v) {
    return std::vector<Var>{F::permute(v[0], perm), F::slice(v[0], 3, 0, 3, 2)};
  });
  auto in = random_inputs(g);
  auto x = in[0].to_float_vector();
  auto want = run_reference(g, in, {});
  // permute
  const Shape& ps = g.value(g.outputs[0]).shape;
  const auto xst = cuda::row_major_strides(xs);
  std::vector<std::int64_t> st;
  for (auto d : perm) st.push_back(xst[static_cast<std::size_t>(d)]);
  auto pd = cuda::collapse_dims(ps.dims(), st, std::vector<std::int64_t>(st.size(), 0));
  std::vector<float> p(static_cast<std::size_t>(ps.numel()));
  for (std::int64_t i = 0; i < ps.numel(); ++i)
    p[static_cast<std::size_t>(i)] = x[static_cast<std::size_t>(strided_offsets(pd, i).first)];
  EXPECT_EQ(p, want[0].to_float_vector());
  // slice dim 3, [0:3:2]: outer 12, n 3, m 2, inner 2
  auto sd = cuda::collapse_dims({12, 2, 2}, {3 * 2, 2 * 2, 1}, {0, 0, 0});
  std::vector<float> sl(48);
  for (std::int64_t i = 0; i < 48; ++i)
    sl[static_cast<std::size_t>(i)] = x[static_cast<std::size_t>(strided_offsets(sd, i).first)];
  EXPECT_EQ(sl, want[1].to_float_vector());
}

TEST(CudaPlanning, MatmulPlansCoverTheOutputAndMatchReference) {
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 4}, {4, 5}},          {{7, 3, 4}, {4, 6}},          {{1, 2, 8}, {3, 8, 1}},
      {{2, 1, 3, 4}, {5, 4, 2}}, {{2, 3, 5, 4}, {2, 3, 4, 3}}, {{4, 1}, {1, 6}},
      {{3, 4}, {2, 4, 5}},       {{2, 1, 3, 4}, {1, 5, 4, 2}}, {{6, 2, 3}, {1, 3, 2}}};
  for (const auto& [as, bs] : cases) {
    SCOPED_TRACE(as.to_string() + " @ " + bs.to_string());
    Graph g =
        trace(DType::Float32, {{"a", vi(as, DType::Float32)}, {"b", vi(bs, DType::Float32)}},
              [](const std::vector<Var>& v) { return std::vector<Var>{F::matmul(v[0], v[1])}; });
    auto in = random_inputs(g);
    const Shape& os = g.value(g.outputs[0]).shape;
    const cuda::GemmPlan plan = cuda::plan_matmul(as, bs, os);
    auto a = in[0].to_float_vector(), b = in[1].to_float_vector();
    std::vector<float> c(static_cast<std::size_t>(os.numel()), std::nanf(""));
    std::vector<int> writes(c.size(), 0);
    for (const auto& call : plan.calls) {
      for (std::int64_t bi = 0; bi < plan.batch; ++bi) {
        for (std::int64_t m = 0; m < plan.m; ++m) {
          for (std::int64_t n = 0; n < plan.n; ++n) {
            double acc = 0;
            for (std::int64_t k = 0; k < plan.k; ++k) {
              const std::int64_t ai = call.a_off + bi * plan.stride_a + m * plan.k + k;
              const std::int64_t bj =
                  call.b_off + bi * plan.stride_b + (plan.b_nk ? n * plan.k + k : k * plan.n + n);
              acc += static_cast<double>(a.at(static_cast<std::size_t>(ai))) *
                     b.at(static_cast<std::size_t>(bj));
            }
            const auto ci =
                static_cast<std::size_t>(call.c_off + bi * plan.stride_c + m * plan.n + n);
            c.at(ci) = static_cast<float>(acc);
            ++writes.at(ci);
          }
        }
      }
    }
    for (int w : writes) ASSERT_EQ(w, 1);
    auto want = run_reference(g, in, {})[0];
    EXPECT_TRUE(testing::tensors_close(Tensor::from_vector(c, os), want, 1e-6, 1e-6));
  }
}

// ---- executor behaviour ----

TEST(CudaBackend, PoolReusesMemoryAcrossForwards) {
  REQUIRE_GPU();
  Backend& be = cuda_backend();
  Graph g = mixed_graph();
  auto params = random_params(g);
  auto exe = be.compile(g, params, RankInfo{});
  Device dev = be.device_for_rank(0, 1);
  Tensor x = Tensor::randn({2, 4, 8, 8}, 3), idx = Tensor::randint({2, 3}, 10, 4);
  auto forward = [&] {
    Tensor dx = to_device(x, dev), di = to_device(idx, dev);
    Tensor o0 = be.allocate({2, 3, 5}, DType::Float32, dev),
           o1 = be.allocate({2, 72}, DType::Float32, dev);
    exe->run({dx.raw_data(), di.raw_data()}, {o0.raw_data(), o1.raw_data()});
    return std::vector<Tensor>{o0.to_host(), o1.to_host()};
  };
  auto first = forward();
  const auto mallocs = cuda_malloc_count();
  auto second = forward();
  EXPECT_EQ(cuda_malloc_count(), mallocs) << "the second forward must be served from the cache";
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(testing::tensors_close(second[i], first[i], 0, 0));

  void* p;
  {
    Tensor t = be.allocate({1000, 3}, DType::Float32, dev);
    p = t.raw_data();
  }
  Tensor again = be.allocate({3, 1000}, DType::Float32, dev);
  EXPECT_EQ(again.raw_data(), p);
  EXPECT_GT(cuda_cached_bytes() + again.nbytes(), 0u);
}

TEST(CudaBackend, GraphReplayGivesIdenticalResultsWithoutHostSync) {
  REQUIRE_GPU();
  Backend& be = cuda_backend();
  Graph g = mixed_graph();
  auto params = random_params(g);
  auto exe = be.compile(g, params, RankInfo{});
  Device dev = be.device_for_rank(0, 1);
  Tensor x = Tensor::randn({2, 4, 8, 8}, 3), idx = Tensor::randint({2, 3}, 10, 4);
  Tensor dx = to_device(x, dev), di = to_device(idx, dev);
  Tensor o0 = be.allocate({2, 3, 5}, DType::Float32, dev),
         o1 = be.allocate({2, 72}, DType::Float32, dev);
  std::vector<const void*> in{dx.raw_data(), di.raw_data()};
  std::vector<void*> out{o0.raw_data(), o1.raw_data()};

  const auto captures = cuda_graph_capture_count();
  const auto replays = cuda_graph_replay_count();
  const auto syncs = cuda_host_sync_count();
  const auto mallocs = cuda_malloc_count();
  std::vector<std::vector<Tensor>> results;
  for (int rep = 0; rep < 3; ++rep) {
    exe->run(in, out);
    exe->run(in, out);  // back to back: no host synchronisation in between
    results.push_back({o0.to_host(), o1.to_host()});
  }
  EXPECT_EQ(cuda_graph_capture_count() - captures, 1u);
  EXPECT_EQ(cuda_graph_replay_count() - replays, 6u);
  EXPECT_EQ(cuda_malloc_count(), mallocs);
  EXPECT_GE(cuda_host_sync_count() - syncs, 3u);  // only the copies synchronise

  // run() itself never synchronises the host.
  const auto before = cuda_host_sync_count();
  for (int i = 0; i < 5; ++i) exe->run(in, out);
  EXPECT_EQ(cuda_host_sync_count(), before);

  for (int rep = 1; rep < 3; ++rep) {
    for (int i = 0; i < 2; ++i)
      EXPECT_TRUE(testing::tensors_close(results[rep][i], results[0][i], 0, 0));
  }
  auto want = run_reference(g, {x, idx}, params);
  EXPECT_TRUE(testing::tensors_close(results[0][0], want[0], 1e-4, 1e-5));
  EXPECT_TRUE(testing::tensors_close(results[0][1], want[1], 1e-4, 1e-5));

  // Other buffers: a new capture (or an eager launch), same results.
  Tensor p0 = be.allocate({2, 3, 5}, DType::Float32, dev),
         p1 = be.allocate({2, 72}, DType::Float32, dev);
  exe->run(in, {p0.raw_data(), p1.raw_data()});
  EXPECT_TRUE(testing::tensors_close(p0.to_host(), results[0][0], 0, 0));
  EXPECT_TRUE(testing::tensors_close(p1.to_host(), results[0][1], 0, 0));
}

TEST(CudaBackend, CopiesFillsAndPaddedRows) {
  REQUIRE_GPU();
  Backend& be = cuda_backend();
  Device dev = be.device_for_rank(0, 1);
  EXPECT_EQ(be.device_for_rank(1, 2), Device::cuda(1 % cuda_device_count()));
  // Larger than one staging chunk, so the double-buffered path runs.
  Tensor h = Tensor::randn({5, 1000, 1000}, 9);
  Tensor d = to_device(h, dev);
  EXPECT_TRUE(testing::tensors_close(d.to_host(), h, 0, 0));
  Tensor d2 = be.allocate(h.shape(), h.dtype(), dev);
  be.copy(d2.raw_data(), dev, d.raw_data(), dev, h.nbytes());
  be.fill_zero(d.raw_data(), dev, 1000 * sizeof(float));
  Tensor back = d.to_host(), back2 = d2.to_host();
  EXPECT_EQ(back.to_float_vector()[999], 0.f);
  EXPECT_EQ(back.to_float_vector()[1000], h.to_float_vector()[1000]);
  EXPECT_TRUE(testing::tensors_close(back2, h, 0, 0));

  Tensor rows = Tensor::randn({3, 4}, 2);
  Tensor padded = be.allocate({5, 4}, DType::Float32, dev);
  cuda_copy_rows_padded(padded.raw_data(), dev, rows.raw_data(), Device::cpu(), 3, 5,
                        4 * sizeof(float));
  auto v = padded.to_host().to_float_vector();
  auto r = rows.to_float_vector();
  for (std::size_t i = 0; i < 12; ++i) EXPECT_EQ(v[i], r[i]);
  for (std::size_t i = 12; i < 20; ++i) EXPECT_EQ(v[i], 0.f);
}

/// The executables of one rank of a rank group run in the rank's context (its stream, handles and
/// workspace: the group's RankResources, the same for every thread count), which outlives the
/// group while one of them holds it. When the last goes, so does the context, and its stream
/// leaves the device's set: copies and pool fences, which order against every stream of the
/// set, still work.
TEST(CudaBackend, ExecutablesOfARankShareItsGroupsContext) {
  REQUIRE_GPU();
  Backend& be = cuda_backend();
  Graph g = mixed_graph();
  auto params = random_params(g);
  const World world(Transport::Threads, 1, 0, 300);
  auto group = world.rank_groups().get(world, be, 1);
  const Device dev = group->devices()[0];
  const std::weak_ptr<RankResources> context = group->rank_info(0, 1).resources;
  ASSERT_FALSE(context.expired());
  EXPECT_EQ(group->rank_info(0, 4).resources, context.lock());
  auto a = be.compile(g, params, group->rank_info(0, 1));
  auto b = be.compile(g, params, group->rank_info(0, 2));
  Tensor x = Tensor::randn({2, 4, 8, 8}, 3), idx = Tensor::randint({2, 3}, 10, 4);
  auto forward = [&](Executable& exe) {
    Tensor dx = to_device(x, dev), di = to_device(idx, dev);
    Tensor o0 = be.allocate({2, 3, 5}, DType::Float32, dev),
           o1 = be.allocate({2, 72}, DType::Float32, dev);
    exe.run({dx.raw_data(), di.raw_data()}, {o0.raw_data(), o1.raw_data()});
    return std::vector<Tensor>{o0.to_host(), o1.to_host()};
  };
  const auto want = run_reference(g, {x, idx}, params);
  for (Executable* exe : {a.get(), b.get()}) {
    const auto got = forward(*exe);
    EXPECT_TRUE(testing::tensors_close(got[0], want[0], 1e-4, 1e-5));
    EXPECT_TRUE(testing::tensors_close(got[1], want[1], 1e-4, 1e-5));
  }
  group.reset();
  a.reset();
  EXPECT_FALSE(context.expired());  // b holds it
  b.reset();
  EXPECT_TRUE(context.expired());
  // An executable of its own (no group) runs in a context of its own; copies still work.
  auto own = be.compile(g, params, RankInfo{});
  const auto got = forward(*own);
  EXPECT_TRUE(testing::tensors_close(got[0], want[0], 1e-4, 1e-5));
  EXPECT_TRUE(testing::tensors_close(got[1], want[1], 1e-4, 1e-5));
}

/// A collective at tp_degree > 1 needs its rank group's collectives, not only a communicator.
TEST(CudaBackend, CollectivesComeFromTheRankGroup) {
  REQUIRE_GPU();
  Graph g = trace(
      DType::Float32, {{"x", vi({3, 5}, DType::Float32)}},
      [](const std::vector<Var>& v) { return std::vector<Var>{F::all_reduce(v[0])}; }, 2);
  auto comm = make_local_communicator(2);
  try {
    cuda_backend().compile(g, {}, RankInfo{0, 2, comm.get(), 1});
    ADD_FAILURE() << "compiled an all_reduce without the group's collectives";
  } catch (const StateError& e) {
    EXPECT_HAS(std::string(e.what()), "without its rank group's collectives (RankInfo.collectives is null)");
  }
  // The group's collectives are the backend's and the group's devices are the mapping's.
  const World world(Transport::Threads, 1, 0, 300);
  auto group = world.rank_groups().get(world, cuda_backend(), 2);
  ASSERT_NE(group->collectives(), nullptr);
  for (int r = 0; r < 2; ++r)
    EXPECT_EQ(group->devices()[static_cast<std::size_t>(r)], Device::cuda(r % cuda_device_count()));
  EXPECT_NO_THROW(cuda_backend().compile(g, {}, group->rank_info(1, 1)));
}

/// Two ranks (sharing the GPU when there is only one), each on its own thread.
TEST(CudaBackend, TensorParallelCollectives) {
  REQUIRE_GPU();
  constexpr int tp = 2;
  Graph g = trace(
      DType::Float32, {{"x", vi({3, 5}, DType::Float32)}},
      [](const std::vector<Var>& v) {
        Var s = F::all_reduce(v[0]);
        return std::vector<Var>{s, F::all_gather(v[0], 1), F::all_gather(s, 0)};
      },
      tp);
  // The ranks' group: its communicator and the backend's collectives for its devices.
  const World world(Transport::Threads, 1, 0, 300);
  auto group = world.rank_groups().get(world, cuda_backend(), tp);
  std::vector<Tensor> xs{Tensor::randn({3, 5}, 11), Tensor::randn({3, 5}, 12)};
  std::vector<std::vector<Tensor>> got(tp);
  std::vector<std::string> errors(tp);
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) {
    threads.emplace_back([&, r] {
      try {
        for (int rep = 0; rep < 3; ++rep)
          got[static_cast<std::size_t>(r)] =
              testing::run_on_rank(cuda_backend(), g, {xs[static_cast<std::size_t>(r)]}, {},
                                   group->rank_info(r, 1));
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
        group->comm().abort();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < tp; ++r) ASSERT_EQ(errors[static_cast<std::size_t>(r)], "") << "rank " << r;
  auto a = xs[0].to_float_vector(), b = xs[1].to_float_vector();
  for (int r = 0; r < tp; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const auto& out = got[static_cast<std::size_t>(r)];
    auto sum = out[0].to_float_vector();
    auto cat1 = out[1].to_float_vector();
    auto cat0 = out[2].to_float_vector();
    ASSERT_EQ(out[1].shape(), (Shape{3, 10}));
    ASSERT_EQ(out[2].shape(), (Shape{6, 5}));
    for (std::size_t i = 0; i < 15; ++i) {
      EXPECT_NEAR(sum[i], a[i] + b[i], 1e-6);
      EXPECT_EQ(cat0[i], sum[i]);
      EXPECT_EQ(cat0[15 + i], sum[i]);
      const std::size_t row = i / 5, col = i % 5;
      EXPECT_EQ(cat1[row * 10 + col], a[i]);
      EXPECT_EQ(cat1[row * 10 + 5 + col], b[i]);
    }
  }
}

/// The child of AHungNcclPeerFailsTheOthersWithinTheTimeout: rank 0 of 2 NCCL ranks (on two
/// GPUs) runs an all_reduce that rank 1 never joins, in a world whose collective timeout is
/// 2 s. Prints the error and the time it took; exits 0 when the error came as a CollectiveError
/// naming the collective, its bytes, the rank and the timeout, within the bound, and a later
/// host wait refuses with it too.
[[noreturn]] void hung_nccl_peer_child() {
  alarm(120);  // a hang (the bug this checks) ends the child, which then fails the test
  unsetenv("DEVPIPE_CUDA_COLLECTIVES");
  constexpr double kTimeout = 2;
  const World world(Transport::Threads, 1, 0, kTimeout);
  auto group = world.rank_groups().get(world, cuda_backend(), 2);
  Graph g = trace(
      DType::Float32, {{"x", vi({256, 16}, DType::Float32)}},
      [](const std::vector<Var>& v) { return std::vector<Var>{F::all_reduce(v[0])}; }, 2);
  Backend& be = cuda_backend();
  auto exe = be.compile(g, {}, group->rank_info(0, 1));  // sets up the NCCL communicators
  const Device dev = group->devices()[0];
  Tensor x = to_device(Tensor::randn({256, 16}, 3), dev);
  Tensor y = be.allocate({256, 16}, DType::Float32, dev);
  Tensor host = Tensor::empty({256, 16}, DType::Float32);
  std::string first, second;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    exe->run({x.raw_data()}, {y.raw_data()});
    be.copy(host.raw_data(), Device::cpu(), y.raw_data(), dev, host.nbytes());
  } catch (const CollectiveError& e) {
    first = e.what();
  } catch (const std::exception& e) {
    first = std::string("not a CollectiveError: ") + e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  try {
    be.copy(host.raw_data(), Device::cpu(), y.raw_data(), dev, host.nbytes());
  } catch (const CollectiveError& e) {
    second = e.what();
  }
  std::fprintf(stderr, "error: %s\nafter %.3f s\nlater: %s\n", first.c_str(), seconds, second.c_str());
  const bool named = first.find("all_reduce of 16384 bytes on rank 0 of 2 (process 0 of 1, cuda:") != std::string::npos &&
                     first.find("did not complete within 2 s") != std::string::npos;
  const bool in_time = seconds >= kTimeout - 0.1 && seconds < kTimeout + 10;
  std::fflush(stderr);
  std::_Exit(named && in_time && second == first ? 0 : 1);
}

/// A hung peer on the NCCL path is bounded by the world's collective timeout (the watchdog of
/// steps_collective.cpp aborts the communicators). In a child process (a death test that
/// re-executes this binary): a collective failure is the process's for good.
TEST(CudaBackendDeathTest, AHungNcclPeerFailsTheOthersWithinTheTimeout) {
  REQUIRE_GPU();
  if (cuda_device_count() < 2) {
    GTEST_SKIP() << "needs 2 GPUs (NCCL ranks need distinct GPUs), found " << cuda_device_count();
  }
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(hung_nccl_peer_child(), ::testing::ExitedWithCode(0), "did not complete within 2 s");
}

}  // namespace
}  // namespace devpipe

#else  // !DEVPIPE_HAVE_CUDA

TEST(CudaBackend, NotBuilt) { GTEST_SKIP() << "built without -DDEVPIPE_CUDA=ON"; }

#endif

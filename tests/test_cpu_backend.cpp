// The cpu backend: the backend conformance suite (every op case against run_reference, see
// backend_conformance.h), plus what is cpu-specific: memory planning and aliasing, repeatability,
// heap allocations of run(), the pool, ranks on their own threads and compile-time errors.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "backend_conformance.h"
#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/executor.h"
#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"
#include "devpipe/dtype.h"
#include "devpipe/error.h"
#include "devpipe/world.h"
#include "replace_new.h"
#include "runtime/rank_group.h"
#include "test_util.h"

// Counts heap allocations made while g_count_allocations is set (the whole process, oneDNN
// included): run() of our own kernels allocates nothing, and the same every time with oneDNN.
namespace {
std::atomic<bool> g_count_allocations{false};
std::atomic<long> g_allocations{0};
void* counted_alloc(std::size_t n, std::size_t align) noexcept {
  if (g_count_allocations.load(std::memory_order_relaxed)) ++g_allocations;
  return devpipe::testing::heap_alloc(n, align);
}
}  // namespace
DEVPIPE_REPLACE_GLOBAL_NEW(counted_alloc)

namespace devpipe {
namespace {

using namespace testing;  // the shared helpers of backend_conformance.h: trace, param, vi, ...

/// The cpu backend under the conformance suite: always available, and its skip list is empty
/// (every case runs; float16 through the float32 fallback).
const BackendUnderTest& cpu_target() {
  static const BackendUnderTest target{.name = "cpu",
                                       .backend = []() -> Backend& { return cpu_backend(); }};
  return target;
}

DEVPIPE_BACKEND_CONFORMANCE(CpuConformance, cpu_target);

/// One Linear x [..., K] -> [..., out] (with a bias when `bias`) and the fused activation `act`.
Graph linear_graph(DType dt, const Shape& x, std::int64_t out, bool bias, const std::string& act) {
  Graph g = trace(dt, {{"x", vi(x, dt)}}, [&](const std::vector<Var>& v) {
    std::optional<Var> b;
    if (bias) b = param("b", {out});
    return std::vector<Var>{F::linear(v[0], param("w", {out, x.dim(-1)}), b)};
  });
  g.nodes.back().attrs.set("activation", act);
  return g;
}

void expect_matches_reference(const Graph& g, Tol tol) {
  testing::expect_matches_reference(cpu_backend(), g, random_inputs(g, 1), random_params(g, 1001),
                                    tol);
}

// ---- executor behaviour ----

TEST(CpuBackend, ReshapeIsAnAlias) {
  Graph g =
      trace(DType::Float32, {{"x", vi({4, 6}, DType::Float32)}}, [](const std::vector<Var>& v) {
        Var a = F::relu(v[0]);
        Var r = F::reshape(a, {2, 12});
        return std::vector<Var>{F::silu(r)};
      });
  ASSERT_EQ(g.nodes.size(), 3u);
  auto in = random_inputs(g);
  auto exe = cpu_backend().compile(g, {}, RankInfo{});
  auto* cpu = dynamic_cast<cpu::CpuExecutable*>(exe.get());
  ASSERT_NE(cpu, nullptr);
  // One intermediate (relu's output, viewed by the reshape); the silu writes the output.
  EXPECT_EQ(exe->workspace_bytes(), 128u);  // 96 bytes, rounded up to 64-byte alignment
  Tensor out = Tensor::empty({2, 12});
  exe->run({in[0].raw_data()}, {out.raw_data()});
  const int relu_out = g.nodes[0].outputs[0], reshape_out = g.nodes[1].outputs[0];
  EXPECT_EQ(cpu->value_address(relu_out), cpu->value_address(reshape_out));
  EXPECT_EQ(cpu->value_address(g.nodes[2].outputs[0]), out.raw_data());
  EXPECT_TRUE(testing::tensors_close(out, run_reference(g, in, {})[0], 1e-5, 1e-5));
}

TEST(CpuBackend, ReshapeOfOutputAndInputEdgeCases) {
  // Output = reshape of an intermediate (written in place), an input returned as is, the same
  // value returned twice, and a reshape of a graph input.
  Graph g =
      trace(DType::Float32, {{"x", vi({2, 6}, DType::Float32)}}, [](const std::vector<Var>& v) {
        Var a = F::relu(v[0]);
        Var r = F::reshape(a, {3, 4});
        Var xi = F::reshape(v[0], {12});
        return std::vector<Var>{r, v[0], r, F::silu(xi)};
      });
  expect_matches_reference(g, Tol{1e-5, 1e-5});
  auto exe = cpu_backend().compile(g, {}, RankInfo{});
  EXPECT_EQ(exe->workspace_bytes(), 0u);
}

TEST(CpuBackend, ArenaReusesMemoryAlongAChain) {
  Graph g =
      trace(DType::Float32, {{"x", vi({64, 64}, DType::Float32)}}, [](const std::vector<Var>& v) {
        Var h = v[0];
        for (int i = 0; i < 8; ++i) h = F::relu(h) + v[0];
        return std::vector<Var>{h};
      });
  auto exe = cpu_backend().compile(g, {}, RankInfo{});
  // 15 intermediates of 16 KiB, but at most two are live at once.
  EXPECT_EQ(exe->workspace_bytes(), 2u * 64 * 64 * 4);
  expect_matches_reference(g, Tol{1e-5, 1e-5});
}

TEST(CpuBackend, RunTwiceGivesIdenticalResults) {
  Graph g = trace(
      DType::Float32, {{"x", vi({3, 4, 9, 9}, DType::Float32)}}, [](const std::vector<Var>& v) {
        Var h = F::conv2d(v[0], param("c.w", {8, 4, 3, 3}), param("c.b", {8}), {1, 1}, {1, 1});
        h = F::max_pool2d(F::relu(h), {2, 2}, {2, 2});
        h = F::flatten(h, 1);
        h = F::linear(h, param("fc.w", {10, 128}), param("fc.b", {10}));
        return std::vector<Var>{F::softmax(F::layer_norm(h, {10}, std::nullopt, std::nullopt), 1)};
      });
  auto params = random_params(g);
  auto exe = cpu_backend().compile(g, params, RankInfo{});
  std::vector<Tensor> outs;
  for (int rep = 0; rep < 3; ++rep) {
    Tensor x = Tensor::randn({3, 4, 9, 9}, 42);  // fresh buffers each run
    Tensor out = cpu_backend().allocate({3, 10}, DType::Float32, Device::cpu());
    exe->run({x.raw_data()}, {out.raw_data()});
    outs.push_back(out.clone());
  }
  for (int rep = 1; rep < 3; ++rep) EXPECT_TRUE(testing::tensors_close(outs[rep], outs[0], 0, 0));
  auto want = run_reference(g, {Tensor::randn({3, 4, 9, 9}, 42)}, params);
  EXPECT_TRUE(testing::tensors_close(outs[0], want[0], 1e-5, 1e-5));
}

TEST(CpuBackend, RunAllocatesTheSameEveryTime) {
  // One graph touching every kernel family, run with two threads.
  Graph g = mixed_graph();
  auto params = random_params(g);
  auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 2});
  Tensor x = Tensor::randn({2, 4, 8, 8}, 3);
  Tensor idx = Tensor::randint({2, 3}, 10, 4);
  Tensor o0 = Tensor::empty({2, 3, 5}), o1 = Tensor::empty({2, 72});
  std::vector<const void*> in{x.raw_data(), idx.raw_data()};
  std::vector<void*> out{o0.raw_data(), o1.raw_data()};
  exe->run(in, out);  // warm-up (first-touch of lazily created state)
  // oneDNN 2.6's dnnl_primitive_execute builds a small std::unordered_map of its arguments on
  // every call (4-6 allocations per primitive; nothing we can pre-build), so here the count
  // must only be the same in every run: nothing grows or is cached per run.
  std::vector<long> counts;
  for (int i = 0; i < 3; ++i) {
    g_allocations = 0;
    g_count_allocations = true;
    exe->run(in, out);
    g_count_allocations = false;
    counts.push_back(g_allocations.load());
  }
  EXPECT_EQ(counts[1], counts[0]);
  EXPECT_EQ(counts[2], counts[0]);
  auto want = run_reference(g, {x, idx}, params);
  EXPECT_TRUE(testing::tensors_close(o0, want[0], 1e-5, 1e-5));
  EXPECT_TRUE(testing::tensors_close(o1, want[1], 1e-5, 1e-5));
}

TEST(CpuBackend, LoopKernelsAndExecutorMakeNoHeapAllocation) {
  // Only kernels of our own (no oneDNN primitive): the executor and they allocate nothing.
  Graph g = trace(
      DType::BFloat16, {{"x", vi({2, 3, 7, 5}, DType::BFloat16)}, {"idx", vi({4}, DType::Int64)}},
      [](const std::vector<Var>& v) {
        Var p = F::adaptive_avg_pool2d(v[0], {3, 2});  // uneven windows: loop
        Var r = F::rms_norm(F::reshape(p, {6, 6}), {6}, param("rms.w", {6}));
        Var e = F::embedding(v[1], param("emb", {9, 6}));
        Var i2 = v[1] * v[1] + v[1];
        Var s = F::slice(F::reshape(r, {2, 3, 6}), 2, 0, 6, 4);  // interleaved strides: loop
        return std::vector<Var>{r, e, i2, s, v[1]};
      });
  auto params = random_params(g);
  auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 2});
  Tensor x = Tensor::randn({2, 3, 7, 5}, 3, DType::BFloat16);
  Tensor idx = Tensor::randint({4}, 9, 4);
  std::vector<Tensor> outs;
  std::vector<void*> out;
  for (int id : g.outputs) {
    outs.push_back(Tensor::empty(g.value(id).shape, g.value(id).dtype));
    out.push_back(outs.back().raw_data());
  }
  std::vector<const void*> in{x.raw_data(), idx.raw_data()};
  exe->run(in, out);
  g_allocations = 0;
  g_count_allocations = true;
  for (int i = 0; i < 3; ++i) exe->run(in, out);
  g_count_allocations = false;
  EXPECT_EQ(g_allocations.load(), 0);
  auto want = run_reference(g, {x, idx}, params);
  for (std::size_t i = 0; i < outs.size(); ++i) {
    EXPECT_TRUE(testing::tensors_close(outs[i], want[i], 2e-2, 2e-2)) << "output " << i;
  }
}

TEST(CpuBackend, PoolReusesBlocks) {
  Backend& be = cpu_backend();
  void* first;
  {
    Tensor t = be.allocate({1000, 3}, DType::Float32, Device::cpu());
    first = t.raw_data();
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(first) % 64, 0u);
  }
  Tensor again = be.allocate({3, 1000}, DType::Float32, Device::cpu());
  EXPECT_EQ(again.raw_data(), first);
  Tensor other = be.allocate({3, 1000}, DType::Float32, Device::cpu());
  EXPECT_NE(other.raw_data(), first);
  EXPECT_EQ(be.device_for_rank(1, 2), Device::cpu(0));
}

TEST(CpuBackend, UnsupportedDtypeIsReportedAtCompile) {
  Graph g = trace(DType::Float32, {{"x", vi({2, 4}, DType::Float32)}},
                  [](const std::vector<Var>& v) { return std::vector<Var>{F::softmax(v[0], 1)}; });
  for (auto& info : g.values) info.dtype = DType::Int64;  // what inference would reject
  try {
    cpu_backend().compile(g, {}, RankInfo{});
    FAIL() << "expected Unsupported";
  } catch (const Unsupported& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("softmax"), std::string::npos) << msg;
    EXPECT_NE(msg.find("int64"), std::string::npos) << msg;
  }
}

TEST(CpuBackend, RanksRunConcurrentlyOnTheirOwnThreads) {
  Graph g =
      trace(DType::BFloat16, {{"x", vi({5, 32}, DType::BFloat16)}}, [](const std::vector<Var>& v) {
        Var h = F::linear(v[0], param("w1", {64, 32}), param("b1", {64}));
        h = F::linear(F::gelu(h), param("w2", {32, 64}));
        return std::vector<Var>{F::rms_norm(h + v[0], {32}, param("n", {32}))};
      });
  auto params = random_params(g);
  Tensor x = Tensor::randn({5, 32}, 9, DType::BFloat16);
  auto want = run_reference(g, {x}, params);
  std::vector<Tensor> outs(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto exe = cpu_backend().compile(g, params, RankInfo{r, 2, nullptr, 1});
      outs[static_cast<std::size_t>(r)] = Tensor::empty({5, 32}, DType::BFloat16);
      for (int i = 0; i < 20; ++i) {
        exe->run({x.raw_data()}, {outs[static_cast<std::size_t>(r)].raw_data()});
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const Tensor& o : outs) EXPECT_TRUE(testing::tensors_close(o, want[0], 2e-2, 2e-2));
}

/// Sets DEVPIPE_CPU_ISA for a scope (the hand-written kernels read it when they are built).
class IsaCap {
 public:
  explicit IsaCap(const char* isa) { ::setenv("DEVPIPE_CPU_ISA", isa, 1); }
  ~IsaCap() { ::unsetenv("DEVPIPE_CPU_ISA"); }
  IsaCap(const IsaCap&) = delete;
  IsaCap& operator=(const IsaCap&) = delete;
};

// Every instruction-set path of the fused conv + global average pool against the reference
// (the conformance suite runs only the best one this CPU has): float32 and bfloat16, output
// channels over one register block plus a remainder, a tail after the 6-pixel blocks.
TEST(CpuBackend, ConvGlobalAvgPoolEveryIsaPathMatchesReference) {
  using cpu::CpuIsa;
  using cpu::cpu_isa;
  using cpu::isa_name;
  const CpuIsa best = cpu_isa();
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    Graph g = trace(dt, {{"x", vi({3, 3, 10, 17}, dt)}}, [](const std::vector<Var>& v) {
      Var c = F::conv2d(v[0], param("w", {72, 3, 3, 3}), param("b", {72}), {1, 1}, {1, 1},
                        {1, 1}, 1);
      return std::vector<Var>{F::adaptive_avg_pool2d(c, {1, 1})};
    });
    ASSERT_EQ(fuse_conv_global_avg_pool(g), 1);
    auto params = random_params(g);
    Tensor x = Tensor::randn({3, 3, 10, 17}, 4, dt);
    auto want = run_reference(g, {x}, params);
    for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
      if (isa > best) continue;  // this CPU lacks it
      IsaCap cap(isa_name(isa).data());
      ASSERT_EQ(cpu_isa(), isa);
      auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 2});
      Tensor y = Tensor::empty({3, 72, 1, 1}, dt);
      exe->run({x.raw_data()}, {y.raw_data()});
      const double tol = dt == DType::Float32 ? 1e-4 : 2e-2;
      EXPECT_TRUE(testing::tensors_close(y, want[0], tol, tol / 10))
          << isa_name(isa) << " " << dtype_name(dt);
    }
  }
  IsaCap bad("avx9");
  try {
    cpu_isa();
    ADD_FAILURE() << "no error for DEVPIPE_CPU_ISA=avx9";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("'avx9'; expected baseline, avx2 or avx512"), std::string::npos)
        << e.what();
  }
}

// The fused conv + global average pool's row ring and pixel blocks on every instruction-set
// path against the reference: the 3-wide unit-stride path (AVX-512) with every tail length
// after the 6-pixel blocks (0 to 5) and 1 to 4 channel vectors, the general path with stride,
// dilation, groups and a 5-wide filter; some images tall enough (N x OH > 512) that a task's
// band spans several output rows, so the ring reuses rows (at stride 2 and dilation 2 it also
// skips rows and wraps).
// The result must not depend on the thread count: 2 and 3 threads give 1 thread's bits.
TEST(CpuBackend, ConvGlobalAvgPoolRowRingAndTailsMatchReference) {
  using cpu::cpu_isa;
  using cpu::CpuIsa;
  using cpu::isa_name;
  const CpuIsa best = cpu_isa();
  struct Case {
    Shape x;
    std::int64_t out, k, stride, pad, dil, groups;
  };
  for (const Case& c : {Case{{2, 3, 40, 8}, 24, 3, 1, 0, 1, 1},       // ow 6: no tail, 2 vectors
                        Case{{1, 3, 600, 9}, 40, 3, 1, 0, 1, 1},      // ow 7: tail 1, 3 vectors
                        Case{{2, 2, 400, 8}, 72, 3, 1, 1, 1, 1},      // tail 2, 4 + 1 vectors
                        Case{{1, 3, 70, 15}, 16, 3, 1, 1, 1, 1},      // tail 3, 1 vector
                        Case{{1, 3, 70, 10}, 64, 3, 1, 1, 1, 1},      // tail 4
                        Case{{2, 3, 40, 13}, 8, 3, 1, 2, 1, 1},       // ow 15: tail 3, pad 2
                        Case{{2, 3, 40, 11}, 20, 3, 1, 1, 1, 1},      // tail 5
                        Case{{3, 3, 400, 9}, 8, 3, 2, 1, 2, 1},       // stride 2, dilation 2
                        Case{{2, 4, 300, 16}, 16, 5, 1, 2, 1, 2}}) {  // 5-wide, 2 groups
    Graph g =
        trace(DType::Float32, {{"x", vi(c.x, DType::Float32)}}, [&](const std::vector<Var>& v) {
          Var y =
              F::conv2d(v[0], param("w", {c.out, c.x[1] / c.groups, c.k, c.k}), param("b", {c.out}),
                        {c.stride, c.stride}, {c.pad, c.pad}, {c.dil, c.dil}, c.groups);
          return std::vector<Var>{F::adaptive_avg_pool2d(y, {1, 1})};
        });
    ASSERT_EQ(fuse_conv_global_avg_pool(g), 1);
    auto params = random_params(g);
    Tensor x = Tensor::randn(c.x, 6);
    auto want = run_reference(g, {x}, params);
    for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
      if (isa > best) continue;
      IsaCap cap(isa_name(isa).data());
      std::vector<float> one_thread;
      for (int threads : {1, 2, 3}) {
        auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, threads});
        Tensor y = Tensor::empty(want[0].shape(), DType::Float32);
        exe->run({x.raw_data()}, {y.raw_data()});
        EXPECT_TRUE(testing::tensors_close(y, want[0], 1e-4, 1e-5))
            << isa_name(isa) << " " << threads << " threads, x " << c.x.to_string();
        const std::vector<float> got = y.to_float_vector();
        if (threads == 1) {
          one_thread = got;
        } else {
          EXPECT_EQ(got, one_thread)
              << isa_name(isa) << " " << threads << " threads, x " << c.x.to_string();
        }
      }
    }
  }
}

// The weights the own kernels pack for themselves start on a cache line, at any size (a vector
// load from malloc's 16-byte alignment would straddle two lines).
TEST(CpuBackend, PackedWeightBuffersStartOnACacheLine) {
  for (std::size_t n : {1u, 27u, 1728u, 100000u}) {
    cpu::AlignedFloats v(n, 1.f);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(v.data()) % 64, 0u) << n << " floats";
    v.resize(3 * n);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(v.data()) % 64, 0u) << 3 * n << " floats";
    EXPECT_EQ(v[0], 1.f);
  }
}

// At tp > 1 with the ranks as threads of one process, a rank waiting at a collective runs bands
// of a peer's fused conv + pool (HelpBoard): rank 0 of a 2-rank shared-memory communicator runs
// while rank 1 waits at a barrier, and gives the bits of a tp 1 build (the bands are reduced in
// band order whichever thread ran them), which match the reference. DEVPIPE_RANK_HELP=0 at
// build: no band is helped.
TEST(CpuBackend, ConvGlobalAvgPoolBandsRunByAWaitingPeerRankGiveTheSameBits) {
  const Shape xs{8, 3, 128, 112};
  Graph g = trace(DType::Float32, {{"x", vi(xs, DType::Float32)}}, [](const std::vector<Var>& v) {
    Var c = F::conv2d(v[0], param("w", {64, 3, 3, 3}), param("b", {64}), {1, 1}, {1, 1}, {1, 1}, 1);
    return std::vector<Var>{F::adaptive_avg_pool2d(c, {1, 1})};
  });
  ASSERT_EQ(fuse_conv_global_avg_pool(g), 1);
  auto params = random_params(g);
  Tensor x = Tensor::randn(xs, 7);
  auto want = run_reference(g, {x}, params);
  auto alone = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 1});
  Tensor y1 = Tensor::empty({8, 64, 1, 1}, DType::Float32);
  alone->run({x.raw_data()}, {y1.raw_data()});
  EXPECT_TRUE(testing::tensors_close(y1, want[0], 1e-4, 1e-5));
  const std::vector<float> bits = y1.to_float_vector();

  auto comm = make_local_communicator(2);
  HelpBoard* board = comm->help_board();
  // Runs the executable as rank 0 while rank 1 waits at a barrier (there before the run starts).
  auto run_beside_waiting_peer = [&](Executable& exe, Tensor& y) {
    std::thread peer([&] { comm->barrier(1); });
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    exe.run({x.raw_data()}, {y.raw_data()});
    comm->barrier(0);
    peer.join();
  };
  auto ranked = cpu_backend().compile(g, params, RankInfo{0, 2, comm.get(), 1});
  for (int rep = 0; rep < 20 && (rep < 3 || board->helped() == 0); ++rep) {
    Tensor y = Tensor::empty({8, 64, 1, 1}, DType::Float32);
    run_beside_waiting_peer(*ranked, y);
    ASSERT_EQ(y.to_float_vector(), bits) << "run " << rep;
  }
  EXPECT_GT(board->helped(), 0) << "the waiting rank ran none of the bands in 20 runs";

  setenv("DEVPIPE_RANK_HELP", "0", 1);
  auto unshared = cpu_backend().compile(g, params, RankInfo{0, 2, comm.get(), 1});
  unsetenv("DEVPIPE_RANK_HELP");
  const std::int64_t before = board->helped();
  for (int rep = 0; rep < 3; ++rep) {
    Tensor y = Tensor::empty({8, 64, 1, 1}, DType::Float32);
    run_beside_waiting_peer(*unshared, y);
    ASSERT_EQ(y.to_float_vector(), bits) << "run " << rep;
  }
  EXPECT_EQ(board->helped(), before);
}

// The skinny Linear's row tasks, like the conv's bands, are taken by a peer rank waiting at a
// collective: both forms (a streamed expand, and reduce) give the bits of a tp 1 build.
TEST(CpuBackend, SkinnyLinearRowsRunByAWaitingPeerRankGiveTheSameBits) {
  if (cpu::cpu_isa() == cpu::CpuIsa::Baseline) GTEST_SKIP() << "the skinny kernels need AVX2";
  for (const auto& c : {std::pair<Shape, std::int64_t>{{4096, 8}, 1280}, {{8192, 1280}, 8}}) {
    const Shape xs = c.first;
    const std::int64_t out = c.second, k = xs.dim(-1);
    Graph g = trace(DType::Float32, {{"x", vi(xs, DType::Float32)}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::linear(v[0], param("w", {out, k}), param("b", {out}))};
    });
    auto params = random_params(g);
    Tensor x = Tensor::randn(xs, 8);
    auto alone = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 1});
    Tensor y1 = Tensor::empty({xs[0], out}, DType::Float32);
    alone->run({x.raw_data()}, {y1.raw_data()});
    const std::vector<float> bits = y1.to_float_vector();
    auto comm = make_local_communicator(2);
    auto ranked = cpu_backend().compile(g, params, RankInfo{0, 2, comm.get(), 1});
    for (int rep = 0; rep < 20 && (rep < 3 || comm->help_board()->helped() == 0); ++rep) {
      Tensor y = Tensor::empty({xs[0], out}, DType::Float32);
      std::thread peer([&] { comm->barrier(1); });
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ranked->run({x.raw_data()}, {y.raw_data()});
      comm->barrier(0);
      peer.join();
      ASSERT_EQ(y.to_float_vector(), bits) << xs.to_string() << " x " << out << ", run " << rep;
    }
    EXPECT_GT(comm->help_board()->helped(), 0) << xs.to_string() << ": the waiting rank ran no rows in 20 runs";
  }
}

// The skinny Linear kernels on each vector path (baseline: oneDNN's matmul) against the
// reference: the large workload's two shapes, scaled down in rows but not in channels, and
// shapes that leave tails (rows, channel blocks, K) on each path. Rows run in WorkPool tasks of
// 64; reduce in blocks of 16 rows (2 at a time on AVX-512) over K chunks of 256. Each case runs
// on a team of 2 (the pool) and of 1 (no pool).
TEST(CpuBackend, SkinnyLinearEveryIsaPathMatchesReference) {
  using cpu::CpuIsa;
  using cpu::cpu_isa;
  using cpu::isa_name;
  using cpu::SkinnyForm;
  const CpuIsa best = cpu_isa();
  struct Case {
    Shape x;
    std::int64_t out;
    SkinnyForm form;
  };
  for (const Case& c : {Case{{2, 601, 8}, 1280, SkinnyForm::Expand},
                        Case{{2, 601, 1280}, 8, SkinnyForm::Reduce},
                        Case{{1, 1027, 5}, 80, SkinnyForm::Expand},      // channel blocks + tail
                        Case{{1, 1027, 100}, 5, SkinnyForm::Reduce},     // K tail on every path
                        // 8.4 MB out: the streamed stores, 3 rows after the 4-row blocks
                        Case{{2051, 8}, 1024, SkinnyForm::Expand},
                        // a K chunk of 256 and a tail of 44 (12 after the 16 lanes, 4 after 8);
                        // 7 rows in the last block (an odd row on AVX-512)
                        Case{{1, 1031, 300}, 7, SkinnyForm::Reduce}}) {
    const std::int64_t k = c.x.dim(-1);
    Graph g = trace(DType::Float32, {{"x", vi(c.x, DType::Float32)}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::linear(v[0], param("w", {c.out, k}), param("b", {c.out}))};
    });
    auto params = random_params(g);
    Tensor x = Tensor::randn(c.x, 5);
    auto want = run_reference(g, {x}, params);
    const std::int64_t m = c.x.numel() / k;
    for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
      if (isa > best) continue;
      EXPECT_EQ(cpu::skinny_linear_form(m, k, c.out, isa),
                isa == CpuIsa::Baseline ? SkinnyForm::None : c.form)
          << isa_name(isa);
      IsaCap cap(isa_name(isa).data());
      for (int threads : {2, 1}) {
        auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, threads});
        Tensor y = Tensor::empty(want[0].shape(), DType::Float32);
        exe->run({x.raw_data()}, {y.raw_data()});
        EXPECT_TRUE(testing::tensors_close(y, want[0], 1e-4, 1e-5))
            << isa_name(isa) << " " << threads << " threads " << c.x.to_string() << " -> " << c.out;
      }
    }
  }
}


// The small-rows Linear kernel (token generation: at most 16 rows) on each vector path
// (baseline: oneDNN's matmul) against the reference, float32 and bfloat16. A grid of every
// row count of a block (AVX-512 blocks 1..8 rows, AVX2 1..4) and of several groups (13, 16) by
// output counts 1, 7, 17, 33, 64 and 100 (none, some or all of the 16 / 8 columns of a
// transpose-reduce filled, tails after the blocks and after the 64-output chunks), with K
// below one vector (5, 13), whole vectors (16, 64) and vectors plus a tail (37, 200: a tail
// for 16 lanes, none for 8), bias or none, and every activation, spread over the grid (a
// Latin square); then rows of x over several dims, weights big enough for several pool tasks,
// and K long enough to run in blocks (partial sums added up; the weight prefetch). A second
// run allocates nothing.
TEST(CpuBackend, SmallRowsLinearEveryIsaPathMatchesReference) {
  using cpu::CpuIsa;
  using cpu::cpu_isa;
  using cpu::isa_name;
  const CpuIsa best = cpu_isa();
  struct Case {
    Shape x;
    std::int64_t out;
    bool bias;
    std::string act;
  };
  std::vector<Case> cases;
  const std::int64_t ks[] = {5, 13, 16, 37, 64, 200};
  const std::int64_t ns[] = {1, 7, 17, 33, 64, 100};
  const char* const acts[] = {"none", "relu", "gelu", "gelu_tanh", "silu"};
  int q = 0;
  for (std::int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 13, 16}) {
    for (int p = 0; p < 6; ++p) {
      cases.push_back({{m, ks[(p + q) % 6]}, ns[p], (p + q) % 2 == 0, acts[(p + 2 * q) % 5]});
    }
    ++q;
  }
  const std::vector<Case> more{
      {{1, 1, 300}, 131, false, "none"},     // batch 1 decode over [1, 1, K]
      {{2, 3, 16}, 5, false, "gelu"},        // 6 rows over two dims
      {{3, 1}, 4, true, "relu"},             // K = 1: masked / first lanes only
      {{16, 301}, 257, false, "gelu_tanh"},  // 301 KB of weight: several tasks
      {{8, 1100}, 33, true, "gelu"},         // K blocks of 1024 + 76 for 8 rows
      {{5, 1700}, 17, false, "silu"},        // 1632 + 68 for 5 rows (AVX2: 4 + 1)
      {{3, 2800}, 64, true, "none"},         // 2720 + 80 for 3 rows
      {{1, 8200}, 7, true, "relu"},          // 8192 + 8 for one row
  };
  cases.insert(cases.end(), more.begin(), more.end());
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    for (const Case& c : cases) {
      Graph g = linear_graph(dt, c.x, c.out, c.bias, c.act);
      auto params = random_params(g);
      Tensor x = Tensor::randn(c.x, 6, dt);
      auto want = run_reference(g, {x}, params);
      const std::int64_t m = c.x.numel() / c.x.dim(-1);
      for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
        if (isa > best) continue;
        const std::string what = std::string(isa_name(isa)) + " " + std::string(dtype_name(dt)) +
                                 " " + c.x.to_string() + " -> " + std::to_string(c.out) +
                                 (c.bias ? " bias " : " ") + c.act;
        EXPECT_EQ(cpu::small_rows_linear_applies(m, c.x.dim(-1), dt, isa), isa != CpuIsa::Baseline)
            << what;
        IsaCap cap(isa_name(isa).data());
        auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 2});
        Tensor y = Tensor::empty(want[0].shape(), dt);
        exe->run({x.raw_data()}, {y.raw_data()});
        const double tol = dt == DType::Float32 ? 1e-4 : 2e-2;
        EXPECT_TRUE(testing::tensors_close(y, want[0], tol, tol / 10)) << what;
        if (isa == CpuIsa::Baseline) continue;  // oneDNN's executions allocate
        const std::vector<const void*> in{x.raw_data()};
        const std::vector<void*> out{y.raw_data()};
        g_allocations = 0;
        g_count_allocations = true;
        exe->run(in, out);
        g_count_allocations = false;
        EXPECT_EQ(g_allocations.load(), 0) << what;
        EXPECT_TRUE(testing::tensors_close(y, want[0], tol, tol / 10)) << what << " (second run)";
      }
    }
  }
  // Not for 17 rows, float16 or an empty K: oneDNN's matmul runs those.
  EXPECT_FALSE(cpu::small_rows_linear_applies(17, 64, DType::Float32, CpuIsa::Avx2));
  EXPECT_FALSE(cpu::small_rows_linear_applies(4, 64, DType::Float16, CpuIsa::Avx2));
  EXPECT_FALSE(cpu::small_rows_linear_applies(4, 0, DType::Float32, CpuIsa::Avx2));
}

// The small-rows kernel's bfloat16 outputs are float_to_bf16 of the float32 result, bit for
// bit, on each vector path: y[m, n] = x[m] w[n] + b[n] with K = 1 (the product of two bfloat16
// is exact in float32, so the float32 result is known), 37 outputs (tails after 16 and 8
// lanes); rows of random values, rows 1 and 1 + 2^-7 against w = 1, b = 2^-8 (ties to even,
// one down and one up), and rows of NaN (kept quiet), infinity and -1e38.
TEST(CpuBackend, SmallRowsBfloat16OutputRoundsToNearestEven) {
  using cpu::CpuIsa;
  using cpu::isa_name;
  constexpr std::int64_t kRows = 7, kOut = 37;
  Graph g = trace(DType::BFloat16, {{"x", vi({kRows, 1}, DType::BFloat16)}},
                  [&](const std::vector<Var>& v) {
                    // Declared one by one: the order of a call's arguments is unspecified
                    // (GCC and clang differ), and the parameters' order is their trace order.
                    Var w = param("w", {kOut, 1});
                    Var b = param("b", {kOut});
                    return std::vector<Var>{F::linear(v[0], w, b)};
                  });
  const std::vector<float> xs = {0.7f, -3.1f, 1.f, 1.f + 1.f / 128, std::nanf(""),
                                 std::numeric_limits<float>::infinity(), -1e38f};
  std::vector<float> ws(kOut), bs(kOut);
  const std::vector<float> wr = Tensor::uniform({kOut}, -2, 2, 11).to_float_vector();
  const std::vector<float> br = Tensor::uniform({kOut}, -2, 2, 12).to_float_vector();
  for (std::int64_t n = 0; n < kOut; ++n) {
    const bool tie = n % 5 == 0;
    ws[static_cast<std::size_t>(n)] = tie ? 1.f : wr[static_cast<std::size_t>(n)];
    bs[static_cast<std::size_t>(n)] = tie ? 1.f / 256 : br[static_cast<std::size_t>(n)];
  }
  const Tensor x = Tensor::from_vector(xs, {kRows, 1}, DType::BFloat16);
  // The parameters in trace order: w, then b.
  const std::vector<Tensor> params{Tensor::from_vector(ws, {kOut, 1}, DType::BFloat16),
                                   Tensor::from_vector(bs, {kOut}, DType::BFloat16)};
  const std::vector<float> xq = x.to_float_vector(), wq = params[0].to_float_vector(),
                           bq = params[1].to_float_vector();
  std::vector<std::uint16_t> want(static_cast<std::size_t>(kRows * kOut));
  for (std::int64_t m = 0; m < kRows; ++m) {
    for (std::int64_t n = 0; n < kOut; ++n) {
      const float v = xq[static_cast<std::size_t>(m)] * wq[static_cast<std::size_t>(n)] +
                      bq[static_cast<std::size_t>(n)];
      want[static_cast<std::size_t>(m * kOut + n)] = float_to_bf16(v);
    }
  }
  // The ties are there: 1 + 2^-8 rounds down to 1, 1 + 2^-7 + 2^-8 up to 1 + 2^-6.
  ASSERT_EQ(want[2 * kOut], float_to_bf16(1.f));
  ASSERT_EQ(want[3 * kOut], float_to_bf16(1.f + 1.f / 64));
  for (CpuIsa isa : {CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (isa > cpu::cpu_isa()) continue;
    IsaCap cap(isa_name(isa).data());
    auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 1});
    Tensor y = Tensor::empty({kRows, kOut}, DType::BFloat16);
    exe->run({x.raw_data()}, {y.raw_data()});
    const auto* got = y.data<std::uint16_t>();
    int bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      if (got[i] != want[i] && ++bad <= 5) {
        ADD_FAILURE() << isa_name(isa) << ": output " << i << " (row " << i / kOut << ") is 0x"
                      << std::hex << got[i] << ", float_to_bf16 gives 0x" << want[i] << std::dec;
      }
    }
    EXPECT_EQ(bad, 0) << isa_name(isa);
  }
}

// The small-rows kernel's exact GELU (its own erf, no library call) over the whole range where
// it is not 0 or the input, against the double-precision reference: within 2e-5 in relative
// terms, also where the GELU is tiny (v < 0, where 1 + erf(v / sqrt 2) computed in float would
// cancel to a few ulps of 1: 10% off at v = -5). oneDNN's (the baseline path) is held to its
// own, absolute, tolerance.
TEST(CpuBackend, SmallRowsGeluIsAccurateOverItsRange) {
  using cpu::CpuIsa;
  using cpu::isa_name;
  // y[m, n] = gelu(x[m] * w[n]): 16 x 128 points spread over [-14, 14]
  Graph g = trace(DType::Float32, {{"x", vi({16, 1}, DType::Float32)}}, [&](const std::vector<Var>& v) {
    return std::vector<Var>{F::linear(v[0], param("w", {128, 1}))};
  });
  g.nodes.back().attrs.set("activation", "gelu");
  std::vector<float> xs(16), ws(128);
  for (int m = 0; m < 16; ++m) xs[static_cast<std::size_t>(m)] = -14.f + 28.f * static_cast<float>(m) / 15.f;
  for (int n = 0; n < 128; ++n) ws[static_cast<std::size_t>(n)] = 0.003f + static_cast<float>(n) / 127.f;
  const Tensor x = Tensor::from_vector(xs, {16, 1});
  const std::vector<Tensor> params{Tensor::from_vector(ws, {128, 1})};
  const auto want = run_reference(g, {x}, params);
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (isa > cpu::cpu_isa()) continue;
    IsaCap cap(isa_name(isa).data());
    auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, 2});
    Tensor y = Tensor::empty(want[0].shape(), DType::Float32);
    exe->run({x.raw_data()}, {y.raw_data()});
    const bool own = isa != CpuIsa::Baseline;
    EXPECT_TRUE(testing::tensors_close(y, want[0], own ? 2e-5 : 1e-5, own ? 1e-12 : 1e-6)) << isa_name(isa);
  }
}

// The executables of one rank of a rank group share one work pool (per thread count: the
// rank's resources, RankGroup::rank_info), so that the workers spinning after one stage's tasks
// take the next stage's; the group's other ranks, other thread counts, other groups and
// executables compiled without a group's resources get their own. Two executables of one rank
// run at once from two threads (one then runs its tasks alone) still give the fused conv's
// result bit for bit: its bands and their sums do not depend on which threads run them. The
// rank's resources outlive the group while an executable holds them, and no longer.
TEST(CpuBackend, ExecutablesOfOneRankShareAWorkPool) {
  const Shape xs{3, 3, 40, 24};
  Graph g = trace(DType::Float32, {{"x", vi(xs, DType::Float32)}}, [&](const std::vector<Var>& v) {
    Var y = F::conv2d(v[0], param("w", {32, 3, 3, 3}), param("b", {32}), {1, 1}, {1, 1}, {1, 1}, 1);
    return std::vector<Var>{F::adaptive_avg_pool2d(y, {1, 1})};
  });
  ASSERT_EQ(fuse_conv_global_avg_pool(g), 1);
  auto params = random_params(g);
  auto compile = [&](const RankInfo& rank) {
    std::unique_ptr<Executable> exe = cpu_backend().compile(g, params, rank);
    return std::unique_ptr<cpu::CpuExecutable>(static_cast<cpu::CpuExecutable*>(exe.release()));
  };
  auto group = std::make_unique<RankGroup>(World::get(), cpu_backend(), 2);
  auto other_group = std::make_unique<RankGroup>(World::get(), cpu_backend(), 2);
  auto a = compile(group->rank_info(0, 2));
  auto b = compile(group->rank_info(0, 2));
  auto three = compile(group->rank_info(0, 3));
  auto other_rank = compile(group->rank_info(1, 2));
  auto other_groups = compile(other_group->rank_info(0, 2));
  auto own = compile(RankInfo{0, 1, nullptr, 2});
  auto own_too = compile(RankInfo{0, 1, nullptr, 2});
  auto one = compile(RankInfo{0, 1, nullptr, 1});
  ASSERT_NE(a->pool(), nullptr);
  EXPECT_EQ(a->pool(), b->pool());
  EXPECT_NE(three->pool(), a->pool());
  EXPECT_NE(other_rank->pool(), a->pool());
  EXPECT_NE(other_groups->pool(), a->pool());
  ASSERT_NE(own->pool(), nullptr);
  EXPECT_NE(own->pool(), a->pool());
  EXPECT_NE(own->pool(), own_too->pool());
  EXPECT_EQ(a->pool()->threads(), 2);
  EXPECT_EQ(three->pool()->threads(), 3);
  EXPECT_EQ(own->pool()->threads(), 2);

  const std::vector<Tensor> xs_in{Tensor::randn(xs, 21), Tensor::randn(xs, 22)};
  std::vector<std::vector<float>> want;
  for (const Tensor& x : xs_in) {
    Tensor y = Tensor::empty({3, 32, 1, 1}, DType::Float32);
    one->run({x.raw_data()}, {y.raw_data()});
    EXPECT_TRUE(testing::tensors_close(y, run_reference(g, {x}, params)[0], 1e-4, 1e-5));
    want.push_back(y.to_float_vector());
  }
  std::vector<std::string> errors(2);
  auto loop = [&](cpu::CpuExecutable& exe, std::size_t k) {
    Tensor y = Tensor::empty({3, 32, 1, 1}, DType::Float32);
    for (int rep = 0; rep < 50 && errors[k].empty(); ++rep) {
      exe.run({xs_in[k].raw_data()}, {y.raw_data()});
      if (y.to_float_vector() != want[k]) errors[k] = "run " + std::to_string(rep) + " differs";
    }
  };
  std::thread ta([&] { loop(*a, 0); }), tb([&] { loop(*b, 1); });
  ta.join();
  tb.join();
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "");

  // The rank's resources hold its pools weakly: a thread count no executable uses has none.
  const std::weak_ptr<RankResources> rank0 = group->rank_info(0, 2).resources;
  auto* resources = dynamic_cast<cpu::CpuRankResources*>(rank0.lock().get());
  ASSERT_NE(resources, nullptr);
  EXPECT_EQ(resources->pool(2).get(), a->pool());
  const std::weak_ptr<cpu::WorkPool> unused = resources->pool(5);
  EXPECT_TRUE(unused.expired());
  // The group gone, its executables keep the rank's resources and pool; the last one frees them.
  const std::weak_ptr<cpu::WorkPool> pool = resources->pool(2);
  group.reset();
  EXPECT_FALSE(rank0.expired());
  a.reset();
  three.reset();
  EXPECT_FALSE(pool.expired());
  b.reset();
  EXPECT_TRUE(pool.expired());
  EXPECT_TRUE(rank0.expired());
}

// A Linear over at most 64 rows with fixed weights runs as column slices of one-thread oneDNN
// matmuls on the work pool when it has more than one thread: against the reference in float32
// and bfloat16, with slices of odd widths (200 outputs in 3 slices), bias, activations and the
// 64-row limit; on 1 thread it is oneDNN's own matmul, on 2 and 3 the slices. Every run
// allocates the same (oneDNN's executions allocate; nothing grows per run).
TEST(CpuBackend, SlicedLinearMatchesReference) {
  struct Case {
    Shape x;
    std::int64_t out;
    bool bias;
    std::string act;
  };
  const std::vector<Case> cases{
      {{32, 256}, 512, true, "none"},     // the seed's text Linear
      {{20, 3, 70}, 200, false, "gelu"},  // 60 rows; 3 slices of 67, 67, 66 columns
      {{64, 33}, 130, true, "relu"},      // the row limit; 2 slices
  };
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    for (const Case& c : cases) {
      Graph g = linear_graph(dt, c.x, c.out, c.bias, c.act);
      auto params = random_params(g);
      Tensor x = Tensor::randn(c.x, 8, dt);
      auto want = run_reference(g, {x}, params);
      const std::int64_t m = c.x.numel() / c.x.dim(-1);
      for (int threads : {1, 2, 3}) {
        const std::string what = std::string(dtype_name(dt)) + " " + c.x.to_string() + " -> " +
                                 std::to_string(c.out) + " " + c.act + ", " +
                                 std::to_string(threads) + " threads";
        EXPECT_EQ(cpu::sliced_linear_applies(m, c.out, threads), threads > 1) << what;
        auto exe = cpu_backend().compile(g, params, RankInfo{0, 1, nullptr, threads});
        Tensor y = Tensor::empty(want[0].shape(), dt);
        const std::vector<const void*> in{x.raw_data()};
        const std::vector<void*> out{y.raw_data()};
        std::vector<long> counts;
        for (int rep = 0; rep < 3; ++rep) {
          g_allocations = 0;
          g_count_allocations = rep > 0;
          exe->run(in, out);
          g_count_allocations = false;
          if (rep > 0) counts.push_back(g_allocations.load());
          const double tol = dt == DType::Float32 ? 1e-4 : 2e-2;
          EXPECT_TRUE(testing::tensors_close(y, want[0], tol, tol / 10)) << what << ", run " << rep;
        }
        EXPECT_EQ(counts[1], counts[0]) << what;
      }
    }
  }
  EXPECT_FALSE(cpu::sliced_linear_applies(65, 512, 2));   // more rows: oneDNN's matmul
  EXPECT_FALSE(cpu::sliced_linear_applies(32, 127, 2));   // too few outputs for two slices
  EXPECT_FALSE(cpu::sliced_linear_applies(32, 1024, 1));  // one thread
}

}  // namespace
}  // namespace devpipe

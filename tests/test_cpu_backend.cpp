// The cpu backend against the reference implementations (run_reference) on random inputs, op
// by op in float32 and bfloat16, plus memory planning, aliasing, repeatability and the pool.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/executor.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"
#include "graph/reference.h"
#include "runtime/run_graph.h"
#include "test_util.h"

// Counts heap allocations made while g_count_allocations is set (the whole process, oneDNN
// included): run() of our own kernels allocates nothing, and the same every time with oneDNN.
namespace {
std::atomic<bool> g_count_allocations{false};
std::atomic<long> g_allocations{0};
void* counted_alloc(std::size_t n, std::size_t align) {
  if (g_count_allocations.load(std::memory_order_relaxed)) ++g_allocations;
  void* p = align > alignof(std::max_align_t)
                ? std::aligned_alloc(align, (n + align - 1) / align * align)
                : std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace
void* operator new(std::size_t n) { return counted_alloc(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace devpipe {
namespace {

using Inputs = std::vector<std::pair<std::string, ValueInfo>>;
using Body = std::function<std::vector<Var>(const std::vector<Var>&)>;

Graph trace(DType dtype, const Inputs& inputs, const Body& body, int tp_degree = 1) {
  TraceOptions opt;
  opt.dtype = dtype;
  opt.tp_degree = tp_degree;
  return trace_function(opt, inputs, body);
}

/// A replicated parameter of the current trace.
Var param(const std::string& key, const Shape& shape) {
  return Tracer::current().parameter(key, shape, -1);
}

/// Random values for every floating graph input / parameter (int64 inputs must be given).
std::vector<Tensor> random_tensors(const Graph& g, const std::vector<int>& values,
                                   std::uint64_t seed) {
  std::vector<Tensor> out;
  for (int v : values) {
    const ValueInfo& info = g.value(v);
    out.push_back(Tensor::randn(info.shape, seed++, info.dtype));
  }
  return out;
}
std::vector<Tensor> random_inputs(const Graph& g, std::uint64_t seed = 1) {
  std::vector<int> ids;
  for (const auto& in : g.inputs) ids.push_back(in.value);
  return random_tensors(g, ids, seed);
}
/// Parameters: matrices and kernels uniform in +-1/sqrt(fan_in) like PyTorch's default init (so
/// that float32 sums stay O(1) instead of cancelling from O(sqrt(fan_in))), vectors N(0, 1).
std::vector<Tensor> random_params(const Graph& g, std::uint64_t seed = 1000) {
  std::vector<Tensor> out;
  for (const auto& p : g.params) {
    const ValueInfo& info = g.value(p.value);
    if (info.shape.rank() >= 2) {
      double bound = 1.0 / std::sqrt(static_cast<double>(info.shape.numel() / info.shape[0]));
      out.push_back(Tensor::uniform(info.shape, -bound, bound, seed++, info.dtype));
    } else {
      out.push_back(Tensor::randn(info.shape, seed++, info.dtype));
    }
  }
  return out;
}

/// Compiles `g` for `rank` on the cpu backend and runs it once on host tensors.
std::vector<Tensor> run_cpu(const Graph& g, const std::vector<Tensor>& inputs,
                            const std::vector<Tensor>& params, const RankInfo& rank) {
  Backend& be = cpu_backend();
  auto exe = be.compile(g, params, rank);
  std::vector<const void*> in;
  for (const auto& t : inputs) in.push_back(t.raw_data());
  std::vector<Tensor> outs;
  std::vector<void*> out;
  for (int id : g.outputs) {
    outs.push_back(be.allocate(g.value(id).shape, g.value(id).dtype, Device::cpu()));
    out.push_back(outs.back().raw_data());
  }
  exe->run(in, out);
  return outs;
}

struct Tol {
  double rtol, atol;
};
Tol tol_for(DType dt) { return dt == DType::Float32 ? Tol{1e-5, 1e-5} : Tol{2e-2, 2e-2}; }

/// Runs `g` on the cpu backend (through run_graph_once) and on the reference; compares.
void expect_matches_reference(const Graph& g, const std::vector<Tensor>& inputs,
                              const std::vector<Tensor>& params, Tol tol) {
  auto got = run_graph_once(cpu_backend(), g, inputs, params);
  auto want = run_reference(g, inputs, params);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].dtype(), want[i].dtype());
    EXPECT_TRUE(testing::tensors_close(got[i], want[i], tol.rtol, tol.atol))
        << "output " << i << " of\n"
        << g.to_text();
  }
}

void expect_matches_reference(const Graph& g, Tol tol, std::uint64_t seed = 1) {
  expect_matches_reference(g, random_inputs(g, seed), random_params(g, seed + 1000), tol);
}

ValueInfo vi(Shape s, DType dt) { return {std::move(s), dt}; }

/// Op tests run once per floating dtype.
class CpuOps : public ::testing::TestWithParam<DType> {
 protected:
  DType dt() const { return GetParam(); }
  Tol tol() const { return tol_for(dt()); }
};

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuOps, ::testing::Values(DType::Float32, DType::BFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// ---- Linear / Matmul ----

TEST_P(CpuOps, Linear) {
  for (Shape x : {Shape{3, 5, 7}, Shape{1, 7}, Shape{7}, Shape{2, 1, 3, 7}}) {
    for (bool bias : {true, false}) {
      SCOPED_TRACE(x.to_string() + (bias ? " bias" : " no bias"));
      Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
        std::optional<Var> b;
        if (bias) b = param("b", {4});
        return std::vector<Var>{F::linear(v[0], param("w", {4, 7}), b)};
      });
      expect_matches_reference(g, tol());
    }
  }
}

TEST_P(CpuOps, LinearFusedActivation) {
  for (const char* act : {"relu", "gelu", "gelu_tanh", "silu"}) {
    SCOPED_TRACE(act);
    Graph g = trace(dt(), {{"x", vi({3, 2, 9}, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::linear(v[0], param("w", {5, 9}), param("b", {5}))};
    });
    g.nodes.back().attrs.set("activation", std::string(act));
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, Matmul) {
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 4}, {4, 5}},          {{7, 3, 4}, {4, 6}},          {{1, 2, 8}, {3, 8, 1}},
      {{2, 1, 3, 4}, {5, 4, 2}}, {{2, 3, 5, 4}, {2, 3, 4, 3}}, {{4, 1}, {1, 6}}};
  for (const auto& [a, b] : cases) {
    SCOPED_TRACE(a.to_string() + " @ " + b.to_string());
    Graph g = trace(dt(), {{"a", vi(a, dt())}, {"b", vi(b, dt())}}, [](const std::vector<Var>& v) {
      return std::vector<Var>{F::matmul(v[0], v[1])};
    });
    expect_matches_reference(g, tol());
  }
}

// ---- Conv2d ----

struct ConvCase {
  Shape x;
  std::int64_t out;
  std::vector<std::int64_t> kernel, stride, padding, dilation;
  std::int64_t groups;
  bool bias;
};

TEST_P(CpuOps, Conv2d) {
  std::vector<ConvCase> cases{
      {{1, 3, 9, 9}, 8, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, true},
      {{3, 4, 7, 10}, 6, {3, 2}, {2, 1}, {1, 0}, {2, 1}, 2, true},
      {{7, 6, 5, 5}, 6, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 6, false},  // depthwise
      {{2, 16, 6, 4}, 32, {1, 1}, {1, 1}, {0, 0}, {1, 1}, 1, true},
      {{1, 5, 11, 8}, 3, {5, 3}, {3, 2}, {2, 1}, {1, 2}, 1, false},
      {{3, 32, 14, 14}, 64, {3, 3}, {2, 2}, {1, 1}, {1, 1}, 1, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.x.to_string() + " -> " + std::to_string(c.out) + " groups " +
                 std::to_string(c.groups));
    Graph g = trace(dt(), {{"x", vi(c.x, dt())}}, [&](const std::vector<Var>& v) {
      Var w = param("w", {c.out, c.x[1] / c.groups, c.kernel[0], c.kernel[1]});
      std::optional<Var> b;
      if (c.bias) b = param("b", {c.out});
      return std::vector<Var>{F::conv2d(v[0], w, b, c.stride, c.padding, c.dilation, c.groups)};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, Conv2dWeightsAsInputs) {
  // Weights that are not parameters are converted to the primitive's layout on every run.
  Graph g = trace(
      dt(), {{"x", vi({3, 4, 6, 5}, dt())}, {"w", vi({6, 2, 3, 3}, dt())}, {"b", vi({6}, dt())}},
      [](const std::vector<Var>& v) {
        return std::vector<Var>{F::conv2d(v[0], v[1], v[2], {1, 2}, {1, 1}, {1, 1}, 2)};
      });
  expect_matches_reference(g, tol());
}

// ---- Pooling ----

TEST_P(CpuOps, AdaptiveAvgPool2d) {
  std::vector<std::pair<Shape, std::vector<std::int64_t>>> cases{{{3, 4, 8, 8}, {2, 2}},
                                                                 {{1, 3, 7, 10}, {3, 4}},
                                                                 {{2, 5, 6, 6}, {1, 1}},
                                                                 {{7, 2, 5, 3}, {5, 3}},
                                                                 {{1, 1, 4, 9}, {3, 2}}};
  for (const auto& [x, os] : cases) {
    SCOPED_TRACE(x.to_string() + " -> " + Shape(os).to_string());
    Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::adaptive_avg_pool2d(v[0], os)};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, MaxPool2d) {
  struct Case {
    Shape x;
    std::vector<std::int64_t> k, s, p, d;
  };
  std::vector<Case> cases{{{3, 4, 9, 9}, {3, 3}, {2, 2}, {1, 1}, {1, 1}},
                          {{1, 3, 8, 7}, {2, 2}, {2, 2}, {0, 0}, {1, 1}},
                          {{2, 3, 10, 10}, {3, 3}, {1, 1}, {1, 1}, {2, 2}},
                          {{7, 2, 6, 9}, {3, 2}, {1, 3}, {1, 0}, {1, 3}}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.x.to_string());
    Graph g = trace(dt(), {{"x", vi(c.x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::max_pool2d(v[0], c.k, c.s, c.p, c.d)};
    });
    expect_matches_reference(g, tol());
  }
}

// ---- Embedding ----

TEST_P(CpuOps, Embedding) {
  Graph g = trace(dt(), {{"idx", vi({3, 5}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {11, 6}))};
  });
  std::vector<Tensor> in{Tensor::randint({3, 5}, 11, 7)};
  expect_matches_reference(g, in, random_params(g), tol());
}

TEST_P(CpuOps, EmbeddingShardedRanks) {
  // Rank r of 2 holds rows [r*6, r*6+6) of a 12-row table; other rows come out zero.
  Graph g = trace(dt(), {{"idx", vi({2, 7}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {6, 4}), 6)};
  });
  std::vector<Tensor> in{Tensor::randint({2, 7}, 12, 3)};
  auto params = random_params(g);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    auto got = run_cpu(g, in, params, RankInfo{r, 2, nullptr, 1});
    auto want = run_reference(g, in, params, RefContext{r, 2});
    EXPECT_TRUE(testing::tensors_close(got[0], want[0], 0, 0));
  }
}

TEST(CpuBackend, EmbeddingOutOfRangeThrows) {
  Graph g = trace(DType::Float32, {{"idx", vi({3}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {5, 2}))};
  });
  std::vector<Tensor> in{Tensor::from_vector_i64({0, 5, 1}, {3})};
  try {
    run_graph_once(cpu_backend(), g, in, random_params(g));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("index 5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vocabulary size 5"), std::string::npos) << msg;
  }
}

// ---- Norms ----

TEST_P(CpuOps, LayerNorm) {
  struct Case {
    Shape x;
    std::vector<std::int64_t> ns;
    int affine;  // 0: none, 1: weight, 2: weight + bias
  };
  for (const auto& c : std::vector<Case>{{{3, 5, 8}, {8}, 2},
                                         {{1, 5, 8}, {5, 8}, 2},
                                         {{7, 33}, {33}, 1},
                                         {{2, 3, 16}, {16}, 0}}) {
    SCOPED_TRACE(c.x.to_string());
    Graph g = trace(dt(), {{"x", vi(c.x, dt())}}, [&](const std::vector<Var>& v) {
      std::optional<Var> w, b;
      if (c.affine >= 1) w = param("w", Shape(c.ns));
      if (c.affine >= 2) b = param("b", Shape(c.ns));
      return std::vector<Var>{F::layer_norm(v[0], c.ns, w, b, 1e-5)};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, LayerNormWeightsAsInputs) {
  // oneDNN wants float32 scale/shift: non-parameter bfloat16 ones are converted per run.
  Graph g = trace(dt(), {{"x", vi({4, 12}, dt())}, {"w", vi({12}, dt())}, {"b", vi({12}, dt())}},
                  [](const std::vector<Var>& v) {
                    return std::vector<Var>{F::layer_norm(v[0], {12}, v[1], v[2], 1e-5)};
                  });
  expect_matches_reference(g, tol());
}

TEST_P(CpuOps, RmsNorm) {
  for (Shape x : {Shape{3, 7, 16}, Shape{1, 33}, Shape{5, 2, 3}}) {
    for (bool weight : {true, false}) {
      SCOPED_TRACE(x.to_string());
      std::vector<std::int64_t> ns{x.dim(-1)};
      Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
        std::optional<Var> w;
        if (weight) w = param("w", Shape(ns));
        return std::vector<Var>{F::rms_norm(v[0], ns, w, 1e-6)};
      });
      expect_matches_reference(g, tol());
    }
  }
}

// ---- data movement ----

TEST_P(CpuOps, Permute) {
  std::vector<std::pair<Shape, std::vector<std::int64_t>>> cases{
      {{2, 3, 4, 5}, {0, 2, 3, 1}},
      {{3, 1, 7}, {2, 0, 1}},
      {{6, 5}, {1, 0}},
      {{2, 3, 2, 3, 2}, {4, 2, 0, 3, 1}}};
  for (const auto& [x, p] : cases) {
    SCOPED_TRACE(x.to_string());
    Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::permute(v[0], p)};
    });
    expect_matches_reference(g, {0, 0});  // data movement is exact
  }
}

TEST_P(CpuOps, Concat) {
  for (int dim : {0, 1, 2, -1}) {
    SCOPED_TRACE(dim);
    Shape a{2, 3, 4}, b{2, 3, 4}, c{2, 3, 4};
    auto d = static_cast<std::size_t>(dim < 0 ? dim + 3 : dim);
    b[d] = 1;
    c[d] = 5;
    Graph g = trace(dt(), {{"a", vi(a, dt())}, {"b", vi(b, dt())}, {"c", vi(c, dt())}},
                    [&](const std::vector<Var>& v) {
                      return std::vector<Var>{F::concat({v[0], v[1], v[2], v[0]}, dim)};
                    });
    expect_matches_reference(g, {0, 0});
  }
}

TEST_P(CpuOps, Slice) {
  struct Case {
    Shape x;
    int dim;
    std::int64_t start, end, step;
  };
  for (const auto& c : std::vector<Case>{{{3, 10, 4}, 1, 1, 8, 2},
                                         {{5, 7}, 1, 2, 7, 1},
                                         {{9, 2, 3}, 0, 0, 9, 4},
                                         {{2, 3, 11}, 2, -5, 100, 3},
                                         {{2, 3, 3}, 2, 0, 3, 2}}) {  // strides oneDNN rejects
    SCOPED_TRACE(c.x.to_string());
    Graph g = trace(dt(), {{"x", vi(c.x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::slice(v[0], c.dim, c.start, c.end, c.step)};
    });
    expect_matches_reference(g, {0, 0});
  }
}

TEST_P(CpuOps, SliceRankStride) {
  Graph g = trace(dt(), {{"x", vi({3, 8}, dt())}}, [&](const std::vector<Var>& v) {
    return std::vector<Var>{F::slice(v[0], 1, 0, 4)};
  });
  g.nodes.back().attrs.set("rank_stride", std::int64_t{4});
  auto in = random_inputs(g);
  for (int r = 0; r < 2; ++r) {
    auto got = run_cpu(g, in, {}, RankInfo{r, 2, nullptr, 1});
    auto want = run_reference(g, in, {}, RefContext{r, 2});
    EXPECT_TRUE(testing::tensors_close(got[0], want[0], 0, 0)) << "rank " << r;
  }
}

TEST(CpuBackend, Int64DataMovement) {
  Graph g = trace(DType::Float32,
                  {{"a", vi({2, 3, 4}, DType::Int64)}, {"b", vi({2, 1, 4}, DType::Int64)}},
                  [](const std::vector<Var>& v) {
                    Var p = F::permute(v[0], {2, 0, 1});
                    Var c = F::concat({v[0], v[1]}, 1);
                    Var s = F::slice(v[0], 2, 1, 4, 2);
                    Var r = F::reshape(c, {8, 4});
                    return std::vector<Var>{p, c, s, r, v[0] + v[1], v[0] * v[1]};
                  });
  std::vector<Tensor> in{Tensor::randint({2, 3, 4}, 1000000007LL * 3, 5),
                         Tensor::randint({2, 1, 4}, 1000, 6)};
  auto got = run_graph_once(cpu_backend(), g, in, {});
  auto want = run_reference(g, in, {});
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].dtype(), DType::Int64);
    ASSERT_EQ(got[i].shape(), want[i].shape());
    const auto* a = got[i].data<std::int64_t>();
    const auto* b = want[i].data<std::int64_t>();
    for (std::int64_t j = 0; j < got[i].numel(); ++j) ASSERT_EQ(a[j], b[j]) << "output " << i;
  }
}

// ---- elementwise ----

TEST_P(CpuOps, AddMulBroadcast) {
  std::vector<std::pair<Shape, Shape>> cases{{{3, 4, 5}, {3, 4, 5}}, {{3, 4, 5}, {5}},
                                             {{5}, {3, 4, 5}},       {{3, 1, 5}, {1, 4, 1}},
                                             {{7, 1}, {1}},          {{1, 3, 1, 2}, {4, 1}}};
  for (const auto& [a, b] : cases) {
    SCOPED_TRACE(a.to_string() + " . " + b.to_string());
    Graph g = trace(dt(), {{"a", vi(a, dt())}, {"b", vi(b, dt())}}, [](const std::vector<Var>& v) {
      return std::vector<Var>{v[0] + v[1], v[0] * v[1]};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, Softmax) {
  for (int dim : {0, 1, 2}) {
    SCOPED_TRACE(dim);
    Graph g = trace(dt(), {{"x", vi({3, 7, 5}, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::softmax(v[0], dim)};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CpuOps, Activations) {
  Graph g = trace(dt(), {{"x", vi({3, 5, 17}, dt())}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::gelu(v[0]), F::gelu(v[0], "tanh"), F::silu(v[0]), F::relu(v[0])};
  });
  expect_matches_reference(g, tol());
}

// ---- float16 runs through the float32 fallback ----

TEST(CpuBackend, Float16FallsBackToFloat32) {
  Graph g =
      trace(DType::Float16, {{"x", vi({3, 8}, DType::Float16)}}, [](const std::vector<Var>& v) {
        Var h = F::linear(v[0], param("w", {6, 8}), param("b", {6}));
        h = F::layer_norm(F::gelu(h), {6}, param("ln.w", {6}), param("ln.b", {6}));
        return std::vector<Var>{F::softmax(h * h, 1), F::rms_norm(h, {6}, std::nullopt)};
      });
  expect_matches_reference(g, Tol{1e-2, 1e-2});  // one float16 ulp is ~1e-3
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
  Graph g = trace(
      DType::Float32, {{"x", vi({2, 4, 8, 8}, DType::Float32)}, {"idx", vi({2, 3}, DType::Int64)}},
      [](const std::vector<Var>& v) {
        Var h = F::conv2d(v[0], param("c.w", {8, 4, 3, 3}), param("c.b", {8}), {1, 1}, {1, 1});
        h = F::max_pool2d(F::gelu(h), {2, 2}, {2, 2});
        Var p = F::adaptive_avg_pool2d(h, {3, 3});
        h = F::adaptive_avg_pool2d(h, {2, 2});
        h = F::flatten(h, 1);                                // [2, 32]
        Var e = F::embedding(v[1], param("emb", {10, 32}));  // [2, 3, 32]
        Var t = F::reshape(h, {2, 1, 32}) + e;
        t = F::layer_norm(t, {32}, param("ln.w", {32}), param("ln.b", {32}));
        t = F::rms_norm(F::silu(t), {32}, param("rms.w", {32}));
        Var a = F::linear(t, param("fc.w", {16, 32}), param("fc.b", {16}));
        Var att = F::softmax(F::matmul(a, F::transpose(a, 1, 2)), 2);  // [2, 3, 3]
        Var c = F::concat({att, F::slice(att, 2, 0, 3, 2)}, 2);
        return std::vector<Var>{F::relu(c) * c, F::flatten(p, 1)};
      });
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

TEST(CpuBackend, CollectiveWithoutCommunicatorIsAStateError) {
  Graph g = trace(
      DType::Float32, {{"x", vi({2, 4}, DType::Float32)}},
      [](const std::vector<Var>& v) { return std::vector<Var>{F::all_reduce(v[0])}; },
      /*tp_degree=*/2);
  EXPECT_THROW(cpu_backend().compile(g, {}, RankInfo{0, 2, nullptr, 1}), StateError);
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

TEST(CpuBackend, WrongParameterIsRejectedAtCompile) {
  Graph g =
      trace(DType::Float32, {{"x", vi({2, 4}, DType::Float32)}}, [](const std::vector<Var>& v) {
        return std::vector<Var>{F::linear(v[0], param("w", {3, 4}))};
      });
  EXPECT_THROW(cpu_backend().compile(g, {Tensor::zeros({4, 3})}, RankInfo{}), InvalidArgument);
  EXPECT_THROW(cpu_backend().compile(g, {}, RankInfo{}), InvalidArgument);
}

}  // namespace
}  // namespace devpipe

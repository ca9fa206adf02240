// The cuda backend against the reference implementations (run_reference), op by op in float32
// and bfloat16, plus the caching pool, CUDA graph replay, asynchronous runs, deferred kernel
// errors and the shared-GPU collectives. Every test skips when no CUDA device is present; the
// whole file reduces to one skipped test in builds without -DDEVPIPE_CUDA=ON.
#include <gtest/gtest.h>

#ifdef DEVPIPE_HAVE_CUDA

#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/plan.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"
#include "graph/reference.h"
#include "runtime/communicator.h"
#include "runtime/run_graph.h"
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

#define REQUIRE_GPU()                                        \
  do {                                                       \
    if (!no_gpu_reason().empty()) {                          \
      GTEST_SKIP() << "no CUDA device: " << no_gpu_reason(); \
    }                                                        \
  } while (0)

using Inputs = std::vector<std::pair<std::string, ValueInfo>>;
using Body = std::function<std::vector<Var>(const std::vector<Var>&)>;

Graph trace(DType dtype, const Inputs& inputs, const Body& body, int tp_degree = 1) {
  TraceOptions opt;
  opt.dtype = dtype;
  opt.tp_degree = tp_degree;
  return trace_function(opt, inputs, body);
}

Var param(const std::string& key, const Shape& shape) {
  return Tracer::current().parameter(key, shape, -1);
}

ValueInfo vi(Shape s, DType dt) { return {std::move(s), dt}; }

std::vector<Tensor> random_inputs(const Graph& g, std::uint64_t seed = 1) {
  std::vector<Tensor> out;
  for (const auto& in : g.inputs) {
    const ValueInfo& info = g.value(in.value);
    out.push_back(Tensor::randn(info.shape, seed++, info.dtype));
  }
  return out;
}

/// Matrices uniform in +-1/sqrt(fan_in), vectors N(0, 1) (as the cpu backend's tests).
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

struct Tol {
  double rtol, atol;
};
Tol tol_for(DType dt) { return dt == DType::Float32 ? Tol{1e-4, 1e-5} : Tol{2e-2, 2e-2}; }

/// Host tensor -> new device tensor on `dev`.
Tensor to_device(const Tensor& host, Device dev) {
  Backend& be = cuda_backend();
  Tensor t = be.allocate(host.shape(), host.dtype(), dev);
  be.copy(t.raw_data(), dev, host.raw_data(), Device::cpu(), host.nbytes());
  return t;
}

/// Compiles `g` for `rank` and runs it once on host inputs; host copies of the outputs.
std::vector<Tensor> run_cuda(const Graph& g, const std::vector<Tensor>& inputs,
                             const std::vector<Tensor>& params, const RankInfo& rank) {
  Backend& be = cuda_backend();
  Device dev = be.device_for_rank(rank.rank, rank.tp_degree);
  auto exe = be.compile(g, params, rank);
  std::vector<Tensor> dev_in;
  std::vector<const void*> in;
  for (const auto& t : inputs) {
    dev_in.push_back(to_device(t, dev));
    in.push_back(dev_in.back().raw_data());
  }
  std::vector<Tensor> outs;
  std::vector<void*> out;
  for (int id : g.outputs) {
    outs.push_back(be.allocate(g.value(id).shape, g.value(id).dtype, dev));
    out.push_back(outs.back().raw_data());
  }
  exe->run(in, out);
  std::vector<Tensor> host;
  for (const auto& t : outs) host.push_back(t.to_host());
  return host;
}

void expect_matches_reference(const Graph& g, const std::vector<Tensor>& inputs,
                              const std::vector<Tensor>& params, Tol tol) {
  auto got = run_graph_once(cuda_backend(), g, inputs, params);
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

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override { REQUIRE_GPU(); }
  DType dt() const { return GetParam(); }
  Tol tol() const { return tol_for(dt()); }
};

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::Float32, DType::BFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// ---- Linear / Matmul ----

TEST_P(CudaOps, Linear) {
  for (Shape x : {Shape{3, 5, 7}, Shape{1, 7}, Shape{7}, Shape{2, 1, 3, 7}, Shape{33, 64}}) {
    for (bool bias : {true, false}) {
      SCOPED_TRACE(x.to_string() + (bias ? " bias" : " no bias"));
      const std::int64_t k = x.dim(-1);
      Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
        std::optional<Var> b;
        if (bias) b = param("b", {24});
        return std::vector<Var>{F::linear(v[0], param("w", {24, k}), b)};
      });
      expect_matches_reference(g, tol());
    }
  }
}

TEST_P(CudaOps, LinearFusedActivation) {
  for (const char* act : {"relu", "gelu", "gelu_tanh", "silu"}) {
    for (bool bias : {true, false}) {
      SCOPED_TRACE(std::string(act) + (bias ? " bias" : ""));
      Graph g = trace(dt(), {{"x", vi({3, 2, 16}, dt())}}, [&](const std::vector<Var>& v) {
        std::optional<Var> b;
        if (bias) b = param("b", {8});
        return std::vector<Var>{F::linear(v[0], param("w", {8, 16}), b)};
      });
      g.nodes.back().attrs.set("activation", std::string(act));
      expect_matches_reference(g, tol());
    }
  }
}

TEST_P(CudaOps, Matmul) {
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 4}, {4, 5}},          {{7, 3, 4}, {4, 6}},          {{1, 2, 8}, {3, 8, 1}},
      {{2, 1, 3, 4}, {5, 4, 2}}, {{2, 3, 5, 4}, {2, 3, 4, 3}}, {{4, 1}, {1, 6}},
      {{3, 4}, {2, 4, 5}},       {{2, 16, 32}, {2, 32, 8}}};
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

TEST_P(CudaOps, Conv2d) {
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

// ---- pooling ----

TEST_P(CudaOps, AdaptiveAvgPool2d) {
  std::vector<std::pair<Shape, std::vector<std::int64_t>>> cases{{{3, 4, 8, 8}, {2, 2}},
                                                                 {{1, 3, 7, 10}, {3, 4}},
                                                                 {{2, 5, 6, 6}, {1, 1}},
                                                                 {{7, 2, 5, 3}, {5, 3}}};
  for (const auto& [x, os] : cases) {
    SCOPED_TRACE(x.to_string());
    Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::adaptive_avg_pool2d(v[0], os)};
    });
    expect_matches_reference(g, tol());
  }
}

TEST_P(CudaOps, MaxPool2d) {
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
    expect_matches_reference(g, {0, 0});  // max is exact
  }
}

// ---- embedding ----

TEST_P(CudaOps, Embedding) {
  Graph g = trace(dt(), {{"idx", vi({3, 5}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {11, 6}))};
  });
  std::vector<Tensor> in{Tensor::randint({3, 5}, 11, 7)};
  expect_matches_reference(g, in, random_params(g), {0, 0});
}

TEST_P(CudaOps, EmbeddingShardedRanks) {
  Graph g = trace(dt(), {{"idx", vi({2, 7}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {6, 4}), 6)};
  });
  std::vector<Tensor> in{Tensor::randint({2, 7}, 12, 3)};
  auto params = random_params(g);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    auto got = run_cuda(g, in, params, RankInfo{r, 2, nullptr, 1});
    auto want = run_reference(g, in, params, RefContext{r, 2});
    EXPECT_TRUE(testing::tensors_close(got[0], want[0], 0, 0));
  }
}

TEST(CudaBackend, EmbeddingOutOfRangeThrowsAtTheNextCopy) {
  REQUIRE_GPU();
  Graph g = trace(DType::Float32, {{"idx", vi({3}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {5, 2}))};
  });
  std::vector<Tensor> in{Tensor::from_vector_i64({0, 5, 1}, {3})};
  try {
    run_graph_once(cuda_backend(), g, in, random_params(g));
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("index 5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vocabulary size 5"), std::string::npos) << msg;
  }
  // The error is reported once; valid indices run clean afterwards.
  std::vector<Tensor> ok{Tensor::from_vector_i64({0, 4, 1}, {3})};
  auto params = random_params(g);
  EXPECT_NO_THROW(run_graph_once(cuda_backend(), g, ok, params));
}

// ---- norms, softmax, activations, elementwise ----

TEST_P(CudaOps, LayerNorm) {
  struct Case {
    Shape x;
    std::vector<std::int64_t> ns;
    int affine;
  };
  for (const auto& c : std::vector<Case>{{{3, 5, 8}, {8}, 2},
                                         {{1, 5, 8}, {5, 8}, 2},
                                         {{7, 33}, {33}, 1},
                                         {{2, 3, 16}, {16}, 0},
                                         {{4, 1500}, {1500}, 2}}) {
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

TEST_P(CudaOps, RmsNorm) {
  for (Shape x : {Shape{3, 7, 16}, Shape{1, 33}, Shape{5, 2, 3}, Shape{2, 2048}}) {
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

TEST_P(CudaOps, Softmax) {
  for (int dim : {0, 1, 2}) {
    SCOPED_TRACE(dim);
    Graph g = trace(dt(), {{"x", vi({3, 7, 5}, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::softmax(v[0], dim)};
    });
    expect_matches_reference(g, tol());
  }
  Graph wide = trace(dt(), {{"x", vi({4, 3000}, dt())}}, [&](const std::vector<Var>& v) {
    return std::vector<Var>{F::softmax(v[0], 1)};
  });
  expect_matches_reference(wide, tol());
}

TEST_P(CudaOps, Activations) {
  Graph g = trace(dt(), {{"x", vi({3, 5, 17}, dt())}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::gelu(v[0]), F::gelu(v[0], "tanh"), F::silu(v[0]), F::relu(v[0])};
  });
  expect_matches_reference(g, tol());
}

TEST_P(CudaOps, AddMulBroadcast) {
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

// ---- data movement ----

TEST_P(CudaOps, Permute) {
  std::vector<std::pair<Shape, std::vector<std::int64_t>>> cases{{{2, 3, 4, 5}, {0, 2, 3, 1}},
                                                                 {{3, 1, 7}, {2, 0, 1}},
                                                                 {{6, 5}, {1, 0}},
                                                                 {{2, 3, 2, 3, 2}, {4, 2, 0, 3, 1}},
                                                                 {{4, 5}, {0, 1}}};
  for (const auto& [x, p] : cases) {
    SCOPED_TRACE(x.to_string());
    Graph g = trace(dt(), {{"x", vi(x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::permute(v[0], p)};
    });
    expect_matches_reference(g, {0, 0});
  }
}

TEST_P(CudaOps, Concat) {
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

TEST_P(CudaOps, Slice) {
  struct Case {
    Shape x;
    int dim;
    std::int64_t start, end, step;
  };
  for (const auto& c : std::vector<Case>{{{3, 10, 4}, 1, 1, 8, 2},
                                         {{5, 7}, 1, 2, 7, 1},
                                         {{9, 2, 3}, 0, 0, 9, 4},
                                         {{2, 3, 11}, 2, -5, 100, 3},
                                         {{4, 6}, 0, 1, 3, 1}}) {
    SCOPED_TRACE(c.x.to_string());
    Graph g = trace(dt(), {{"x", vi(c.x, dt())}}, [&](const std::vector<Var>& v) {
      return std::vector<Var>{F::slice(v[0], c.dim, c.start, c.end, c.step)};
    });
    expect_matches_reference(g, {0, 0});
  }
}

TEST_P(CudaOps, SliceRankStride) {
  Graph g = trace(dt(), {{"x", vi({3, 8}, dt())}}, [&](const std::vector<Var>& v) {
    return std::vector<Var>{F::slice(v[0], 1, 0, 4)};
  });
  g.nodes.back().attrs.set("rank_stride", std::int64_t{4});
  auto in = random_inputs(g);
  for (int r = 0; r < 2; ++r) {
    auto got = run_cuda(g, in, {}, RankInfo{r, 2, nullptr, 1});
    auto want = run_reference(g, in, {}, RefContext{r, 2});
    EXPECT_TRUE(testing::tensors_close(got[0], want[0], 0, 0)) << "rank " << r;
  }
}

TEST(CudaBackend, Int64DataMovementAndArithmetic) {
  REQUIRE_GPU();
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
  auto got = run_graph_once(cuda_backend(), g, in, {});
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

TEST(CudaBackend, Float16) {
  REQUIRE_GPU();
  Graph g =
      trace(DType::Float16, {{"x", vi({3, 8}, DType::Float16)}}, [](const std::vector<Var>& v) {
        Var h = F::linear(v[0], param("w", {6, 8}), param("b", {6}));
        h = F::layer_norm(F::gelu(h), {6}, param("ln.w", {6}), param("ln.b", {6}));
        return std::vector<Var>{F::softmax(h * h, 1), F::rms_norm(h, {6}, std::nullopt)};
      });
  expect_matches_reference(g, Tol{1e-2, 1e-2});
}

// ---- executor behaviour ----

/// A graph touching most kernel families.
Graph mixed_graph() {
  return trace(
      DType::Float32, {{"x", vi({2, 4, 8, 8}, DType::Float32)}, {"idx", vi({2, 3}, DType::Int64)}},
      [](const std::vector<Var>& v) {
        Var h = F::conv2d(v[0], param("c.w", {8, 4, 3, 3}), param("c.b", {8}), {1, 1}, {1, 1});
        h = F::max_pool2d(F::gelu(h), {2, 2}, {2, 2});
        Var p = F::adaptive_avg_pool2d(h, {3, 3});
        h = F::adaptive_avg_pool2d(h, {2, 2});
        h = F::flatten(h, 1);
        Var e = F::embedding(v[1], param("emb", {10, 32}));
        Var t = F::reshape(h, {2, 1, 32}) + e;
        t = F::layer_norm(t, {32}, param("ln.w", {32}), param("ln.b", {32}));
        t = F::rms_norm(F::silu(t), {32}, param("rms.w", {32}));
        Var a = F::linear(t, param("fc.w", {16, 32}), param("fc.b", {16}));
        Var att = F::softmax(F::matmul(a, F::transpose(a, 1, 2)), 2);
        Var c = F::concat({att, F::slice(att, 2, 0, 3, 2)}, 2);
        return std::vector<Var>{F::relu(c) * c, F::flatten(p, 1)};
      });
}

TEST(CudaBackend, MixedGraphMatchesReference) {
  REQUIRE_GPU();
  Graph g = mixed_graph();
  std::vector<Tensor> in{Tensor::randn({2, 4, 8, 8}, 3), Tensor::randint({2, 3}, 10, 4)};
  expect_matches_reference(g, in, random_params(g), Tol{1e-4, 1e-5});
}

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

TEST(CudaBackend, CollectiveWithoutCommunicatorIsAStateError) {
  REQUIRE_GPU();
  Graph g = trace(
      DType::Float32, {{"x", vi({2, 4}, DType::Float32)}},
      [](const std::vector<Var>& v) { return std::vector<Var>{F::all_reduce(v[0])}; }, 2);
  EXPECT_THROW(cuda_backend().compile(g, {}, RankInfo{0, 2, nullptr, 1}), StateError);
}

TEST(CudaBackend, WrongParameterIsRejectedAtCompile) {
  REQUIRE_GPU();
  Graph g =
      trace(DType::Float32, {{"x", vi({2, 4}, DType::Float32)}}, [](const std::vector<Var>& v) {
        return std::vector<Var>{F::linear(v[0], param("w", {3, 4}))};
      });
  EXPECT_THROW(cuda_backend().compile(g, {Tensor::zeros({4, 3})}, RankInfo{}), InvalidArgument);
  EXPECT_THROW(cuda_backend().compile(g, {}, RankInfo{}), InvalidArgument);
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
  auto comm = make_local_communicator(tp);
  std::vector<Tensor> xs{Tensor::randn({3, 5}, 11), Tensor::randn({3, 5}, 12)};
  std::vector<std::vector<Tensor>> got(tp);
  std::vector<std::string> errors(tp);
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) {
    threads.emplace_back([&, r] {
      try {
        for (int rep = 0; rep < 3; ++rep)
          got[static_cast<std::size_t>(r)] =
              run_cuda(g, {xs[static_cast<std::size_t>(r)]}, {}, RankInfo{r, tp, comm.get(), 1});
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
        comm->abort();
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

}  // namespace
}  // namespace devpipe

#else  // !DEVPIPE_HAVE_CUDA

TEST(CudaBackend, NotBuilt) { GTEST_SKIP() << "built without -DDEVPIPE_CUDA=ON"; }

#endif

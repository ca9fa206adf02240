// The batch split of replicated stages at tp > 1 (ModelWrapper::compile): which graphs
// batch_split_blocker lets each rank run on its share of the batch rows, and, end to end, that
// a stage whose rows mix (a mean over the batch) or that has state stays replicated and gives
// tp 1's results, while a row-local stage with a named-dim bucket is split and gives them too.
// Expected values are computed here in double from the same inputs and weights.
#include <gtest/gtest.h>

#include "compiler/artifact.h"
#include "compiler/batch_split.h"
#include "devpipe/devpipe.h"
#include "devpipe/functional.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

constexpr std::int64_t kB = 4, kK = 3, kN = 2;

Graph trace(const Shape& x, const std::function<Var(Var)>& body) {
  return trace_function({1, DType::Float32, "split"}, {{"x", {x, DType::Float32}}},
                        [&](const std::vector<Var>& in) { return std::vector<Var>{body(in[0])}; });
}

Var weight(const Shape& s) { return Tracer::current().parameter("w", s, -1); }

void expect_blocked(const Graph& g, const std::string& what) {
  const std::string why = batch_split_blocker(g, kB);
  EXPECT_NE(why.find(what), std::string::npos) << "reason: '" << why << "', expected it to name " << what;
}

}  // namespace

TEST(BatchSplitBlocker, RowLocalGraphsSplit) {
  // conv, pool, flatten, linear, relu, softmax over the features
  EXPECT_EQ(batch_split_blocker(trace({kB, 2, 5, 5},
                                      [](Var x) {
                                        Var c = F::conv2d(x, weight({3, 2, 3, 3}), std::nullopt);
                                        Var p = F::flatten(F::adaptive_avg_pool2d(c, {1, 1}), 1);
                                        return F::softmax(F::relu(p), 1);
                                      }),
                                kB),
            "");
  // [B, T, K] @ W^T, a mean over T, a permute that keeps dim 0, a reshape that keeps the rows
  EXPECT_EQ(batch_split_blocker(trace({kB, 5, kK},
                                      [](Var x) {
                                        Var y = F::linear(x, weight({kN, kK}));
                                        Var m = F::mean(F::permute(y, {0, 2, 1}), {2}, true);
                                        return F::reshape(m, {kB, kN});
                                      }),
                                kB),
            "");
}

TEST(BatchSplitBlocker, GraphsThatMixRowsStayReplicated) {
  // the mean over the batch, subtracted from every row
  expect_blocked(trace({kB, kK}, [](Var x) { return x - F::mean(x, {0}, true); }), "mean");
  expect_blocked(trace({kB, kK}, [](Var x) { return F::softmax(x, 0); }), "softmax");
  expect_blocked(trace({kB, kK}, [](Var x) { return F::sum(x, {-2, 1}, true); }), "sum");
  // rows moved off dim 0, merged with another dim, or contracted by a matmul
  expect_blocked(trace({kB, kK}, [](Var x) { return F::permute(F::permute(x, {1, 0}), {1, 0}); }),
                 "permute");
  expect_blocked(trace({kB, 2, kK}, [](Var x) { return F::reshape(F::reshape(x, {kB * 2, kK}), {kB, 2, kK}); }),
                 "reshape");
  expect_blocked(trace({kB, kK}, [](Var x) { return F::matmul(x, F::matmul(F::permute(x, {1, 0}), x)); }),
                 "permute");
  // a parameter with a row per batch row
  expect_blocked(trace({kB, kK}, [](Var x) { return x * weight({kB, kK}); }), "mul");
  // an output that does not depend on the input
  expect_blocked(trace({kB, kK}, [](Var) { return F::relu(weight({kB, kK})); }), "output 0");
}

TEST(BatchSplitBlocker, StateAndParallelLayersStayReplicated) {
  Graph g = trace({kB, kK}, [](Var x) {
    Var table = F::state("cache", {kB, kK}, DType::Float32);
    return x + table;
  });
  expect_blocked(g, "state 'cache'");
  Graph p = trace_function({2, DType::Float32, "split"}, {{"x", {Shape{kB, kK}, DType::Float32}}},
                           [](const std::vector<Var>& in) {
                             Var w = Tracer::current().parameter("w", Shape{kN, kK}, 0);
                             return std::vector<Var>{F::linear(in[0], w)};
                           });
  expect_blocked(p, "parameter 'w' is sharded");
}

// ------------------------------------------------------------------------------ end to end

namespace {

/// y = x @ W^T - mean over the batch of (x @ W^T): every row depends on every row.
struct Centered : nn::Module {
  nn::Linear& fc;
  Centered() : fc(register_module("fc", std::make_unique<nn::Linear>(kK, kN, false))) {}
  Var forward(Var x) const {
    Var y = fc(x);
    return y - F::mean(y, {0}, true);
  }
};

/// y = x @ W^T over [batch, seq, K] (seq a named dim).
struct SeqProj : nn::Module {
  nn::Linear& fc;
  SeqProj() : fc(register_module("fc", std::make_unique<nn::Linear>(kK, kN, false))) {}
  Var forward(Var x) const { return fc(x); }
};

class SeqProjWrapper : public ModelWrapper {
 public:
  SeqProjWrapper(const InferenceConfig& c, WrapperOptions o) : ModelWrapper(c, model_cls<SeqProj>(), std::move(o)) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return {{Tensor::zeros({1, 1, kK})}}; }
  std::vector<std::vector<std::string>> input_dims() const override { return {{"batch", "seq", ""}}; }
  std::vector<std::vector<std::string>> output_dims() const override { return {{"batch", "seq", ""}}; }
};

InferenceConfig config(int tp) {
  InferenceConfig c(RuntimeConfig{.batch_size = kB, .dtype = DType::Float32, .tp_degree = tp});
  c.mutable_runtime_config().buckets = {kB};
  return c;
}

/// x [rows..., K] @ w^T in double.
std::vector<double> project(const Tensor& x, const Tensor& w) {
  const auto xv = x.to_float_vector(), wv = w.to_float_vector();
  const std::size_t n = xv.size() / kK;
  std::vector<double> y(n * kN);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t o = 0; o < kN; ++o) {
      for (std::size_t k = 0; k < kK; ++k) y[i * kN + o] += double(xv[i * kK + k]) * wv[o * kK + k];
    }
  }
  return y;
}

int rank_slices(const Manifest& m) {
  int n = 0;
  for (const auto& b : m.buckets) {
    for (const Node& node : b.graph.nodes) n += node.op == OpKind::Slice && node.attrs.i("rank_stride", 0) != 0;
  }
  return n;
}

}  // namespace

TEST(BatchSplit, AStageWhoseRowsMixStaysReplicatedAndMatchesTp1) {
  TempDir dir;
  Tensor w = Tensor::randn({kN, kK}, 3);
  std::string ckpt = dir.str("w.safetensors");
  safetensors::save(ckpt, {{"fc.weight", w}}, {});
  Tensor x = Tensor::randn({kB, kK}, 4);
  std::vector<double> y = project(x, w);
  std::vector<float> want(y.size());
  for (std::size_t o = 0; o < kN; ++o) {
    double mean = 0;
    for (std::size_t i = 0; i < kB; ++i) mean += y[i * kN + o] / kB;
    for (std::size_t i = 0; i < kB; ++i) want[i * kN + o] = static_cast<float>(y[i * kN + o] - mean);
  }
  TestWrapper<Centered> s(config(2), {.tag = "centered"}, {{Tensor::zeros({kB, kK})}});
  s.compile(ckpt, dir.str("art"));
  EXPECT_EQ(rank_slices(read_manifest(dir.str("art"))), 0);
  s.load(dir.str("art"));
  EXPECT_TRUE(tensors_close(s.forward({x}).tensor(), Tensor::from_vector(want, {kB, kN}), 1e-5, 1e-6));
}

TEST(BatchSplit, ANamedDimStageSplitsAndMatchesTheReference) {
  TempDir dir;
  Tensor w = Tensor::randn({kN, kK}, 5);
  std::string ckpt = dir.str("w.safetensors");
  safetensors::save(ckpt, {{"fc.weight", w}}, {});
  InferenceConfig c = config(2);
  c.mutable_runtime_config().dim_buckets = {{"seq", {4, 8}}};
  SeqProjWrapper s(c, {.tag = "seq"});
  s.compile(ckpt, dir.str("art"));
  const Manifest m = read_manifest(dir.str("art"));
  ASSERT_EQ(m.buckets.size(), 2u);
  EXPECT_EQ(rank_slices(m), 2);  // one input slice per bucket (seq 4 and 8)
  s.load(dir.str("art"));
  for (std::int64_t seq : {3, 8}) {
    Tensor x = Tensor::randn({kB, seq, kK}, 6 + seq);
    std::vector<double> y = project(x, w);
    Tensor want = Tensor::from_vector(std::vector<float>(y.begin(), y.end()), {kB, seq, kN});
    EXPECT_TRUE(tensors_close(s.forward({x}).tensor(), want, 1e-5, 1e-6)) << "seq " << seq;
  }
}

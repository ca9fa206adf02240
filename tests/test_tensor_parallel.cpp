// Tensor-parallel layers against their unsharded PyTorch twin (tests/reference/tp_mlp_ref.py).
//
// Tolerance: float32, rtol 1e-5 / atol 1e-5 on outputs of magnitude ~0.5: the sharded matmuls
// sum the same terms in a different grouping (per-rank partial sums, then an all-reduce).
#include <gtest/gtest.h>

#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

struct TpMlp : nn::Module {
  nn::ParallelEmbedding embed{64, 32};
  nn::ColumnParallelLinear up{32, 48, /*bias=*/true, /*gather_output=*/false};
  nn::RowParallelLinear down{48, 32, /*bias=*/true, /*input_is_parallel=*/true};
  nn::ColumnParallelLinear head{32, 24, /*bias=*/true, /*gather_output=*/true};
  nn::RowParallelLinear side{32, 16, /*bias=*/true, /*input_is_parallel=*/false};
  TpMlp() {
    register_module("embed", embed);
    register_module("up", up);
    register_module("down", down);
    register_module("head", head);
    register_module("side", side);
  }
  std::pair<Var, Var> forward(Var ids) const {
    Var x = embed(ids);
    x = down(F::gelu(up(x)));
    return {head(x), side(x)};
  }
};

}  // namespace

class TensorParallel : public ::testing::TestWithParam<int> {};

TEST_P(TensorParallel, ShardedLayersMatchUnshardedPyTorch) {
  int tp = GetParam();
  TempDir dir;
  ASSERT_TRUE(run_torch_script("tp_mlp_ref.py", "--out " + dir.str() + " --batch 6"));
  auto io = safetensors::load_all(dir.str("io.safetensors"));
  InferenceConfig config(RuntimeConfig{.batch_size = 6, .tp_degree = tp});
  TestWrapper<TpMlp> w(config, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "tp_mlp"},
                       {{io.at("ids")}});
  w.compile(dir.str("ckpt"), dir.str("compiled"));
  w.load(dir.str("compiled"));
  Output out = w.forward({io.at("ids")});
  ASSERT_TRUE(out.is_ranked());
  const RankedTensors& r = out.ranked();
  ASSERT_EQ(r.num_ranks(), tp);
  ASSERT_EQ(r.num_outputs(), 2);  // every output of the stage stays ranked
  r.wait();
  auto host = r.to_host();
  EXPECT_TRUE(tensors_close(host[0], io.at("head"), 1e-5, 1e-5));
  EXPECT_TRUE(tensors_close(host[1], io.at("side"), 1e-5, 1e-5));
  // After the gather / all-reduce every rank holds the same full result.
  for (int k = 1; k < tp; ++k) {
    for (int o = 0; o < 2; ++o) {
      EXPECT_EQ(max_abs_diff(r[k][static_cast<std::size_t>(o)].to_host(), r[0][static_cast<std::size_t>(o)].to_host()), 0.0)
          << "rank " << k << " output " << o;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tp, TensorParallel, ::testing::Values(1, 2, 4));

// ------------------------------------------------- NxD's defaults for the parallel layers

namespace {

// Layers constructed with only their sizes, as NxD model code writes them.
struct DefaultColumn : nn::Module {
  nn::ColumnParallelLinear fc{4, 6};
  DefaultColumn() { register_module("fc", fc); }
  Var forward(Var x) const { return fc(x); }
};
struct DefaultRow : nn::Module {
  nn::RowParallelLinear fc{6, 3};
  DefaultRow() { register_module("fc", fc); }
  Var forward(Var x) const { return fc(x); }
};

/// y[b][o] = sum_i x[b][i] * w[o][i] + bias[o], in double: the reference for one Linear.
Tensor linear_reference(const Tensor& x, const Tensor& w, const Tensor& bias) {
  auto xv = x.to_float_vector(), wv = w.to_float_vector(), bv = bias.to_float_vector();
  std::int64_t rows = x.shape()[0], in = x.shape()[1], out = w.shape()[0];
  std::vector<float> y(static_cast<std::size_t>(rows * out));
  for (std::int64_t b = 0; b < rows; ++b) {
    for (std::int64_t o = 0; o < out; ++o) {
      double acc = bv[static_cast<std::size_t>(o)];
      for (std::int64_t i = 0; i < in; ++i) {
        acc += static_cast<double>(xv[static_cast<std::size_t>(b * in + i)]) * wv[static_cast<std::size_t>(o * in + i)];
      }
      y[static_cast<std::size_t>(b * out + o)] = static_cast<float>(acc);
    }
  }
  return Tensor::from_vector(y, Shape{rows, out});
}

/// Compiles and runs model M at tp 2 on `x` with the weights given; returns every rank's output.
template <class M>
std::vector<Tensor> run_tp2(const Tensor& x, const Tensor& w, const Tensor& b) {
  TempDir dir;
  safetensors::save(dir.str("model.safetensors"), {{"fc.weight", w}, {"fc.bias", b}});
  InferenceConfig config(RuntimeConfig{.batch_size = x.shape()[0], .tp_degree = 2});
  TestWrapper<M> wrapper(config, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "defaults"},
                         {{x}});
  wrapper.compile(dir.str(), dir.str("compiled"));
  wrapper.load(dir.str("compiled"));
  Output out = wrapper.forward({x});
  const RankedTensors& r = out.ranked();
  r.wait();
  std::vector<Tensor> per_rank;
  for (int k = 0; k < r.num_ranks(); ++k) per_rank.push_back(r[k][0].to_host());
  return per_rank;
}

}  // namespace

TEST(ParallelLayerDefaults, AreNxDs) {
  nn::ColumnParallelLinear col(4, 6);
  nn::RowParallelLinear row(6, 3);
  EXPECT_TRUE(col.gather_output);
  EXPECT_FALSE(row.input_is_parallel);
}

// Float32 sums of 4 or 6 terms of magnitude ~1: 1e-5 covers the regrouping across ranks.
TEST(ParallelLayerDefaults, ColumnParallelLinearGathersTheFullOutputOnEveryRank) {
  Tensor x = Tensor::randn({3, 4}, 11), w = Tensor::randn({6, 4}, 12), b = Tensor::randn({6}, 13);
  auto out = run_tp2<DefaultColumn>(x, w, b);
  ASSERT_EQ(out.size(), 2u);
  Tensor expected = linear_reference(x, w, b);
  for (const Tensor& t : out) EXPECT_TRUE(tensors_close(t, expected, 1e-5, 1e-5));
}

TEST(ParallelLayerDefaults, RowParallelLinearTakesTheFullInput) {
  Tensor x = Tensor::randn({3, 6}, 21), w = Tensor::randn({3, 6}, 22), b = Tensor::randn({3}, 23);
  auto out = run_tp2<DefaultRow>(x, w, b);
  ASSERT_EQ(out.size(), 2u);
  Tensor expected = linear_reference(x, w, b);
  for (const Tensor& t : out) EXPECT_TRUE(tensors_close(t, expected, 1e-5, 1e-5));
}

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

// Fusion of activations into Linear: the graph shrinks and computes the same values (reference
// implementation and cpu backend, before vs after).
#include <gtest/gtest.h>

#include "backends/cpu/cpu_backend.h"
#include "compiler/fuse.h"
#include "devpipe/functional.h"
#include "graph/reference.h"
#include "runtime/run_graph.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {
Graph mlp() {
  return trace_function({}, {{"x", {Shape{3, 8}, DType::Float32}}, {"w1", {Shape{16, 8}, DType::Float32}},
                             {"b1", {Shape{16}, DType::Float32}}, {"w2", {Shape{8, 16}, DType::Float32}}},
                        [](const std::vector<Var>& in) {
                          Var h = F::gelu(F::linear(in[0], in[1], in[2]));        // fusable
                          Var y = F::linear(h, in[3]);
                          Var side = F::silu(y);                                  // y also returned: not fusable
                          Var z = F::relu(F::linear(side, in[1]));                // fusable
                          return std::vector<Var>{y, z, F::gelu(F::linear(h, in[3]), "tanh")};
                        });
}
}  // namespace

TEST(Fuse, FoldsActivationsIntoLinearWhereSafe) {
  Graph g = mlp();
  std::vector<Tensor> in{Tensor::randn({3, 8}, 1), Tensor::randn({16, 8}, 2), Tensor::randn({16}, 3),
                         Tensor::randn({8, 16}, 4)};
  auto before = run_reference(g, in, {});
  auto before_cpu = run_graph_once(cpu_backend(), g, in, {});
  std::size_t nodes = g.nodes.size();
  Graph f = g;
  EXPECT_EQ(fuse_linear_activations(f), 3);  // gelu, relu and the final tanh-gelu
  EXPECT_EQ(f.nodes.size(), nodes - 3);
  int fused_gelu = 0, fused_tanh = 0, fused_relu = 0, plain_silu = 0;
  for (const auto& n : f.nodes) {
    if (n.op == OpKind::Linear && n.attrs.s("activation", "none") == "gelu") ++fused_gelu;
    if (n.op == OpKind::Linear && n.attrs.s("activation", "none") == "gelu_tanh") ++fused_tanh;
    if (n.op == OpKind::Linear && n.attrs.s("activation", "none") == "relu") ++fused_relu;
    if (n.op == OpKind::Silu) ++plain_silu;
  }
  EXPECT_EQ(fused_relu, 1);
  EXPECT_EQ(fused_gelu, 1);
  EXPECT_EQ(fused_tanh, 1);
  EXPECT_EQ(plain_silu, 1);  // its input is also a graph output
  auto after = run_reference(f, in, {});
  auto after_cpu = run_graph_once(cpu_backend(), f, in, {});
  ASSERT_EQ(after.size(), before.size());
  for (std::size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(tensors_close(after[i], before[i], 1e-6, 1e-6)) << "output " << i;
    EXPECT_TRUE(tensors_close(after_cpu[i], before_cpu[i], 1e-5, 1e-5)) << "cpu output " << i;
  }
}

// Conv2d + AdaptiveAvgPool2d((1, 1)) become one conv2d_global_avg_pool node where the conv's
// result has no other reader; the values stay those of the unfused graph (reference and cpu).
TEST(Fuse, FoldsGlobalAvgPoolIntoConvWhereSafe) {
  Graph g = trace_function(
      {}, {{"x", {Shape{2, 3, 12, 9}, DType::Float32}}, {"w", {Shape{8, 3, 3, 3}, DType::Float32}},
           {"b", {Shape{8}, DType::Float32}}},
      [](const std::vector<Var>& in) {
        Var pooled = F::adaptive_avg_pool2d(F::conv2d(in[0], in[1], in[2], {1, 1}, {1, 1}, {1, 1}, 1),
                                            {1, 1});                            // fusable
        Var c2 = F::conv2d(in[0], in[1], std::nullopt, {2, 2}, {0, 0}, {1, 1}, 1);
        Var not_global = F::adaptive_avg_pool2d(c2, {2, 2});                    // not global
        Var c3 = F::conv2d(in[0], in[1], in[2], {1, 1}, {0, 0}, {1, 1}, 1);
        Var shared = F::adaptive_avg_pool2d(c3, {1, 1});                        // c3 also returned
        return std::vector<Var>{pooled, not_global, shared, c3};
      });
  std::vector<Tensor> in{Tensor::randn({2, 3, 12, 9}, 1), Tensor::randn({8, 3, 3, 3}, 2),
                         Tensor::randn({8}, 3)};
  auto before = run_reference(g, in, {});
  Graph f = g;
  EXPECT_EQ(fuse_conv_global_avg_pool(f), 1);
  EXPECT_EQ(f.nodes.size(), g.nodes.size() - 1);
  int fused = 0, convs = 0, pools = 0;
  for (const auto& n : f.nodes) {
    fused += n.op == OpKind::Conv2dGlobalAvgPool;
    convs += n.op == OpKind::Conv2d;
    pools += n.op == OpKind::AdaptiveAvgPool2d;
  }
  EXPECT_EQ(fused, 1);
  EXPECT_EQ(convs, 2);
  EXPECT_EQ(pools, 2);
  EXPECT_EQ(fuse_conv_global_avg_pool(f), 0);  // nothing left to fuse
  auto after = run_reference(f, in, {});
  auto after_cpu = run_graph_once(cpu_backend(), f, in, {});
  ASSERT_EQ(after.size(), before.size());
  for (std::size_t i = 0; i < before.size(); ++i) {
    // The reference rounds the unfused conv to float32 before pooling, the fused op does not.
    EXPECT_TRUE(tensors_close(after[i], before[i], 1e-6, 1e-6)) << "output " << i;
    EXPECT_TRUE(tensors_close(after_cpu[i], before[i], 1e-4, 1e-5)) << "cpu output " << i;
  }
}

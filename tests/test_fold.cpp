// Folding linear chains (RuntimeConfig::fold_linear_chains, src/compiler/fold.h): the graph
// shrinks to cheaper ops whose results equal the unfolded graph's up to rounding (reference
// implementation and cpu backend), chains with something nonlinear or costlier folded are left
// alone, and the seed's pipeline compiled with the option matches PyTorch.
//
// Tolerances: the reference of the folded graph against the unfolded one at rtol 1e-5 / atol
// 1e-6 (both sum in double; the folded weights are rounded once to float32, where the unfolded
// graph rounds each stage's output); the cpu backend at the conformance float32 bound (rtol
// 1e-4, atol 1e-5); the seed against PyTorch at its test's 1e-4 / 1e-5.
#include <gtest/gtest.h>

#include <map>

#include "backend_conformance.h"
#include "backends/cpu/cpu_backend.h"
#include "compiler/artifact.h"
#include "compiler/fold.h"
#include "devpipe/functional.h"
#include "graph/reference.h"
#include "runtime/run_graph.h"
#include "test_util.h"
#include "vision_text/models.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

/// The checkpoint of a traced graph's parameters: random values by key.
std::map<std::string, Tensor> checkpoint_of(const Graph& g, std::uint64_t seed) {
  std::map<std::string, Tensor> ck;
  std::vector<Tensor> values = random_params(g, seed);
  for (std::size_t i = 0; i < g.params.size(); ++i) ck[g.params[i].key] = values[i];
  return ck;
}

/// The graph's parameters in its order: checkpoint tensors, or the folded constants.
std::vector<Tensor> params_of(const Graph& g, const std::map<std::string, Tensor>& ck) {
  std::vector<Tensor> out;
  for (const GraphParam& p : g.params) out.push_back(p.constant ? g.constants.at(p.key) : ck.at(p.key));
  return out;
}

ParamValueFn lookup(const std::map<std::string, Tensor>& ck) {
  return [&ck](const GraphParam& p) { return ck.at(p.key); };
}

int count_ops(const Graph& g, OpKind op) {
  int n = 0;
  for (const Node& node : g.nodes) n += node.op == op;
  return n;
}

/// conv (3x3, padding 1) -> global average pool -> flatten -> fc: the seed's vision stage.
Graph vision_like(const Shape& x, std::int64_t channels, std::int64_t out) {
  return trace(DType::Float32, {{"x", vi(x, DType::Float32)}}, [&](const std::vector<Var>& v) {
    Var h = F::conv2d(v[0], param("conv.weight", {channels, x[1], 3, 3}), param("conv.bias", {channels}),
                      {1, 1}, {1, 1}, {1, 1}, 1);
    h = F::flatten(F::adaptive_avg_pool2d(h, {1, 1}), 1);
    return std::vector<Var>{F::linear(h, param("fc.weight", {out, channels}), param("fc.bias", {out}))};
  });
}

}  // namespace

TEST(Fold, ConvPoolLinearBecomesPatchMeansAndOneLinear) {
  Graph g = vision_like({2, 3, 12, 9}, 16, 24);
  const auto ck = checkpoint_of(g, 7);
  const std::vector<Tensor> in = random_inputs(g, 3);
  const auto before = run_reference(g, in, params_of(g, ck));

  Graph f = g;
  FoldCounts n = fold_linear_chains(f, lookup(ck), true);
  EXPECT_EQ(n.patch_means, 1);
  EXPECT_EQ(n.linear_pairs, 1);  // the conv's Linear (27 -> 16) and fc (16 -> 24): 27*24 <= 27*16 + 16*24
  EXPECT_EQ(count_ops(f, OpKind::Conv2d), 0);
  EXPECT_EQ(count_ops(f, OpKind::AdaptiveAvgPool2d), 0);
  EXPECT_EQ(count_ops(f, OpKind::ConvPatchMean), 1);
  EXPECT_EQ(count_ops(f, OpKind::Linear), 1);
  // Only the folded weight [24, 27] and bias [24] are left, as constants.
  ASSERT_EQ(f.params.size(), 2u);
  for (const GraphParam& p : f.params) EXPECT_TRUE(p.constant) << p.key;
  EXPECT_EQ(f.params[0].key, "folded:fc.weight");
  EXPECT_EQ(f.params[0].full_shape, (Shape{24, 27}));
  EXPECT_EQ(f.params[1].key, "folded:fc.bias");
  EXPECT_EQ(f.constants.size(), 2u);

  const auto after = run_reference(f, in, params_of(f, ck));
  const auto after_cpu = run_graph_once(cpu_backend(), f, in, params_of(f, ck));
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].shape(), (Shape{2, 24}));
  EXPECT_TRUE(tensors_close(after[0], before[0], 1e-5, 1e-6));
  EXPECT_TRUE(tensors_close(after_cpu[0], before[0], 1e-4, 1e-5));
}

// Without the patch-mean kernel (the cuda backend) only Linear pairs fold; a strided, dilated
// conv folds with its geometry.
TEST(Fold, PatchMeansOnlyWhereAllowedAndForAnyGeometry) {
  Graph g = vision_like({1, 3, 8, 8}, 8, 8);
  const auto ck = checkpoint_of(g, 11);
  Graph f = g;
  EXPECT_EQ(fold_linear_chains(f, lookup(ck), false).total(), 0);
  EXPECT_EQ(count_ops(f, OpKind::Conv2d), 1);

  Graph s = trace(DType::Float32, {{"x", vi({2, 4, 13, 11}, DType::Float32)}}, [](const std::vector<Var>& v) {
    Var h = F::conv2d(v[0], param("c.w", {5, 4, 3, 2}), std::nullopt, {2, 3}, {2, 1}, {2, 1}, 1);
    return std::vector<Var>{F::adaptive_avg_pool2d(h, {1, 1})};
  });
  const auto cks = checkpoint_of(s, 5);
  const std::vector<Tensor> in = random_inputs(s, 9);
  const auto before = run_reference(s, in, params_of(s, cks));
  Graph fs = s;
  FoldCounts n = fold_linear_chains(fs, lookup(cks), true);
  EXPECT_EQ(n.patch_means, 1);
  EXPECT_EQ(n.linear_pairs, 0);
  const auto after = run_graph_once(cpu_backend(), fs, in, params_of(fs, cks));
  EXPECT_EQ(after[0].shape(), (Shape{2, 5, 1, 1}));
  EXPECT_TRUE(tensors_close(after[0], before[0], 1e-4, 1e-5));
}

TEST(Fold, LeavesNonlinearSharedCostlyAndShardedChainsAlone) {
  auto linear = [](Var x, const std::string& name, std::int64_t in, std::int64_t out) {
    return F::linear(x, param(name + ".weight", {out, in}), param(name + ".bias", {out}));
  };
  const TraceInputs x{{"x", vi({4, 16}, DType::Float32)}};
  struct Case {
    const char* what;
    TraceBody body;
  };
  const std::vector<Case> cases{
      {"a relu between", [&](const std::vector<Var>& v) { return std::vector<Var>{linear(F::relu(linear(v[0], "a", 16, 16)), "b", 16, 16)}; }},
      {"the first output also returned",
       [&](const std::vector<Var>& v) {
         Var h = linear(v[0], "a", 16, 16);
         return std::vector<Var>{linear(h, "b", 16, 16), h};
       }},
      {"a bottleneck (16 -> 4 -> 16: folding costs 256 > 128 multiply-adds per row)",
       [&](const std::vector<Var>& v) { return std::vector<Var>{linear(linear(v[0], "a", 16, 4), "b", 4, 16)}; }},
      {"a reshape that changes the shape",
       [&](const std::vector<Var>& v) {
         return std::vector<Var>{linear(F::reshape(linear(v[0], "a", 16, 16), {8, 8}), "b", 8, 8)};
       }},
  };
  for (const Case& c : cases) {
    Graph g = trace(DType::Float32, x, c.body);
    const auto ck = checkpoint_of(g, 1);
    const std::size_t nodes = g.nodes.size();
    EXPECT_EQ(fold_linear_chains(g, lookup(ck), true).total(), 0) << c.what;
    EXPECT_EQ(g.nodes.size(), nodes) << c.what;
  }
  // Control: the same chain with nothing between folds, and computes the same values.
  Graph g = trace(DType::Float32, x, [&](const std::vector<Var>& v) {
    return std::vector<Var>{linear(linear(linear(v[0], "a", 16, 16), "b", 16, 16), "c", 16, 8)};
  });
  const auto ck = checkpoint_of(g, 2);
  const std::vector<Tensor> in = random_inputs(g, 4);
  const auto before = run_reference(g, in, params_of(g, ck));
  EXPECT_EQ(fold_linear_chains(g, lookup(ck), true).linear_pairs, 2);
  EXPECT_EQ(count_ops(g, OpKind::Linear), 1);
  EXPECT_TRUE(tensors_close(run_reference(g, in, params_of(g, ck))[0], before[0], 1e-5, 1e-6));

  // The shards of a column-parallel layer (shard_dim 0 at tp 2) are not folded.
  Graph sh = trace(
      DType::Float32, x,
      [](const std::vector<Var>& v) {
        Var w = Tracer::current().parameter("a.weight", {16, 16}, 0);
        Var h = F::linear(v[0], w);
        return std::vector<Var>{F::linear(h, param("b.weight", {16, 8}))};
      },
      2);
  const auto cksh = checkpoint_of(sh, 3);
  EXPECT_EQ(fold_linear_chains(sh, [&](const GraphParam& p) { return cksh.at(p.key); }, true).total(), 0);
}

// The seed's pipeline compiled with fold_linear_chains against PyTorch (unfolded there), at tp 1
// and 2; the vision artifact holds the folded graph, and loading it without the option is
// refused naming it.
TEST(Fold, SeedPipelineFoldedMatchesPyTorch) {
  TempDir dir;
  ASSERT_TRUE(run_torch_script("vision_text_ref.py", "--out " + dir.str() + " --batch 4 --image 24"));
  auto io = safetensors::load_all(dir.str("io.safetensors"));
  for (int tp : {1, 2}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    InferenceConfig config = vision_text::seed_config(4, tp);
    config.set("image_size", std::int64_t{24});
    config.mutable_runtime_config().fold_linear_chains = true;
    vision_text::VisionModelApp vision_app(dir.str("vision"), config);
    vision_text::TextModelApp text_app(dir.str("text"), config);
    const std::string art = dir.str("compiled" + std::to_string(tp));
    vision_app.compile(art + "/vision");
    text_app.compile(art + "/text");
    vision_app.load(art + "/vision");
    text_app.load(art + "/text");
    const Manifest m = read_manifest(art + "/vision/vision_model");
    ASSERT_EQ(m.buckets.size(), 1u);
    EXPECT_EQ(count_ops(m.buckets[0].graph, OpKind::ConvPatchMean), 1);
    EXPECT_EQ(count_ops(m.buckets[0].graph, OpKind::Conv2d), 0);
    EXPECT_EQ(count_ops(m.buckets[0].graph, OpKind::Linear), 1);  // the conv's taps and fc, folded
    Output features = vision_app.forward(io.at("image"));
    Output out = text_app.forward(features, io.at("text"));
    EXPECT_TRUE(tensors_close(out.tensor(), io.at("output"), 1e-4, 1e-5));

    InferenceConfig plain = vision_text::seed_config(4, tp);
    plain.set("image_size", std::int64_t{24});
    vision_text::VisionModelApp unfolded(dir.str("vision"), plain);
    try {
      unfolded.load(art + "/vision");
      ADD_FAILURE() << "loading a folded artifact without fold_linear_chains succeeded";
    } catch (const ArtifactMismatch& e) {
      EXPECT_NE(std::string(e.what()).find("fold_linear_chains on"), std::string::npos) << e.what();
    }
  }
}

TEST(Fold, ConfigJsonCarriesTheOption) {
  InferenceConfig c = vision_text::seed_config(4, 1);
  EXPECT_EQ(c.to_json().find("fold_linear_chains"), std::string::npos);  // off: not written
  c.mutable_runtime_config().fold_linear_chains = true;
  InferenceConfig back = InferenceConfig::from_json(c.to_json());
  EXPECT_TRUE(back.runtime_config().fold_linear_chains);
  EXPECT_EQ(back, c);
  std::string bad = c.to_json();
  bad.replace(bad.find("\"fold_linear_chains\": true"), std::string("\"fold_linear_chains\": true").size(),
              "\"fold_linear_chains\": 1");
  try {
    InferenceConfig::from_json(bad);
    ADD_FAILURE() << "fold_linear_chains: 1 was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("runtime.fold_linear_chains must be true or false, got 1"), std::string::npos)
        << e.what();
  }
}

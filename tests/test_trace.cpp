// Tracing: module paths and state-dict keys, shape inference, and errors that name the module.
#include <gtest/gtest.h>

#include "devpipe/error.h"
#include "devpipe/nn.h"

using namespace devpipe;

namespace {

struct Mlp : nn::Module {
  nn::Linear fc1{8, 16};
  nn::Linear fc2{16, 4};
  Mlp() {
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }
  Var forward(Var x) const { return fc2(F::gelu(fc1(x))); }
};

struct Encoder : nn::Module {
  nn::ModuleList<Mlp>& layers;
  Encoder() : layers(register_module("layers", std::make_unique<nn::ModuleList<Mlp>>())) {
    layers.push_back(std::make_unique<Mlp>());
    layers.push_back(std::make_unique<Mlp>());
  }
};

struct Model : nn::Module {
  Encoder encoder;
  nn::LayerNorm norm{{4}};
  Model() {
    register_module("encoder", encoder);
    register_module("norm", norm);
  }
};

}  // namespace

TEST(Trace, StateDictKeysMatchPyTorch) {
  Model m;
  auto params = m.named_parameters();
  std::vector<std::string> keys;
  for (auto& p : params) keys.push_back(p.key);
  std::vector<std::string> want = {
      "encoder.layers.0.fc1.weight", "encoder.layers.0.fc1.bias", "encoder.layers.0.fc2.weight",
      "encoder.layers.0.fc2.bias",   "encoder.layers.1.fc1.weight", "encoder.layers.1.fc1.bias",
      "encoder.layers.1.fc2.weight", "encoder.layers.1.fc2.bias",   "norm.weight",
      "norm.bias"};
  EXPECT_EQ(keys, want);
  EXPECT_EQ(params[0].full_shape, (Shape{16, 8}));
  EXPECT_EQ(m.encoder.layers[1].fc2.path(), "encoder.layers.1.fc2");
}

TEST(Trace, RecordsGraphWithInferredShapes) {
  Mlp mlp;
  Graph g = trace_function({}, {{"x", {Shape{3, 8}, DType::Float32}}},
                           [&](const std::vector<Var>& in) { return std::vector<Var>{mlp.forward(in[0])}; });
  ASSERT_EQ(g.nodes.size(), 3u);
  EXPECT_EQ(g.nodes[0].op, OpKind::Linear);
  EXPECT_EQ(g.nodes[1].op, OpKind::Gelu);
  EXPECT_EQ(g.value(g.outputs[0]).shape, (Shape{3, 4}));
  ASSERT_EQ(g.params.size(), 4u);
  EXPECT_EQ(g.params[0].key, "fc1.weight");
  EXPECT_EQ(g.nodes[0].scope, "fc1");
  EXPECT_NE(g.to_text().find("linear"), std::string::npos);
}

TEST(Trace, LinearMismatchNamesModulePathAndShapes) {
  Model m;
  try {
    trace_function({.tag = "text_model"}, {{"x", {Shape{2, 9}, DType::Float32}}},
                   [&](const std::vector<Var>& in) {
                     return std::vector<Var>{m.encoder.layers[0].forward(in[0])};
                   });
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("[text_model]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("encoder.layers.0.fc1 (Linear)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 9]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("in_features=8"), std::string::npos) << msg;
  }
}

TEST(Trace, ConcatMismatchNamesShapes) {
  try {
    trace_function({}, {{"a", {Shape{2, 3}, DType::Float32}}, {"b", {Shape{4, 5}, DType::Float32}}},
                   [&](const std::vector<Var>& in) {
                     return std::vector<Var>{F::concat({in[0], in[1]}, 1)};
                   });
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("[2, 3], [4, 5]"), std::string::npos) << msg;
  }
}

TEST(Trace, WrongRankForConvNamesModule) {
  nn::Conv2d conv(3, 8, 3);
  struct Root : nn::Module {} root;
  root.register_module("conv", conv);
  try {
    trace_function({}, {{"x", {Shape{2, 3, 16}, DType::Float32}}},
                   [&](const std::vector<Var>& in) { return std::vector<Var>{conv(in[0])}; });
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("conv (Conv2d)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 3, 16]"), std::string::npos) << msg;
  }
}

TEST(Trace, ModelCodeOutsideTraceIsAnError) {
  nn::Linear fc(2, 3);
  EXPECT_THROW(fc.param("weight"), StateError);
}

TEST(Trace, ShardedParametersGetLocalShapes) {
  nn::ColumnParallelLinear col(8, 12, true, /*gather_output=*/false);
  nn::RowParallelLinear row(12, 8, true, /*input_is_parallel=*/true);
  struct Root : nn::Module {} root;
  root.register_module("col", col);
  root.register_module("row", row);
  Graph g = trace_function({.tp_degree = 4}, {{"x", {Shape{2, 8}, DType::Float32}}},
                           [&](const std::vector<Var>& in) {
                             return std::vector<Var>{row(col(in[0]))};
                           });
  EXPECT_EQ(g.value(g.params[0].value).shape, (Shape{3, 8}));   // col.weight
  EXPECT_EQ(g.value(g.params[1].value).shape, (Shape{3}));      // col.bias
  EXPECT_EQ(g.value(g.params[2].value).shape, (Shape{8, 3}));   // row.weight
  EXPECT_EQ(g.params[2].shard_dim, 1);
  EXPECT_EQ(g.value(g.outputs[0]).shape, (Shape{2, 8}));
  bool has_all_reduce = false;
  for (auto& n : g.nodes) has_all_reduce |= n.op == OpKind::AllReduce;
  EXPECT_TRUE(has_all_reduce);
}

TEST(Trace, IndivisibleShardIsAConfigError) {
  nn::ColumnParallelLinear col(8, 10, true, /*gather_output=*/false);
  struct Root : nn::Module {} root;
  root.register_module("col", col);
  try {
    trace_function({.tp_degree = 4}, {{"x", {Shape{2, 8}, DType::Float32}}},
                   [&](const std::vector<Var>& in) { return std::vector<Var>{col(in[0])}; });
    FAIL();
  } catch (const ConfigError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("col.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("tp_degree=4"), std::string::npos) << msg;
  }
}

// Bad input to the pipeline runtime is an exception naming the stage, the argument and what
// was expected against what came — never a crash or a silent drop.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "pipeline_util.h"
#include "test_util.h"
#include "vision_text/models.h"

using namespace devpipe;
using namespace devpipe::testing;
using vision_text::TextModel;

namespace {

InferenceConfig small_config(int tp = 2, DType dtype = DType::Float32) {
  return InferenceConfig(RuntimeConfig{.batch_size = 4, .dtype = dtype, .tp_degree = tp},
                         {{"vision_embedding_size", 8},
                          {"text_input_size", 4},
                          {"text_embedding_size", 8},
                          {"output_size", 6}});
}

std::unique_ptr<TestWrapper<TextModel>> text_wrapper(const InferenceConfig& c, bool ranked_out = false,
                                                     std::string tag = "text_model") {
  return std::make_unique<TestWrapper<TextModel>>(
      c, WrapperOptions{.pipeline_execution = true, .return_ranked_to_cpu = !ranked_out, .tag = std::move(tag)},
      std::vector<std::vector<Tensor>>{{Tensor::zeros({4, 8}), Tensor::zeros({4, 4})}},
      std::vector<std::string>{"vision_features", "text_input"});
}

/// Writes a checkpoint for TextModel(config) into dir/ckpt and returns its path.
std::string write_ckpt(const TempDir& dir, const InferenceConfig& c,
                       std::vector<std::pair<std::string, Tensor>> extra = {}, const std::string& drop = "") {
  TextModel m(c);
  auto sd = nn::random_state_dict(m, 3);
  std::vector<std::pair<std::string, Tensor>> kept;
  for (auto& kv : sd) {
    if (kv.first != drop) kept.push_back(kv);
  }
  for (auto& kv : extra) kept.push_back(kv);
  std::filesystem::create_directories(dir.str("ckpt"));
  safetensors::save(dir.str("ckpt/model.safetensors"), kept);
  return dir.str("ckpt");
}

class Loaded : public ::testing::Test {
 protected:
  void SetUp() override {
    w = text_wrapper(small_config());
    w->compile(write_ckpt(dir, small_config()), dir.str("art"));
    w->load(dir.str("art"));
  }
  TempDir dir;
  std::unique_ptr<TestWrapper<TextModel>> w;
};

}  // namespace

TEST(PipelineErrors, ForwardBeforeLoad) {
  auto w = text_wrapper(small_config());
  auto msg = message_of<StateError>([&] { w->forward({Tensor::zeros({4, 8}), Tensor::zeros({4, 4})}); });
  EXPECT_HAS(msg, "[text_model]");
  EXPECT_HAS(msg, "before load()");
}

TEST_F(Loaded, WorksWithGoodInput) {
  Output o = w->forward({Tensor::randn({3, 8}, 1), Tensor::randn({3, 4}, 2)});
  EXPECT_EQ(o.shape(), (Shape{3, 6}));
}

TEST_F(Loaded, WrongNumberOfInputs) {
  auto msg = message_of<InvalidArgument>([&] { w->forward({Tensor::zeros({4, 8})}); });
  EXPECT_HAS(msg, "[text_model]");
  EXPECT_HAS(msg, "got 1 input(s), expected 2");
  EXPECT_HAS(msg, "text_input");
}

TEST_F(Loaded, WrongShape) {
  auto msg = message_of<ShapeError>([&] { w->forward({Tensor::zeros({4, 8}), Tensor::zeros({4, 5})}); });
  EXPECT_HAS(msg, "[text_model]");
  EXPECT_HAS(msg, "'text_input'");
  EXPECT_HAS(msg, "[4, 5]");
  EXPECT_HAS(msg, "expected [4, 4]");
}

TEST_F(Loaded, MismatchedBatches) {
  auto msg = message_of<ShapeError>([&] { w->forward({Tensor::zeros({4, 8}), Tensor::zeros({3, 4})}); });
  EXPECT_HAS(msg, "batch 3");
  EXPECT_HAS(msg, "batch 4");
}

TEST_F(Loaded, WrongDtype) {
  auto msg = message_of<DTypeError>([&] {
    w->forward({Tensor::zeros({4, 8}), Tensor::randint({4, 4}, 3, 1)});
  });
  EXPECT_HAS(msg, "('text_input') is int64, expected float32");
}

TEST_F(Loaded, RankedFromAnotherTpDegree) {
  auto c4 = small_config(4);
  TempDir d4;
  auto producer = text_wrapper(c4, /*ranked_out=*/true, "producer");
  // A producer whose single output ([b, 6]) is fed where [b, 8] is expected would also be a
  // shape error; the rank count is checked first.
  producer->compile(write_ckpt(d4, c4), d4.str("art"));
  producer->load(d4.str("art"));
  Output ranked = producer->forward({Tensor::zeros({4, 8}), Tensor::zeros({4, 4})});
  auto msg = message_of<InvalidArgument>([&] { w->forward({ranked, Tensor::zeros({4, 4})}); });
  EXPECT_HAS(msg, "from 'producer' have 4 ranks, this stage has tp_degree 2");
}

TEST_F(Loaded, RankedOnAnotherDevice) {
  static float storage[2][4 * 8];
  std::vector<std::vector<Tensor>> per_rank;
  std::vector<std::shared_ptr<detail::EventState>> ready;
  for (int r = 0; r < 2; ++r) {
    per_rank.push_back({Tensor::from_blob(storage[r], {4, 8}, DType::Float32, Device::cuda(r), nullptr)});
  }
  // Events are runtime objects; a producer on another device is simulated by a finished
  // ranked output of this runtime with its tensors swapped for foreign-device ones.
  auto real = text_wrapper(small_config(), true, "other");
  TempDir d;
  real->compile(write_ckpt(d, small_config()), d.str("art"));
  real->load(d.str("art"));
  Output o = real->forward({Tensor::zeros({4, 8}), Tensor::zeros({4, 4})});
  o.ranked().wait();
  for (int r = 0; r < 2; ++r) ready.push_back(o.ranked().ready(r));
  RankedTensors foreign(per_rank, 4, "gpu_stage", ready);
  auto msg = message_of<InvalidArgument>([&] { w->forward({foreign, Tensor::zeros({4, 4})}); });
  EXPECT_HAS(msg, "lives on cuda:0");
  EXPECT_HAS(msg, "runs on cpu:0");
}

TEST(PipelineErrors, CheckpointMissingAndLeftoverTensorsAreListed) {
  TempDir dir;
  auto c = small_config();
  auto ckpt = write_ckpt(dir, c, {{"stray.weight", Tensor::zeros({2})}}, /*drop=*/"fusion.bias");
  auto w = text_wrapper(c);
  auto msg = message_of<InvalidArgument>([&] { w->compile(ckpt, dir.str("art")); });
  EXPECT_HAS(msg, "[text_model]");
  EXPECT_HAS(msg, "missing 1 tensor(s): fusion.bias");
  EXPECT_HAS(msg, "unused 1 tensor(s): stray.weight");
}

TEST(PipelineErrors, CheckpointShapeMismatch) {
  TempDir dir;
  auto c = small_config();
  auto ckpt = write_ckpt(dir, c);
  auto big = small_config();
  big.set("output_size", 10);
  auto w = text_wrapper(big);
  auto msg = message_of<ShapeError>([&] { w->compile(ckpt, dir.str("art")); });
  EXPECT_HAS(msg, "'fusion.weight' has shape [6, 16] but the model declares [10, 16]");
}

TEST(PipelineErrors, ArtifactFromAnotherFormatVersion) {
  TempDir dir;
  auto c = small_config();
  auto w = text_wrapper(c);
  w->compile(write_ckpt(dir, c), dir.str("art"));
  auto path = dir.str("art/manifest.json");
  nlohmann::json j;
  std::ifstream(path) >> j;
  j["format_version"] = 99;
  std::ofstream(path) << j.dump();
  auto msg = message_of<ArtifactMismatch>([&] { w->load(dir.str("art")); });
  EXPECT_HAS(msg, "format version 99");
  EXPECT_HAS(msg, "recompile");
}

TEST(PipelineErrors, ArtifactWithOtherTpDegreeOrDtypeOrTag) {
  TempDir dir;
  auto c = small_config(2);
  text_wrapper(c)->compile(write_ckpt(dir, c), dir.str("art"));
  auto msg = message_of<ArtifactMismatch>([&] { text_wrapper(small_config(4))->load(dir.str("art")); });
  EXPECT_HAS(msg, "tp_degree 2, but this wrapper has tp_degree 4");
  msg = message_of<ArtifactMismatch>([&] { text_wrapper(small_config(2, DType::BFloat16))->load(dir.str("art")); });
  EXPECT_HAS(msg, "dtype float32, but this wrapper has dtype bfloat16");
  msg = message_of<ArtifactMismatch>([&] { text_wrapper(c, false, "other_tag")->load(dir.str("art")); });
  EXPECT_HAS(msg, "tag 'text_model', but this wrapper has tag 'other_tag'");
}

TEST(PipelineErrors, TamperedManifestGraphIsRefused) {
  TempDir dir;
  auto c = small_config();
  auto w = text_wrapper(c);
  w->compile(write_ckpt(dir, c), dir.str("art"));
  auto path = dir.str("art/manifest.json");
  nlohmann::json orig;
  std::ifstream(path) >> orig;

  // An intermediate value whose recorded shape no longer matches its op.
  nlohmann::json j = orig;
  int v = j["buckets"][0]["graph"]["nodes"][0]["out"][0].get<int>();
  j["buckets"][0]["graph"]["values"][v][0] = std::vector<int>{4, 999};
  std::ofstream(path) << j.dump();
  auto msg = message_of<FormatError>([&] { w->load(dir.str("art")); });
  EXPECT_HAS(msg, "bucket 4");
  EXPECT_HAS(msg, "is recorded as [4, 999]");

  // Specs that disagree with the graph.
  j = orig;
  j["outputs"][0]["sample_shape"] = std::vector<int>{7};
  std::ofstream(path) << j.dump();
  msg = message_of<FormatError>([&] { w->load(dir.str("art")); });
  EXPECT_HAS(msg, "output 0 is [4, 6] in the graph but [4, 7] in the manifest's specs");

  // A node reading a value id that does not exist.
  j = orig;
  j["buckets"][0]["graph"]["nodes"][0]["in"][0] = 12345;
  std::ofstream(path) << j.dump();
  msg = message_of<FormatError>([&] { w->load(dir.str("art")); });
  EXPECT_HAS(msg, "%12345");
}

TEST(PipelineErrors, CorruptedWeightFile) {
  TempDir dir;
  auto c = small_config();
  auto w = text_wrapper(c);
  w->compile(write_ckpt(dir, c), dir.str("art"));
  auto path = dir.str("art/weights/rank1.safetensors");
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  auto msg = message_of<FormatError>([&] { w->load(dir.str("art")); });
  EXPECT_HAS(msg, "rank1.safetensors");
  EXPECT_HAS(msg, "corrupted");
}

TEST(PipelineErrors, NoArtifact) {
  TempDir dir;
  auto msg = message_of<IoError>([&] { text_wrapper(small_config())->load(dir.str("nothing")); });
  EXPECT_HAS(msg, "no compiled artifact");
}

TEST(PipelineErrors, MissingAndMistypedConfigAttributes) {
  InferenceConfig c(RuntimeConfig{},
                    {{"vision_embedding_size", "large"}, {"text_embedding_size", 8}, {"output_size", 6}});
  auto msg = message_of<ConfigError>([&] { TextModel m(c); });
  EXPECT_HAS(msg, "'text_input_size'");
  EXPECT_HAS(msg, "missing");
  msg = message_of<ConfigError>([&] { (void)c.get_int("vision_embedding_size"); });
  EXPECT_HAS(msg, "'vision_embedding_size' is a string, expected an int");
}

TEST(Config, JsonRoundTrip) {
  InferenceConfig c(RuntimeConfig{.batch_size = 32, .dtype = DType::BFloat16, .tp_degree = 2, .buckets = {8, 32}},
                    {{"a", 1}, {"b", 2.5}, {"c", "x"}, {"d", std::vector<std::int64_t>{1, 2}}, {"e", true}});
  TempDir dir;
  c.save(dir.str("c.json"));
  InferenceConfig back = InferenceConfig::load(dir.str("c.json"));
  EXPECT_EQ(back, c);
  EXPECT_EQ(back.get_float("b"), 2.5);
  EXPECT_THROW(InferenceConfig::from_json("{\"runtime\": {}}"), ConfigError);
  EXPECT_THROW(InferenceConfig(RuntimeConfig{.tp_degree = 0}), ConfigError);
}

// Checkpoints: a single file, a folder with model.safetensors, a sharded folder with an index,
// and the errors for missing keys, missing shards and bad indexes; PyTorch pickles refused with
// a conversion command that works; the wrapper's checkpoint key map and ignore list.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>

#include "devpipe/error.h"
#include "devpipe/safetensors.h"
#include "io/checkpoint.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
namespace st = devpipe::safetensors;
using devpipe::testing::TempDir;

namespace {

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

template <class E>
::testing::AssertionResult throws_with(const std::function<void()>& fn,
                                       const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const E& e) {
    std::string msg = e.what();
    for (const auto& n : needles) {
      if (msg.find(n) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << msg;
      }
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing thrown";
}

/// Writes a sharded checkpoint: w1, w2 in shard 1; w3 (bf16) in shard 2.
void write_sharded(const TempDir& dir, const std::string& extra_index_entry = "") {
  st::save(dir.str("model-00001-of-00002.safetensors"),
           {{"w1", Tensor::randn({2, 3}, 1)}, {"w2", Tensor::randn({4}, 2)}});
  st::save(dir.str("model-00002-of-00002.safetensors"),
           {{"w3", Tensor::randn({3}, 3, DType::BFloat16)}});
  write_text(dir.str("model.safetensors.index.json"),
             R"({"metadata": {"total_size": 52}, "weight_map": {)"
             R"("w1": "model-00001-of-00002.safetensors",)"
             R"("w2": "model-00001-of-00002.safetensors",)" +
                 extra_index_entry +
                 R"("w3": "model-00002-of-00002.safetensors"}})");
}

TEST(Checkpoint, SingleFile) {
  TempDir dir;
  std::string path = dir.str("weights.safetensors");
  Tensor b = Tensor::randn({5}, 2);
  st::save(path, {{"z.weight", Tensor::randn({2, 2}, 1)}, {"a.bias", b}});
  Checkpoint ck = Checkpoint::open(path);
  EXPECT_EQ(ck.path(), path);
  EXPECT_EQ(ck.keys(), (std::vector<std::string>{"a.bias", "z.weight"}));
  EXPECT_TRUE(ck.contains("a.bias"));
  EXPECT_FALSE(ck.contains("nope"));
  EXPECT_EQ(ck.get("a.bias").to_float_vector(), b.to_float_vector());
}

TEST(Checkpoint, FolderWithModelSafetensors) {
  TempDir dir;
  Tensor w = Tensor::randn({3, 3}, 4);
  st::save(dir.str("model.safetensors"), {{"w", w}});
  Checkpoint ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck.keys(), std::vector<std::string>{"w"});
  EXPECT_TRUE(devpipe::testing::tensors_close(ck.get("w"), w, 0, 0));
}

TEST(Checkpoint, ShardedFolderWithIndex) {
  TempDir dir;
  write_sharded(dir);
  Checkpoint ck = Checkpoint::open(dir.str());
  EXPECT_EQ(ck.keys(), (std::vector<std::string>{"w1", "w2", "w3"}));
  EXPECT_TRUE(devpipe::testing::tensors_close(ck.get("w1"), Tensor::randn({2, 3}, 1), 0, 0));
  EXPECT_TRUE(devpipe::testing::tensors_close(ck.get("w2"), Tensor::randn({4}, 2), 0, 0));
  Tensor w3 = ck.get("w3");
  EXPECT_EQ(w3.dtype(), DType::BFloat16);
  EXPECT_TRUE(devpipe::testing::tensors_close(w3, Tensor::randn({3}, 3, DType::BFloat16), 0, 0));
  // Copies share the opened files; views outlive the checkpoint.
  Tensor kept;
  {
    Checkpoint copy = ck;
    kept = copy.get("w1");
  }
  EXPECT_TRUE(kept.same_memory(ck.get("w1")));
}

TEST(Checkpoint, MissingKeyNamesKeyAndPath) {
  TempDir dir;
  write_sharded(dir);
  Checkpoint ck = Checkpoint::open(dir.str());
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { ck.get("w9"); }, {"'w9'", dir.str()}));
}

TEST(Checkpoint, MissingPathAndEmptyFolder) {
  TempDir dir;
  EXPECT_TRUE(throws_with<IoError>([&] { Checkpoint::open(dir.str("nothing")); },
                                   {dir.str("nothing"), "does not exist"}));
  EXPECT_TRUE(throws_with<IoError>(
      [&] { Checkpoint::open(dir.str()); },
      {dir.str(), "model.safetensors", "model.safetensors.index.json"}));
}

TEST(Checkpoint, MissingShardFile) {
  TempDir dir;
  write_sharded(dir, R"("w4": "model-00003-of-00002.safetensors",)");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {"'w4'", "model-00003-of-00002.safetensors",
                                        "does not exist"}));
}

TEST(Checkpoint, KeyMissingFromItsShard) {
  TempDir dir;
  write_sharded(dir, R"("w5": "model-00002-of-00002.safetensors",)");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {"'w5'", "model-00002-of-00002.safetensors",
                                        "has no tensor"}));
}

TEST(Checkpoint, ShardOutsideFolderIsRejected) {
  TempDir dir;
  write_sharded(dir, R"("w6": "../elsewhere.safetensors",)");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {"'w6'", "not a file inside the checkpoint folder"}));
}

TEST(Checkpoint, BadIndex) {
  TempDir dir;
  std::string index = dir.str("model.safetensors.index.json");
  write_text(index, "{\"weight_map\": {");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {index, "not valid JSON"}));
  write_text(index, "[]");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {index, "not a JSON object"}));
  write_text(index, R"({"metadata": {}})");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {index, "no \"weight_map\""}));
  write_text(index, R"({"weight_map": {"w": 3}})");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {index, "'w'", "not a file name"}));
}

TEST(Checkpoint, MalformedShardIsFormatError) {
  TempDir dir;
  write_sharded(dir);
  write_text(dir.str("model-00002-of-00002.safetensors"), "garbage!!");
  EXPECT_TRUE(throws_with<FormatError>([&] { Checkpoint::open(dir.str()); },
                                       {"model-00002-of-00002.safetensors"}));
}

}  // namespace

// ------------------------------------------------------- PyTorch pickles: refused, with a fix

namespace {

/// The command inside the message's `python3 -c ...` quote, run with Debian's PyTorch and the
/// stand-in safetensors module (tests/reference/safetensors_stub); returns its exit status.
int run_suggested_conversion(const std::string& msg) {
  auto start = msg.find("`python3 -c ");
  if (start == std::string::npos) return -1;
  auto end = msg.find('`', start + 1);
  if (end == std::string::npos) return -1;
  std::string cmd = msg.substr(start + 1, end - start - 1);
  cmd = "PYTHONPATH=" + std::string(DEVPIPE_REFERENCE_DIR) + "/safetensors_stub:" + DEVPIPE_REFERENCE_DIR + " " +
        DEVPIPE_TORCH_PYTHON + cmd.substr(std::string("python3").size());
  return std::system(cmd.c_str());
}

/// Every tensor of `expected_path` equals the checkpoint's, and the keys are the same.
void expect_same_tensors(const Checkpoint& ck, const std::string& expected_path) {
  auto expected = st::load_all(expected_path);
  std::vector<std::string> keys;
  for (const auto& [k, t] : expected) keys.push_back(k);
  EXPECT_EQ(ck.keys(), keys);
  for (const auto& [k, t] : expected) {
    if (ck.contains(k)) EXPECT_TRUE(devpipe::testing::tensors_close(ck.get(k), t, 0, 0)) << k;
  }
}

}  // namespace

TEST(CheckpointPickle, FolderWithOnlyPytorchModelBinSaysHowToConvert) {
  TempDir dir;
  ASSERT_TRUE(devpipe::testing::run_torch_script("pickle_ckpt.py", "--out " + dir.str()));
  std::string msg;
  EXPECT_TRUE(throws_with<Unsupported>([&] { Checkpoint::open(dir.str()); },
                                       {dir.str(), "holds only 'pytorch_model.bin'", "Convert it to",
                                        "model.safetensors", "python3 -c", "torch.load", "save_file"}));
  try {
    Checkpoint::open(dir.str());
  } catch (const Unsupported& e) {
    msg = e.what();
  }
  // The suggested command works: run it, and the folder opens with the pickle's tensors.
  ASSERT_EQ(run_suggested_conversion(msg), 0) << msg;
  expect_same_tensors(Checkpoint::open(dir.str()), dir.str("expected.safetensors"));
}

TEST(CheckpointPickle, ShardedPickleIndexSaysHowToConvert) {
  TempDir dir;
  ASSERT_TRUE(devpipe::testing::run_torch_script("pickle_ckpt.py", "--out " + dir.str() + " --sharded"));
  std::string msg;
  try {
    Checkpoint::open(dir.str());
  } catch (const Unsupported& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("holds only 'pytorch_model.bin.index.json' and its shards"), std::string::npos) << msg;
  ASSERT_EQ(run_suggested_conversion(msg), 0) << msg;
  expect_same_tensors(Checkpoint::open(dir.str()), dir.str("expected.safetensors"));
}

TEST(CheckpointPickle, PathToABinFileSaysHowToConvert) {
  TempDir dir;
  ASSERT_TRUE(devpipe::testing::run_torch_script("pickle_ckpt.py", "--out " + dir.str()));
  const std::string bin = dir.str("pytorch_model.bin");
  std::string msg;
  try {
    Checkpoint::open(bin);
  } catch (const Unsupported& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find(bin), std::string::npos) << msg;
  EXPECT_NE(msg.find("PyTorch pickle"), std::string::npos) << msg;
  ASSERT_EQ(run_suggested_conversion(msg), 0) << msg;
  expect_same_tensors(Checkpoint::open(dir.str("model.safetensors")), dir.str("expected.safetensors"));
}

TEST(CheckpointPickle, SafetensorsBesideAPickleIsRead) {
  TempDir dir;
  write_text(dir.str("pytorch_model.bin"), "not read");
  st::save(dir.str("model.safetensors"), {{"w", Tensor::randn({2}, 1)}});
  EXPECT_EQ(Checkpoint::open(dir.str()).keys(), std::vector<std::string>{"w"});
}

// ------------------------------------------- the wrapper's checkpoint key map and ignore list

namespace {

struct OneLinear : nn::Module {
  nn::Linear fc{3, 2};
  OneLinear() { register_module("fc", fc); }
  Var forward(Var x) const { return fc(x); }
};

// fc.weight [[1, 2, 3], [4, 5, 6]], fc.bias [0.5, -1] on x [[1, 0, -1], [2, 1, 0]]:
// y = x W^T + b = [[1 - 3 + 0.5, 4 - 6 - 1], [2 + 2 + 0.5, 8 + 5 - 1]] (exact in float32).
const Tensor kX = Tensor::from_vector({1, 0, -1, 2, 1, 0}, Shape{2, 3});
const std::vector<float> kY = {-1.5f, -3.0f, 4.5f, 12.0f};
Tensor weight() { return Tensor::from_vector({1, 2, 3, 4, 5, 6}, Shape{2, 3}); }
Tensor bias() { return Tensor::from_vector({0.5f, -1.0f}, Shape{2}); }

/// Compiles the checkpoint in `dir` with `options`, loads it and runs kX.
std::vector<float> compile_and_run(const TempDir& dir, WrapperOptions options) {
  InferenceConfig config(RuntimeConfig{.batch_size = 2});
  devpipe::testing::TestWrapper<OneLinear> w(config, std::move(options), {{kX}});
  w.compile(dir.str("ckpt.safetensors"), dir.str("compiled"));
  w.load(dir.str("compiled"));
  return w.forward({kX}).tensor(0).to_float_vector();
}

std::string strip_model_prefix(const std::string& key) {
  return key.rfind("model.", 0) == 0 ? key.substr(6) : key;
}

}  // namespace

TEST(CheckpointKeys, KeyMapRenamesCheckpointKeys) {
  TempDir dir;
  st::save(dir.str("ckpt.safetensors"), {{"model.fc.weight", weight()}, {"model.fc.bias", bias()}});
  EXPECT_EQ(compile_and_run(dir, {.tag = "renamed", .checkpoint_key_map = strip_model_prefix}), kY);
}

TEST(CheckpointKeys, KeyMapReturningEmptyDropsTheTensor) {
  TempDir dir;
  st::save(dir.str("ckpt.safetensors"),
           {{"fc.weight", weight()}, {"fc.bias", bias()}, {"optimizer.step", Tensor::zeros({1})}});
  auto drop_optimizer = [](const std::string& k) { return k.rfind("optimizer.", 0) == 0 ? std::string() : k; };
  EXPECT_EQ(compile_and_run(dir, {.tag = "dropped", .checkpoint_key_map = drop_optimizer}), kY);
}

TEST(CheckpointKeys, IgnoredExtraKeysAreDropped) {
  TempDir dir;
  st::save(dir.str("ckpt.safetensors"), {{"fc.weight", weight()},
                                         {"fc.bias", bias()},
                                         {"fc.rotary_emb.inv_freq", Tensor::ones({4})},
                                         {"lm_head.weight", Tensor::ones({2, 2})}});
  // Without the list, both extras are listed as unused.
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { compile_and_run(dir, {.tag = "strict"}); },
                                           {"[strict]", "unused 2 tensor(s): fc.rotary_emb.inv_freq, lm_head.weight",
                                            "ignore_checkpoint_keys"}));
  EXPECT_EQ(compile_and_run(dir, {.tag = "lenient", .ignore_checkpoint_keys = {R"(\.inv_freq$)", "^lm_head\\."}}), kY);
  // A pattern that matches a key the model uses does not drop it.
  EXPECT_EQ(compile_and_run(dir, {.tag = "broad", .ignore_checkpoint_keys = {"inv_freq", "lm_head", "fc"}}), kY);
}

TEST(CheckpointKeys, MissingKeysAreStillAnErrorListingThem) {
  TempDir dir;
  st::save(dir.str("ckpt.safetensors"), {{"model.fc.weight", weight()}, {"model.head.bias", bias()}});
  EXPECT_TRUE(throws_with<InvalidArgument>(
      [&] {
        compile_and_run(dir, {.tag = "partial",
                              .ignore_checkpoint_keys = {"bias"},
                              .checkpoint_key_map = strip_model_prefix});
      },
      {"[partial]", dir.str("ckpt.safetensors"), "missing 1 tensor(s): fc.bias", "checkpoint_key_map"}));
  // An unused tensor is named with its checkpoint key and the key it was mapped to.
  EXPECT_TRUE(throws_with<InvalidArgument>(
      [&] { compile_and_run(dir, {.tag = "partial", .checkpoint_key_map = strip_model_prefix}); },
      {"missing 1 tensor(s): fc.bias", "unused 1 tensor(s): model.head.bias (mapped to head.bias)"}));
}

TEST(CheckpointKeys, TwoKeysMappedToOneIsAnError) {
  TempDir dir;
  st::save(dir.str("ckpt.safetensors"),
           {{"fc.weight", weight()}, {"fc.bias", bias()}, {"model.fc.bias", bias()}});
  EXPECT_TRUE(throws_with<InvalidArgument>(
      [&] { compile_and_run(dir, {.tag = "twice", .checkpoint_key_map = strip_model_prefix}); },
      {"[twice]", "'fc.bias' and 'model.fc.bias' both map to the model's 'fc.bias'"}));
}

TEST(CheckpointKeys, BadIgnorePatternIsAConfigErrorAtConstruction) {
  InferenceConfig config(RuntimeConfig{.batch_size = 2});
  EXPECT_TRUE(throws_with<ConfigError>(
      [&] {
        devpipe::testing::TestWrapper<OneLinear> w(config, {.tag = "bad", .ignore_checkpoint_keys = {"fc.(weight"}},
                                                   {{kX}});
      },
      {"ignore_checkpoint_keys", "'fc.(weight'", "not a valid regular expression"}));
}

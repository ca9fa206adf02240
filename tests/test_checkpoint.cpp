// Checkpoints: a single file, a folder with model.safetensors, a sharded folder with an index,
// and the errors for missing keys, missing shards and bad indexes.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <string>

#include "devpipe/error.h"
#include "devpipe/safetensors.h"
#include "io/checkpoint.h"
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

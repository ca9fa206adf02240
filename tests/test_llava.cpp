// The vision-language model (devpipe/models/llava.h: LlavaForConditionalGeneration with a
// Pixtral vision tower) against its PyTorch twin (tests/reference/pixtral_ref.py: HF's
// modeling_pixtral + modeling_llava in plain PyTorch, with HF's state-dict names, the vision
// tower run in HF's own form: every image's patches concatenated into one sequence with a
// block-diagonal mask, the features merged by masked_scatter, llama_ref's KV cache).
//
// Tiny random models: text hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300; vision hidden
// 32, 2 heads (head_dim 16), patch 4, grid of the config's image_size 32. Images are 16 x 12
// pixels (4 x 3 patches: a grid that is not square, so rows and columns of the 2D rotary
// embedding cannot be swapped unnoticed), one per prompt. Three prompts of 15, 19 and 14
// tokens (12 of them image tokens), context buckets 16 and 32, batch buckets 2 and 4.
//
// Tolerances, float32: rtol 1e-4, atol 1e-5 on every logit and image feature (devpipe and
// PyTorch sum in other orders over at most 128 terms; values have std ~1).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "devpipe/devpipe.h"
#include "devpipe/models/llava.h"
#include "lm_twin.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
using devpipe::models::GenerationConfig;
using devpipe::models::LlavaForConditionalGeneration;
using devpipe::models::LlavaOptions;

namespace {

constexpr double kRtol = 1e-4;
constexpr double kAtol = 1e-5;
constexpr double kBf16Rtol = 0.02;
constexpr double kBf16Atol = 0.1;
constexpr std::int64_t kNew = 12;
constexpr std::int64_t kImageToken = 10;
constexpr std::int64_t kHeight = 16, kWidth = 12, kPatch = 4;
constexpr std::int64_t kImageTokens = (kHeight / kPatch) * (kWidth / kPatch);
constexpr std::int64_t kImg = -100;  // stands for the image's run of image tokens
const std::vector<std::vector<std::int64_t>> kPrompts = {
    {1, kImg, 17, 42}, {1, 5, 9, kImg, 13, 21, 250, 14}, {1, kImg, 3}};

std::string prompts_arg() {
  std::string s;
  for (const auto& p : kPrompts) {
    if (!s.empty()) s += ";";
    for (std::size_t i = 0; i < p.size(); ++i) s += (i ? "," : "") + (p[i] == kImg ? std::string("img") : std::to_string(p[i]));
  }
  return s;
}

/// kPrompts with each image placeholder expanded to `n` image tokens.
std::vector<std::vector<std::int64_t>> expanded(std::int64_t n) {
  std::vector<std::vector<std::int64_t>> out;
  for (const auto& p : kPrompts) {
    std::vector<std::int64_t> e;
    for (std::int64_t id : p) {
      if (id == kImg) {
        e.insert(e.end(), static_cast<std::size_t>(n), kImageToken);
      } else {
        e.push_back(id);
      }
    }
    out.push_back(e);
  }
  return out;
}

class LlavaTest : public ::testing::Test {
 protected:
  // The twin's folders and outputs are made once per build tree (cached_twin_dir).
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const std::string ref = "pixtral_ref.py";
    const std::string run = " --prompts '" + prompts_arg() + "' --image-hw " + std::to_string(kHeight) + "x" +
                            std::to_string(kWidth) + " --max-new-tokens " + std::to_string(kNew) + " --greedy --ignore-eos";
    const std::string hub_model = " --patch 4 --image-size 32";
    const std::string new_model =
        " --patch 4 --image-size 32 --layout new --strategy default --feature-layer -2 --vision-layers 3 --vision-act silu --seed 1";
    const std::string quiet = " > /dev/null";
    twin_ = new std::filesystem::path(cached_twin_dir(
        "llava_twin", {ref, "llama_ref.py"}, run + hub_model + new_model + " bfloat16", [&](const std::filesystem::path& tmp) {
          auto at = [&](const std::string& name) { return (tmp / name).string(); };
          return run_torch_script(ref, "write-model " + at("hub") + hub_model + quiet) &&
                 run_torch_script(ref, "write-model " + at("new") + new_model + quiet) &&
                 run_torch_script(ref, "run " + at("hub") + run + " --out " + at("hub_f32") + quiet) &&
                 run_torch_script(ref, "run " + at("new") + run + " --out " + at("new_f32") + quiet) &&
                 run_torch_script(ref, "run " + at("hub") + run + " --dtype bfloat16 --out " + at("hub_bf16") + quiet);
        }));
    hub_ = new Twin(load_twin(twin("hub_f32")));
    new_ = new Twin(load_twin(twin("new_f32")));
    bf16_ = new Twin(load_twin(twin("hub_bf16")));
  }
  static std::string twin(const std::string& name) { return (*twin_ / name).string(); }
  static void TearDownTestSuite() {
    delete hub_;
    delete new_;
    delete bf16_;
    delete twin_;
    delete dir_;
  }

  static InferenceConfig config(const std::string& model, int tp, bool logits = true, DType dtype = DType::Float32) {
    RuntimeConfig rc{.batch_size = 4, .dtype = dtype, .tp_degree = tp};
    rc.buckets = {2, 4};
    LlavaOptions o;
    o.text.context_buckets = {16, 32};
    o.text.cache_buckets = {32, 64};
    o.text.max_length = 64;
    o.text.output_logits = logits;
    o.image_height = kHeight;
    o.image_width = kWidth;
    return models::llava_config(twin(model), rc, o);
  }

  static std::unique_ptr<LlavaForConditionalGeneration> app(const std::string& model, const InferenceConfig& c,
                                                            const std::string& name) {
    auto a = std::make_unique<LlavaForConditionalGeneration>(twin(model), c);
    a->compile(dir_->str(name));
    a->load(dir_->str(name));
    return a;
  }

  static GenerationConfig greedy(std::int64_t n = kNew) {
    GenerationConfig g;
    g.max_new_tokens = n;
    g.stop_at_eos = false;
    return g;
  }

  /// Every prefill and decode logit and every token against the twin.
  static void expect_matches(const models::GenerationResult& r, const Twin& tw,
                             const std::vector<std::vector<std::int64_t>>& prompts) {
    expect_generation_matches(r, tw, prompts, kNew, kRtol, kAtol);
  }

  static TempDir* dir_;
  static std::filesystem::path* twin_;
  static Twin* hub_;
  static Twin* new_;
  static Twin* bf16_;
};

TempDir* LlavaTest::dir_ = nullptr;
std::filesystem::path* LlavaTest::twin_ = nullptr;
Twin* LlavaTest::hub_ = nullptr;
Twin* LlavaTest::new_ = nullptr;
Twin* LlavaTest::bf16_ = nullptr;

}  // namespace

class LlavaTp : public LlavaTest, public ::testing::WithParamInterface<int> {};

// The Hub's layout, "full" features of the last layer, gelu: the vision stage's features (read
// back from its ranked output), the prefill and decode logits and the greedy ids equal the
// twin's at tp 1 and 2.
TEST_P(LlavaTp, ImageFeaturesLogitsAndTokensMatchTheTwin) {
  const int tp = GetParam();
  auto a = app("hub", config("hub", tp), "hub_tp" + std::to_string(tp));
  ASSERT_EQ(a->image_tokens(), kImageTokens);
  const auto prompts = expanded(kImageTokens);
  ASSERT_EQ(prompts, [] {
    std::vector<std::vector<std::int64_t>> want;
    for (std::int64_t b = 0; b < hub_->t.at("prompt_lengths").dim(0); ++b) {
      const std::int64_t len = hub_->t.at("prompt_lengths").data<std::int64_t>()[b];
      const std::int64_t* ids = hub_->t.at("prompt_ids").data<std::int64_t>() + b * hub_->t.at("prompt_ids").dim(1);
      want.emplace_back(ids, ids + len);
    }
    return want;
  }()) << "the twin expanded the prompts otherwise";
  const Tensor& pixels = hub_->t.at("pixel_values");

  const Output features = a->vision_encoder().forward({pixels});
  ASSERT_TRUE(features.is_ranked());
  EXPECT_EQ(features.ranked().num_ranks(), tp);
  const std::vector<Tensor> host = features.ranked().to_host();
  EXPECT_TRUE(tensors_close(host.at(0), hub_->t.at("image_features"), kRtol, kAtol));

  // The twin's greedy ids are not degenerate, so equal ids mean something.
  std::set<std::int64_t> distinct;
  for (const auto& s : hub_->generated) distinct.insert(s.begin(), s.end());
  EXPECT_GE(distinct.size(), 8u);
  expect_matches(a->generate(prompts, pixels, greedy()), *hub_, prompts);
}

INSTANTIATE_TEST_SUITE_P(Tp, LlavaTp, ::testing::Values(1, 2));

// transformers >= 4.52's layout, "default" selection (the first patch dropped: 11 image tokens)
// from hidden state -2 of 3 vision layers (the last layer's weights are skipped, not compiled),
// silu in the vision MLP, at tp 2.
TEST_F(LlavaTest, NewLayoutDefaultSelectionAndAnEarlierFeatureLayer) {
  auto a = app("new", config("new", 2), "new_tp2");
  ASSERT_EQ(a->image_tokens(), kImageTokens - 1);
  const auto prompts = expanded(kImageTokens - 1);
  const Output features = a->vision_encoder().forward({new_->t.at("pixel_values")});
  EXPECT_TRUE(tensors_close(features.ranked().to_host().at(0), new_->t.at("image_features"), kRtol, kAtol));
  expect_matches(a->generate(prompts, new_->t.at("pixel_values"), greedy()), *new_, prompts);
  // The skipped layer is not in the compiled vision stage; the layer before it is.
  const std::string graph = a->vision_encoder().graph_text(a->vision_encoder().loaded_buckets().front());
  EXPECT_NE(graph.find("vision_tower.transformer.layers.1.feed_forward.down_proj.weight"), std::string::npos);
  EXPECT_EQ(graph.find("vision_tower.transformer.layers.2."), std::string::npos);
}

// bfloat16 on both sides (devpipe's fused attention and norms keep float32 inside; PyTorch rounds
// every op's output): logits within the same tolerance as test_llama's bfloat16 case (atol 0.1 +
// rtol 0.02; measured worst 0.059 at tp 2), and token 0, before a near-tie can send the two sides
// down different sequences.
TEST_F(LlavaTest, BFloat16MatchesTheTwinWithinItsTolerance) {
  auto a = app("hub", config("hub", 2, true, DType::BFloat16), "bf16_tp2");
  const auto prompts = expanded(kImageTokens);
  auto r = a->generate(prompts, bf16_->t.at("pixel_values"), greedy(2));
  EXPECT_TRUE(tensors_close(prompt_rows(r.prefill_logits, prompts), prompt_rows(bf16_->t.at("prefill_logits"), prompts),
                            kBf16Rtol, kBf16Atol));
  for (std::size_t s = 0; s < prompts.size(); ++s) EXPECT_EQ(r.tokens[s][0], bf16_->generated[s][0]) << "sequence " << s;
}

// The image matters: another image gives other logits (and the same image gives the twin's).
TEST_F(LlavaTest, AnotherImageChangesTheAnswer) {
  auto a = app("hub", config("hub", 1), "other_image");
  const auto prompts = expanded(kImageTokens);
  const Tensor& pixels = hub_->t.at("pixel_values");
  Tensor other = Tensor::randn(pixels.shape(), 77);
  auto r = a->generate(prompts, other, greedy(2));
  EXPECT_FALSE(tensors_close(prompt_rows(r.prefill_logits, prompts), prompt_rows(hub_->t.at("prefill_logits"), prompts), 1e-2, 1e-2));
  auto same = a->generate(prompts, pixels, greedy(2));
  EXPECT_TRUE(tensors_close(prompt_rows(same.prefill_logits, prompts), prompt_rows(hub_->t.at("prefill_logits"), prompts), kRtol, kAtol));
}

// The features go from the vision stage to the prefill on the devices: the host sends the
// pixels and the prompts' inputs up, gets only token ids down, and nothing is copied between
// devices (the buckets agree, so the buffers are handed over).
TEST_F(LlavaTest, ImageFeaturesNeverReachTheHost) {
  auto a = app("hub", config("hub", 2, false), "ids_only");
  const auto prompts = expanded(kImageTokens);
  const std::int64_t n = 4, b = 3;
  reset_transfer_stats();
  auto r = a->generate(prompts, hub_->t.at("pixel_values"), greedy(n));
  const TransferStats st = transfer_stats();
  for (std::size_t s = 0; s < prompts.size(); ++s) {
    EXPECT_EQ(r.tokens[s], std::vector<std::int64_t>(hub_->generated[s].begin(), hub_->generated[s].begin() + n));
  }
  EXPECT_EQ(st.forwards, static_cast<std::uint64_t>(n + 1));  // vision + prefill + 3 decode steps
  EXPECT_EQ(st.device_to_host_bytes, static_cast<std::uint64_t>(n * b * 8));
  EXPECT_EQ(st.device_to_device_bytes, 0u);
  EXPECT_EQ(st.ranked_inputs_in_place, 2u);  // the features, on each of the 2 ranks
  EXPECT_EQ(st.ranked_inputs_copied, 0u);
  // Up, to each of the 2 ranks: the pixels; prefill ids, positions and image_pos1 [3, 19]
  // int64, last_index [3], sampling [3, 3], u [3]; decode steps as in test_llama.
  const std::uint64_t pixels = b * 3 * kHeight * kWidth * 4;
  const std::uint64_t prefill = b * 19 * 8 * 3 + b * 8 + b * 12 + b * 4;
  const std::uint64_t step = b * 8 * 2 + b * 12 + b * 4;
  std::uint64_t masks = 0;
  for (std::int64_t s = 1; s < n; ++s) masks += static_cast<std::uint64_t>(b * (19 + s) * 8);
  EXPECT_EQ(st.host_to_device_bytes, 2 * (pixels + prefill + (n - 1) * step + masks));
}

TEST_F(LlavaTest, BadRequestsAreRefusedNamingTheValuesAndLoseNothing) {
  auto a = app("hub", config("hub", 1, false), "errors");
  const auto prompts = expanded(kImageTokens);
  const Tensor& pixels = hub_->t.at("pixel_values");
  auto expect_error = [&](const std::vector<std::vector<std::int64_t>>& p, const Tensor& px,
                          const std::vector<std::string>& parts) {
    try {
      a->generate(p, px, greedy(3));
      ADD_FAILURE() << "accepted a bad request";
    } catch (const InvalidArgument& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  auto fewer = prompts;
  fewer[1].erase(std::find(fewer[1].begin(), fewer[1].end(), kImageToken));
  expect_error(fewer, pixels, {"sequence 1", "holds 11 image tokens (id 10)", "gives 12 features", "16 x 12 pixels"});
  auto text_only = prompts;
  text_only[2] = {1, 5, 6};
  expect_error(text_only, pixels, {"sequence 2", "holds 0 image tokens"});
  expect_error(prompts, Tensor::zeros({3, 3, 12, 16}), {"pixel_values is float32 [3, 3, 12, 16]", "expected float32 [3, 3, 16, 12]"});
  expect_error({prompts[0], prompts[1]}, pixels, {"expected float32 [2, 3, 16, 12]"});
  expect_error(prompts, pixels.to_dtype(DType::BFloat16), {"bfloat16", "expected float32"});
  // The text model's checks still hold (prompt lengths include the image tokens).
  std::vector<std::int64_t> long_prompt(21, 5);
  long_prompt.insert(long_prompt.begin(), prompts[0].begin(), prompts[0].end());
  expect_error({prompts[0], long_prompt, prompts[2]}, pixels, {"sequence 1", "36 tokens", "largest context bucket 32"});
  // Nothing was run or lost: the next request gives the twin's tokens.
  auto r = a->generate(prompts, pixels, greedy(4));
  for (std::size_t s = 0; s < prompts.size(); ++s) {
    EXPECT_EQ(r.tokens[s], std::vector<std::int64_t>(hub_->generated[s].begin(), hub_->generated[s].begin() + 4));
  }
}

// Config errors name the file, the key and the values.
TEST_F(LlavaTest, UnsupportedConfigsAreRefusedNamingTheKey) {
  const std::string src = twin("hub");
  auto with = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    const std::string d = dir_->str("cfg_" + name);
    std::filesystem::create_directories(d);
    std::ifstream in(src + "/config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    edit(j);
    std::ofstream(d + "/config.json") << j.dump(2);
    return d;
  };
  auto expect_config_error = [&](const std::string& dir, const LlavaOptions& o, int tp, const std::vector<std::string>& parts) {
    try {
      models::llava_config(dir, RuntimeConfig{.batch_size = 2, .tp_degree = tp}, o);
      ADD_FAILURE() << "accepted " << dir;
    } catch (const ConfigError& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  LlavaOptions o;
  o.text.context_buckets = {16, 32};
  o.text.max_length = 64;
  expect_config_error(with("clip", [](nlohmann::json& j) { j["vision_config"]["model_type"] = "clip_vision_model"; }), o, 1,
                      {"vision_config", "\"clip_vision_model\" is not supported"});
  expect_config_error(with("window", [](nlohmann::json& j) { j["text_config"]["sliding_window"] = 32; }), o, 1,
                      {"sliding_window 32", "shorter than max_length 64"});
  expect_config_error(with("layers", [](nlohmann::json& j) { j["vision_feature_layer"] = nlohmann::json::array({-1, -2}); }), o, 1,
                      {"\"vision_feature_layer\" [-1,-2] is not supported"});
  expect_config_error(with("layer", [](nlohmann::json& j) { j["vision_feature_layer"] = -4; }), o, 1,
                      {"\"vision_feature_layer\" -4", "3 hidden states [-3, 2]"});
  expect_config_error(with("token", [](nlohmann::json& j) { j["image_token_index"] = 300; }), o, 1,
                      {"\"image_token_index\" 300", "[0, 300)"});
  expect_config_error(with("act", [](nlohmann::json& j) { j["projector_hidden_act"] = "quick_gelu"; }), o, 1,
                      {"\"projector_hidden_act\" \"quick_gelu\" is not supported"});
  LlavaOptions odd = o;
  odd.image_height = 18;
  expect_config_error(src, odd, 1, {"image_height 18", "multiple of patch_size 4", "image_size 32"});
  odd.image_height = 36;
  expect_config_error(src, odd, 1, {"image_height 36"});
  expect_config_error(src, o, 4, {"vision num_attention_heads 2", "tp_degree 4"});
  // A window that covers the cache is plain causal attention: accepted.
  EXPECT_NO_THROW(models::llava_config(with("wide_window", [](nlohmann::json& j) { j["text_config"]["sliding_window"] = 64; }),
                                       RuntimeConfig{.batch_size = 2}, o));
}

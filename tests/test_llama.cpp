// The Llama causal LM (devpipe/models/llama.h) against its PyTorch twin
// (tests/reference/llama_ref.py: HF LlamaForCausalLM in plain PyTorch with HF's state-dict
// names and its own KV cache).
//
// A tiny random model (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 300, "wide" init so
// greedy tokens vary), a batch of 3 prompts of lengths 5, 11 and 20 (context buckets 16 and 32:
// the batch pads to seq 32 and batch 4), 33 new tokens. At tp 1, 2 and 4 the KV heads are split
// (tp 1, 2) and replicated (tp 4: each rank keeps the one KV head its query heads use).
//
// Tolerances. float32: rtol 1e-4, atol 1e-5 on every logit (devpipe and PyTorch sum in
// different orders over at most 128 terms; logits have std ~1; measured worst 2e-6).
// bfloat16: both sides compute in bfloat16 but round at different places (devpipe's fused
// attention and RMSNorm keep float32 inside, PyTorch rounds each op's output), so logits of
// magnitude ~2-3 differ by a few bfloat16 ulps (0.0156 there): atol 0.1 + rtol 0.02 (measured
// worst 0.047 at tp 2), on the prefill and the first decode step; greedy tokens are compared on
// the first token, before a near-tie can send the two sides down different sequences.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <nlohmann/json.hpp>

#include "compiler/artifact.h"
#include "compiler/memory_plan.h"
#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"
#include "lm_twin.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
using devpipe::models::GenerationConfig;
using devpipe::models::LlamaForCausalLM;
using devpipe::models::LlamaOptions;

namespace {

constexpr double kRtol = 1e-4;
constexpr double kAtol = 1e-5;
constexpr double kBf16Rtol = 0.02;
constexpr double kBf16Atol = 0.1;
constexpr std::int64_t kNew = 33;
const std::vector<std::vector<std::int64_t>> kPrompts = {
    {1, 17, 42, 7, 99},
    {1, 150, 3, 3, 8, 21, 250, 14, 60, 61, 62},
    {1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77}};

// Shorter prompts (3, 6 and 10 tokens) whose 40 new tokens cross the cache buckets 16 -> 32
// -> 64: after decode step s the longest live sequence holds 10 + s positions (11 .. 49).
constexpr std::int64_t kShortNew = 40;
const std::vector<std::vector<std::int64_t>> kShort = {
    {1, 42, 7}, {1, 150, 3, 8, 21, 250}, {1, 5, 9, 13, 17, 21, 25, 29, 33, 37}};
const std::vector<std::int64_t> kCacheBuckets = {16, 32, 64};

std::string prompts_arg(const std::vector<std::vector<std::int64_t>>& prompts = kPrompts) {
  std::string s;
  for (const auto& p : prompts) {
    if (!s.empty()) s += ";";
    for (std::size_t i = 0; i < p.size(); ++i) s += (i ? "," : "") + std::to_string(p[i]);
  }
  return s;
}

class LlamaTest : public ::testing::Test {
 protected:
  // The twin's folders and outputs are made once per build tree (cached_twin_dir).
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const std::string ref = "llama_ref.py";
    const std::string run = " --prompts '" + prompts_arg() + "' --max-new-tokens " + std::to_string(kNew) + " --greedy --ignore-eos";
    const std::string run_short =
        " --prompts '" + prompts_arg(kShort) + "' --max-new-tokens " + std::to_string(kShortNew) + " --greedy --ignore-eos";
    const std::string quiet = " > /dev/null";
    twin_ = new std::filesystem::path(cached_twin_dir("llama_twin", {ref}, run + run_short, [&](const std::filesystem::path& tmp) {
      auto at = [&](const std::string& name) { return (tmp / name).string(); };
      return run_torch_script(ref, "write-model " + at("untied") + quiet) &&
             run_torch_script(ref, "write-model " + at("tied") + " --tie --shards 2 --seed 1" + quiet) &&
             run_torch_script(ref, "run " + at("untied") + run + " --out " + at("untied_f32") + quiet) &&
             run_torch_script(ref, "run " + at("untied") + run + " --dtype bfloat16 --out " + at("untied_bf16") + quiet) &&
             run_torch_script(ref, "run " + at("tied") + run + " --out " + at("tied_f32") + quiet) &&
             run_torch_script(ref, "run " + at("untied") + run_short + " --out " + at("short_f32") + quiet);
    }));
    f32_ = new Twin(load_twin(twin("untied_f32")));
    bf16_ = new Twin(load_twin(twin("untied_bf16")));
    tied_ = new Twin(load_twin(twin("tied_f32")));
    short_ = new Twin(load_twin(twin("short_f32")));
  }
  static std::string twin(const std::string& name) { return (*twin_ / name).string(); }
  static void TearDownTestSuite() {
    delete f32_;
    delete bf16_;
    delete tied_;
    delete short_;
    delete twin_;
    delete dir_;
  }

  // Batch buckets 2 and 4, context buckets 16 and 32, cache buckets 16, 32 and 64 (kPrompts'
  // decode steps run in 32 and 64).
  static InferenceConfig config(const std::string& model, int tp, DType dtype = DType::Float32, bool logits = true,
                                std::vector<std::int64_t> cache_buckets = kCacheBuckets) {
    RuntimeConfig rc{.batch_size = 4, .dtype = dtype, .tp_degree = tp};
    rc.buckets = {2, 4};
    LlamaOptions o;
    o.context_buckets = {16, 32};
    o.cache_buckets = std::move(cache_buckets);
    o.max_length = 64;
    o.output_logits = logits;
    return models::llama_config(twin(model), rc, o);
  }

  static std::unique_ptr<LlamaForCausalLM> app(const std::string& model, const InferenceConfig& c, const std::string& name) {
    auto a = std::make_unique<LlamaForCausalLM>(twin(model), c);
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
  static void expect_matches(const models::GenerationResult& r, const Twin& tw, double rtol, double atol) {
    expect_generation_matches(r, tw, kPrompts, kNew, rtol, atol);
  }

  static TempDir* dir_;
  static std::filesystem::path* twin_;
  static Twin* f32_;
  static Twin* bf16_;
  static Twin* tied_;
  static Twin* short_;
};

TempDir* LlamaTest::dir_ = nullptr;
std::filesystem::path* LlamaTest::twin_ = nullptr;
Twin* LlamaTest::f32_ = nullptr;
Twin* LlamaTest::bf16_ = nullptr;
Twin* LlamaTest::tied_ = nullptr;
Twin* LlamaTest::short_ = nullptr;

}  // namespace

class LlamaTp : public LlamaTest, public ::testing::WithParamInterface<int> {};

TEST_P(LlamaTp, PrefillAndEveryDecodeStepMatchTheTwin) {
  const int tp = GetParam();
  auto a = app("untied", config("untied", tp), "f32_tp" + std::to_string(tp));
  // The twin's greedy ids are not degenerate, so equal ids mean something.
  std::set<std::int64_t> distinct;
  for (const auto& s : f32_->generated) distinct.insert(s.begin(), s.end());
  EXPECT_GE(distinct.size(), 16u);
  auto r = a->generate(kPrompts, greedy());
  expect_matches(r, *f32_, kRtol, kAtol);
  EXPECT_EQ(r.generated, 3 * kNew);
}

INSTANTIATE_TEST_SUITE_P(Tp, LlamaTp, ::testing::Values(1, 2, 4));

TEST_F(LlamaTest, TiedEmbeddingsAndShardedCheckpointAtTp2) {
  auto a = app("tied", config("tied", 2), "tied_tp2");
  expect_matches(a->generate(kPrompts, greedy()), *tied_, kRtol, kAtol);
}

TEST_F(LlamaTest, BFloat16MatchesTheTwinWithinItsTolerance) {
  auto a = app("untied", config("untied", 2, DType::BFloat16), "bf16_tp2");
  auto r = a->generate(kPrompts, greedy());
  const Tensor& want = bf16_->t.at("prefill_logits");
  EXPECT_TRUE(tensors_close(prompt_rows(r.prefill_logits, kPrompts), prompt_rows(want, kPrompts),
                            kBf16Rtol, kBf16Atol));
  // Token 0 and the first decode step, before sequences can drift apart at a near-tie.
  for (std::size_t s = 0; s < kPrompts.size(); ++s) {
    ASSERT_GE(r.tokens[s].size(), 2u);
    EXPECT_EQ(r.tokens[s][0], bf16_->generated[s][0]) << "sequence " << s;
  }
  EXPECT_TRUE(tensors_close(r.decode_logits[0], decode_step(bf16_->t.at("decode_logits"), 0), kBf16Rtol, kBf16Atol));
}

TEST_F(LlamaTest, OnlyTokenIdsCrossToTheHost) {
  // Without logits outputs, each step moves the step's inputs up and one int64 per sequence
  // down; the KV cache (2 layers x 2 x [4, 1, 64, 16] float32 per rank) never moves.
  auto a = app("untied", config("untied", 2, DType::Float32, false), "ids_only");
  const std::int64_t n = 8, b = 3;
  reset_transfer_stats();
  auto r = a->generate(kPrompts, greedy(n));
  TransferStats st = transfer_stats();
  for (std::size_t s = 0; s < kPrompts.size(); ++s) {
    EXPECT_EQ(r.tokens[s], std::vector<std::int64_t>(f32_->generated[s].begin(), f32_->generated[s].begin() + n));
  }
  EXPECT_EQ(st.forwards, static_cast<std::uint64_t>(n));  // 1 prefill + 7 decode steps
  EXPECT_EQ(st.device_to_host_bytes, static_cast<std::uint64_t>(n * b * 8));
  // Up, to each of the 2 ranks: prefill ids and positions [3, 20] int64, last_index [3],
  // sampling [3, 3] and u [3] float32; decode step s ids and positions [3, 1], the attention
  // mask [3, 20 + s] int64 (its padding to the bucket is zero-filled there, not copied),
  // sampling, u.
  const std::uint64_t prefill = b * 20 * 8 * 2 + b * 8 + b * 12 + b * 4;
  const std::uint64_t step = b * 8 * 2 + b * 12 + b * 4;
  std::uint64_t masks = 0;
  for (std::int64_t s = 1; s < n; ++s) masks += static_cast<std::uint64_t>(b * (20 + s) * 8);
  EXPECT_EQ(st.host_to_device_bytes, 2 * (prefill + (n - 1) * step + masks));
  EXPECT_EQ(st.device_to_device_bytes, 0u);
  EXPECT_EQ(a->state_store()->entries().size(), 4u);  // k and v of 2 layers
}

TEST_F(LlamaTest, StreamsEveryTokenAndStopsAtEos) {
  InferenceConfig c = config("untied", 2, DType::Float32, false);
  // Make the token sequence 0 generates at step 4 the eos: each sequence stops right after its
  // first occurrence of it (which the twin's untruncated ids tell).
  const std::int64_t eos = f32_->generated[0][4];
  c.set("eos_token_id", std::vector<std::int64_t>{eos});
  auto a = app("untied", c, "eos");
  std::vector<std::vector<std::int64_t>> streamed(kPrompts.size());
  GenerationConfig g = greedy();
  g.stop_at_eos = true;
  auto r = a->generate(kPrompts, g, [&](std::int64_t s, std::int64_t id) { streamed[static_cast<std::size_t>(s)].push_back(id); });
  EXPECT_EQ(streamed, r.tokens);
  for (std::size_t s = 0; s < kPrompts.size(); ++s) {
    const auto& full = f32_->generated[s];
    auto stop = std::find(full.begin(), full.end(), eos);
    std::vector<std::int64_t> want(full.begin(), stop == full.end() ? full.end() : stop + 1);
    EXPECT_EQ(r.tokens[s], want) << "sequence " << s;
  }
  EXPECT_EQ(r.tokens[0].size(), 5u);
}

TEST_F(LlamaTest, SamplingOnTheDevice) {
  auto a = app("untied", config("untied", 2, DType::Float32, false), "sampling");
  const std::int64_t n = 12;
  auto first = [&](std::int64_t k) {
    std::vector<std::vector<std::int64_t>> w;
    for (const auto& s : f32_->generated) w.emplace_back(s.begin(), s.begin() + k);
    return w;
  };
  // top_k 1 and a tiny top_p keep only the best token: greedy, whatever the draws.
  GenerationConfig g = greedy(n);
  g.temperature = 1.0;
  g.top_k = 1;
  g.seed = 5;
  EXPECT_EQ(a->generate(kPrompts, g).tokens, first(n));
  g.top_k = 0;
  g.top_p = 1e-6;
  EXPECT_EQ(a->generate(kPrompts, g).tokens, first(n));
  // A seed fixes the draws: the same seed repeats, another seed gives another sample.
  g.top_p = 1.0;
  g.temperature = 1.5;
  auto s1 = a->generate(kPrompts, g).tokens;
  auto s2 = a->generate(kPrompts, g).tokens;
  g.seed = 6;
  auto s3 = a->generate(kPrompts, g).tokens;
  EXPECT_EQ(s1, s2);
  EXPECT_NE(s1, s3);
  EXPECT_NE(s1, first(n));
}

TEST_F(LlamaTest, BadRequestsAreRefusedNamingTheValuesAndLoseNothing) {
  auto a = app("untied", config("untied", 2, DType::Float32, false), "errors");
  auto expect_error = [&](const std::vector<std::vector<std::int64_t>>& prompts, std::int64_t n,
                          const std::vector<std::string>& parts) {
    try {
      a->generate(prompts, greedy(n));
      ADD_FAILURE() << "accepted a bad request";
    } catch (const InvalidArgument& e) {
      for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  };
  std::vector<std::int64_t> long_prompt(33, 5);
  expect_error({kPrompts[0], long_prompt}, 4, {"sequence 1", "33 tokens", "largest context bucket 32"});
  expect_error({kPrompts[0], {1, 300, 2}}, 4, {"sequence 1", "token id 300", "position 1", "[0, 300)"});
  expect_error({{-1}}, 4, {"sequence 0", "token id -1"});
  expect_error({kPrompts[2]}, 240, {"20 + max_new_tokens 240", "max_position_embeddings 256"});
  expect_error({kPrompts[2]}, 50, {"exceeds the KV cache length (max_length) 64"});
  expect_error({kPrompts[0], kPrompts[1], kPrompts[2], kPrompts[0], kPrompts[1]}, 4, {"5 prompts", "batch_size 4"});
  expect_error({kPrompts[0], {}}, 4, {"sequence 1", "empty"});
  // Nothing was run or lost: the next request gives the twin's tokens.
  auto r = a->generate(kPrompts, greedy(6));
  for (std::size_t s = 0; s < kPrompts.size(); ++s) {
    EXPECT_EQ(r.tokens[s], std::vector<std::int64_t>(f32_->generated[s].begin(), f32_->generated[s].begin() + 6));
  }
}

// ---- token generation bucketed on the cache length ----

namespace {

/// The smallest of kCacheBuckets holding `length` positions.
std::int64_t smallest_cache_bucket(std::int64_t length) {
  for (std::int64_t b : kCacheBuckets) {
    if (b >= length) return b;
  }
  return -1;
}

}  // namespace

class LlamaCacheTp : public LlamaTest, public ::testing::WithParamInterface<int> {};

// Prompts of 3, 6 and 10 tokens and 40 new tokens: the decode steps run in cache buckets 16,
// 32 and 64 (the longest live sequence holds 11 .. 49 positions), each the smallest that fits;
// every step's logits and the greedy ids equal the twin's (which attends over its whole cache).
TEST_P(LlamaCacheTp, EveryDecodeStepMatchesTheTwinAcrossCacheBuckets) {
  const int tp = GetParam();
  auto a = app("untied", config("untied", tp), "cache_tp" + std::to_string(tp));
  auto r = a->generate(kShort, greedy(kShortNew));
  ASSERT_EQ(r.tokens.size(), kShort.size());
  EXPECT_EQ(r.tokens, short_->generated);
  const Tensor& want_prefill = short_->t.at("prefill_logits");
  EXPECT_TRUE(tensors_close(prompt_rows(r.prefill_logits, kShort),
                            prompt_rows(want_prefill, kShort), kRtol, kAtol));
  const Tensor& dec = short_->t.at("decode_logits");
  ASSERT_EQ(static_cast<std::int64_t>(r.decode_logits.size()), kShortNew - 1);
  ASSERT_EQ(r.decode_cache_buckets.size(), r.decode_logits.size());
  std::set<std::int64_t> used;
  for (std::int64_t s = 0; s + 1 < kShortNew; ++s) {
    SCOPED_TRACE("decode step " + std::to_string(s));
    EXPECT_TRUE(tensors_close(r.decode_logits[static_cast<std::size_t>(s)], decode_step(dec, s), kRtol, kAtol));
    // Step s (s + 1 in generate()'s count) holds positions 0 .. 10 + s of the longest prompt.
    const std::int64_t length = 10 + (s + 1);
    EXPECT_EQ(r.decode_cache_buckets[static_cast<std::size_t>(s)], smallest_cache_bucket(length)) << "length " << length;
    used.insert(r.decode_cache_buckets[static_cast<std::size_t>(s)]);
  }
  EXPECT_EQ(used, std::set<std::int64_t>(kCacheBuckets.begin(), kCacheBuckets.end()));
}

INSTANTIATE_TEST_SUITE_P(Tp, LlamaCacheTp, ::testing::Values(1, 2, 4));

// The runtime picks the smallest cache bucket the attention mask's width fits (and the smallest
// batch bucket), pads the mask with zeros, and the padding changes nothing: the same decode
// step in bucket 16 and, with the mask widened by zeros, in bucket 64 gives the same logits; a
// zero inside the mask hides that position (the logits change); a mask wider than the largest
// bucket is refused naming both.
TEST_F(LlamaTest, TheSmallestCacheBucketThatFitsRunsAndItsPaddingIsInvisible) {
  auto a = app("untied", config("untied", 2), "cache_pick");
  // Prefill two prompts (fills the cache at positions 0 .. len-1), then drive decode directly.
  const std::vector<std::vector<std::int64_t>> prompts{kShort[0], kShort[2]};  // 3 and 10 tokens
  a->generate(prompts, greedy(1));
  auto step = [&](std::int64_t width, std::vector<std::int64_t> hide = {}) {
    const std::int64_t n = 2;
    Tensor ids = Tensor::from_vector_i64({5, 9}, {n, 1});
    Tensor pos1 = Tensor::from_vector_i64({4, 11}, {n, 1});  // positions 3 and 10
    Tensor mask = Tensor::zeros({n, width}, DType::Int64);
    for (std::int64_t s = 0; s < n; ++s) {
      for (std::int64_t j = 0; j < std::min(width, pos1.data<std::int64_t>()[s]); ++j) mask.data<std::int64_t>()[s * width + j] = 1;
    }
    for (std::int64_t j : hide) mask.data<std::int64_t>()[width + j] = 0;  // sequence 1
    Tensor sampling = Tensor::zeros({n, 3});
    return a->token_generation().forward({ids, pos1, mask, sampling, Tensor::zeros({n})});
  };
  for (auto [width, bucket] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {11, 16}, {16, 16}, {17, 32}, {32, 32}, {33, 64}, {64, 64}}) {
    Output out = step(width);
    EXPECT_EQ(out.bucket().size("cache"), bucket) << "mask width " << width;
    EXPECT_EQ(out.bucket().batch, 2) << "mask width " << width;
    EXPECT_EQ(out.bucket().dims, std::vector<std::string>{"cache"});
  }
  const Tensor in16 = step(11).tensor(1).clone();
  Output wide = step(64);
  ASSERT_EQ(wide.bucket().size("cache"), 64);
  EXPECT_TRUE(tensors_close(wide.tensor(1), in16, 1e-6, 1e-7));
  EXPECT_FALSE(tensors_close(step(11, {4}).tensor(1), in16, kRtol, kAtol));
  try {
    step(65);
    ADD_FAILURE() << "a mask wider than the largest cache bucket was accepted";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("cache 65 exceeds the largest compiled cache bucket 64"), std::string::npos)
        << e.what();
  }
  try {
    (void)wide.bucket().size("seq");
    ADD_FAILURE() << "a dim the bucket does not have";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no named dim 'seq' (it has 'cache')"), std::string::npos) << e.what();
  }
}

// The artifact records the cache buckets (every batch bucket x cache bucket is compiled, and
// the config's attributes list them); loading it with other cache buckets is refused naming
// both lists, and so is a config whose buckets lie past max_length.
TEST_F(LlamaTest, TheArtifactRecordsTheCacheBucketsAndLoadRefusesOthers) {
  const std::string dir = dir_->str("cache_artifact");
  {
    LlamaForCausalLM a(twin("untied"), config("untied", 1, DType::Float32, false));
    a.compile(dir);
  }
  const Manifest m = read_manifest(dir + "/token_generation");
  std::set<std::pair<std::int64_t, std::int64_t>> got;
  for (const auto& b : m.buckets) got.insert({b.batch, b.dims.at("cache")});
  EXPECT_EQ(got, (std::set<std::pair<std::int64_t, std::int64_t>>{{2, 16}, {2, 32}, {2, 64}, {4, 16}, {4, 32}, {4, 64}}));
  const InferenceConfig recorded = InferenceConfig::from_json(m.config_json);
  EXPECT_EQ(recorded.get_ints("cache_buckets"), kCacheBuckets);
  EXPECT_EQ(recorded.runtime_config().dim_buckets.at("cache"), kCacheBuckets);
  // The context-encoding stage is not bucketed on the cache.
  for (const auto& b : read_manifest(dir + "/context_encoding").buckets) EXPECT_EQ(b.dims.count("cache"), 0u);

  LlamaForCausalLM other(twin("untied"), config("untied", 1, DType::Float32, false, {32, 64}));
  try {
    other.load(dir);
    ADD_FAILURE() << "loaded an artifact compiled with other cache buckets";
  } catch (const ArtifactMismatch& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("'cache' buckets [16, 32, 64], but this wrapper has 'cache' buckets [32, 64]"), std::string::npos) << w;
    EXPECT_NE(w.find("[token_generation]"), std::string::npos) << w;
  }
  LlamaForCausalLM same(twin("untied"), config("untied", 1, DType::Float32, false));
  same.load(dir);
  EXPECT_EQ(same.generate(kShort, greedy(4)).decode_cache_buckets, (std::vector<std::int64_t>{16, 16, 16}));
  try {
    config("untied", 1, DType::Float32, false, {16, 128});
    ADD_FAILURE() << "a cache bucket past max_length was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("cache buckets [16, 128] must lie in [1, max_length 64]"), std::string::npos)
        << e.what();
  }
}

TEST(LlamaCacheBuckets, DefaultsDoubleFrom128AndEndAtMaxLength) {
  using models::resolve_cache_buckets;
  EXPECT_EQ(resolve_cache_buckets({}, 64), (std::vector<std::int64_t>{64}));
  EXPECT_EQ(resolve_cache_buckets({}, 128), (std::vector<std::int64_t>{128}));
  EXPECT_EQ(resolve_cache_buckets({}, 300), (std::vector<std::int64_t>{128, 256, 300}));
  EXPECT_EQ(resolve_cache_buckets({}, 1024), (std::vector<std::int64_t>{128, 256, 512, 1024}));
  EXPECT_EQ(resolve_cache_buckets({32, 16, 16}, 64), (std::vector<std::int64_t>{16, 32, 64}));
  EXPECT_EQ(resolve_cache_buckets({16, 64}, 64), (std::vector<std::int64_t>{16, 64}));
  try {
    resolve_cache_buckets({0, 8}, 64);
    ADD_FAILURE() << "bucket 0 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("cache buckets [0, 8] must lie in [1, max_length 64]"), std::string::npos) << e.what();
  }
}

// The cache is not copied per step: in every token-generation graph (batch bucket 2 < the
// cache's 4 rows, so the graph takes the first rows), the k and v that masked_attention reads
// are, in the cpu backend's memory plan, the KV-cache states themselves (views at offset 0,
// no copy), the cache bucket bounds the keys through the key mask [B, C] (no slice of the
// position dim), and no other node reads a cache.
TEST_F(LlamaTest, DecodeAttendsOverTheCacheInPlace) {
  const std::string dir = dir_->str("cache_in_place");
  {
    LlamaForCausalLM a(twin("untied"), config("untied", 2, DType::Float32, false));
    a.compile(dir);
  }
  const Manifest m = read_manifest(dir + "/token_generation");
  int attentions = 0;
  for (const auto& b : m.buckets) {
    SCOPED_TRACE("bucket " + bucket_text(b.batch, b.dims));
    const Graph& g = b.graph;
    const MemoryPlan plan = plan_views(g, "cpu backend", 0);
    std::set<int> states;
    for (const auto& in : g.inputs) {
      if (in.is_state()) states.insert(in.value);
    }
    ASSERT_EQ(states.size(), 4u);  // k and v of 2 layers
    for (const Node& n : g.nodes) {
      for (std::size_t i = 0; i < n.inputs.size(); ++i) {
        const int root = plan.root[static_cast<std::size_t>(n.inputs[i])];
        if (!states.count(root)) continue;
        EXPECT_EQ(plan.root_offset[static_cast<std::size_t>(n.inputs[i])], 0u);
        switch (n.op) {
          case OpKind::StateWrite:
            EXPECT_EQ(i, 0u);
            break;
          case OpKind::Slice:  // the first B rows: a view (the executor runs no kernel for it)
            EXPECT_EQ(n.attrs.i("dim"), 0);
            EXPECT_FALSE(plan.is_root(n.outputs[0]));
            break;
          case OpKind::MaskedAttention: {
            EXPECT_TRUE(i == 1 || i == 2) << "input " << i;
            ASSERT_EQ(n.inputs.size(), 6u);
            const Shape& kv = g.value(n.inputs[i]).shape;
            EXPECT_EQ(kv[0], b.batch);
            EXPECT_EQ(kv[2], 64);  // the whole cache length; the key mask bounds the keys
            EXPECT_EQ(g.value(n.inputs[5]).shape, Shape({b.batch, b.dims.at("cache")}));
            attentions += i == 1;
            break;
          }
          default:
            ADD_FAILURE() << op_name(n.op) << " reads a KV cache";
        }
      }
    }
  }
  EXPECT_EQ(attentions, 2 * static_cast<int>(m.buckets.size()));
}

// The diffusion pipeline (devpipe/models/dit.h: diffusers' DiTPipeline, DiTTransformer2DModel
// with DDIM and classifier-free guidance) against its PyTorch twin (tests/reference/dit_ref.py:
// diffusers' math in plain PyTorch with diffusers' folder layout and state-dict names; its
// author checked it bit-equal to diffusers' own DiTPipeline on toy models).
//
// Tiny random models: 2 heads of 16 (inner dim 32), 2 blocks, 4 latent channels with learned
// sigma (8 out), latents 8 x 8 in patches of 2 (16 tokens), 10 classes. "cfg": DDIM leading
// spacing with x0 clipped, 4 steps at guidance 4 (the batch doubled inside the stage); "plain":
// scaled_linear betas, trailing spacing, no clipping, 5 steps without guidance.
//
// Tolerances, float32: every step's latents within atol 5e-4 + rtol 1e-4. The two sides' float32
// rounding in the transformer (~1.5e-5 here) is amplified by the guidance combine
// (uncond + 4 (cond - uncond): up to 7x) and by DDIM's x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
// (1 / sqrt(a_t) = 17.4 at t = 750, 14.6 at 999 without clipping). Measured worst: 1.8e-4 (cfg,
// step 2), 1.9e-4 (plain, step 4), on values of magnitude 0.4 and 6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "devpipe/devpipe.h"
#include "devpipe/models/dit.h"
#include "lm_twin.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
using devpipe::models::DDIMSchedulerConfig;
using devpipe::models::DiTPipeline;

namespace {

constexpr double kRtol = 1e-4;
constexpr double kAtol = 5e-4;

struct DiffusionTwin {
  std::map<std::string, Tensor> t;
  nlohmann::json j;
  std::vector<std::int64_t> classes() const {
    const Tensor& c = t.at("class_labels");
    return {c.data<std::int64_t>(), c.data<std::int64_t>() + c.numel()};
  }
  std::int64_t steps() const { return t.at("timesteps").numel(); }
  /// The latents after step s, [B, C, S, S].
  Tensor step(std::int64_t s) const {
    const Tensor& all = t.at("latents_step");
    const std::int64_t n = all.numel() / all.dim(0);
    const std::vector<float> v = all.to_float_vector();
    Shape shape(std::vector<std::int64_t>(all.shape().dims().begin() + 1, all.shape().dims().end()));
    return Tensor::from_vector(std::vector<float>(v.begin() + s * n, v.begin() + (s + 1) * n), shape);
  }
};

DiffusionTwin load(const std::string& prefix) {
  DiffusionTwin tw;
  tw.t = safetensors::load_all(prefix + ".safetensors");
  std::ifstream f(prefix + ".json");
  tw.j = nlohmann::json::parse(f);
  return tw;
}

class DiTTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const std::string ref = "dit_ref.py", quiet = " > /dev/null";
    const std::string cfg_model = "", plain_model =
        " --beta-schedule scaled_linear --beta-start 0.00085 --beta-end 0.012 --timestep-spacing trailing --no-clip-sample --seed 1";
    const std::string cfg_run = " --classes 3,7 --steps 4 --guidance 4.0 --seed 0";
    const std::string plain_run = " --classes 1,2,5 --steps 5 --guidance 1.0 --seed 2";
    // The cfg transformer with a VAE of 4 blocks (8x: 64 x 64 images), channels changing twice.
    const std::string vae_model = " --vae --vae-block-out-channels 16,32,32,64 --vae-norm-num-groups 8 --vae-seed 4";
    const std::string vae_run = " --classes 3,7,1 --steps 3 --guidance 4.0 --seed 5";
    twin_ = new std::filesystem::path(cached_twin_dir(
        "dit_twin", {ref}, cfg_model + plain_model + cfg_run + plain_run + vae_model + vae_run,
        [&](const std::filesystem::path& tmp) {
          auto at = [&](const std::string& name) { return (tmp / name).string(); };
          return run_torch_script(ref, "write-model " + at("cfg") + cfg_model + quiet) &&
                 run_torch_script(ref, "write-model " + at("plain") + plain_model + quiet) &&
                 run_torch_script(ref, "write-model " + at("vae") + cfg_model + vae_model + quiet) &&
                 run_torch_script(ref, "run " + at("cfg") + cfg_run + " --out " + at("cfg_run") + quiet) &&
                 run_torch_script(ref, "run " + at("plain") + plain_run + " --out " + at("plain_run") + quiet) &&
                 run_torch_script(ref, "run " + at("vae") + vae_run + " --out " + at("vae_run") + quiet);
        }));
    cfg_ = new DiffusionTwin(load(twin("cfg_run")));
    plain_ = new DiffusionTwin(load(twin("plain_run")));
    vae_ = new DiffusionTwin(load(twin("vae_run")));
  }
  static void TearDownTestSuite() {
    delete cfg_;
    delete plain_;
    delete vae_;
    delete twin_;
    delete dir_;
  }
  static std::string twin(const std::string& name) { return (*twin_ / name).string(); }

  static std::unique_ptr<DiTPipeline> app(const std::string& model, int tp, bool guidance, const std::string& name,
                                          DType dtype = DType::Float32) {
    RuntimeConfig rc{.batch_size = 4, .dtype = dtype, .tp_degree = tp};
    rc.buckets = {2, 4};
    InferenceConfig c = models::dit_config(twin(model), rc, guidance);
    auto a = std::make_unique<DiTPipeline>(twin(model), c);
    a->compile(dir_->str(name));
    a->load(dir_->str(name));
    return a;
  }

  /// generate() over the twin's run, every step's latents (read in the step callback) and the
  /// timesteps against the twin's.
  static void expect_matches(DiTPipeline& a, const DiffusionTwin& tw, double guidance) {
    std::vector<Tensor> steps;
    std::vector<std::int64_t> seen;
    auto r = a.generate(tw.classes(), tw.t.at("latents_init"), tw.steps(), guidance,
                        [&](std::int64_t step, std::int64_t total, std::int64_t t, const RankedTensors& latents) {
                          EXPECT_EQ(step, static_cast<std::int64_t>(steps.size()) + 1);
                          EXPECT_EQ(total, tw.steps());
                          seen.push_back(t);
                          steps.push_back(latents.to_host().at(0));
                        });
    EXPECT_EQ(r.timesteps, tw.j.at("timesteps").get<std::vector<std::int64_t>>());
    EXPECT_EQ(seen, r.timesteps);
    ASSERT_EQ(static_cast<std::int64_t>(steps.size()), tw.steps());
    for (std::int64_t s = 0; s < tw.steps(); ++s) {
      SCOPED_TRACE("step " + std::to_string(s));
      EXPECT_TRUE(tensors_close(steps[static_cast<std::size_t>(s)], tw.step(s), kRtol, kAtol));
    }
    EXPECT_TRUE(tensors_close(r.latents, tw.step(tw.steps() - 1), kRtol, kAtol));
  }

  static TempDir* dir_;
  static std::filesystem::path* twin_;
  static DiffusionTwin* cfg_;
  static DiffusionTwin* plain_;
  static DiffusionTwin* vae_;
};

TempDir* DiTTest::dir_ = nullptr;
std::filesystem::path* DiTTest::twin_ = nullptr;
DiffusionTwin* DiTTest::cfg_ = nullptr;
DiffusionTwin* DiTTest::plain_ = nullptr;
DiffusionTwin* DiTTest::vae_ = nullptr;

}  // namespace

class DiTTp : public DiTTest, public ::testing::WithParamInterface<int> {};

// Guidance 4 (the classes and the null class in one doubled batch), clipped DDIM, 4 steps: the
// latents after every step equal the twin's at tp 1 and 2, and they are not the noise they
// started from.
TEST_P(DiTTp, EveryStepsLatentsMatchTheTwinWithGuidance) {
  auto a = app("cfg", GetParam(), true, "cfg_tp" + std::to_string(GetParam()));
  EXPECT_FALSE(tensors_close(cfg_->step(cfg_->steps() - 1), cfg_->t.at("latents_init"), 0.1, 0.1));
  expect_matches(*a, *cfg_, 4.0);
}

INSTANTIATE_TEST_SUITE_P(Tp, DiTTp, ::testing::Values(1, 2));

// bfloat16: the whole step in bfloat16 (the transformer, the guidance combine and DDIM; the
// scheduler's coefficients rounded to bfloat16 too: the graph has no cast op), as diffusers'
// pipeline in bfloat16 keeps its latents. DDIM's 17x and guidance's 7x amplify bfloat16's
// rounding, so after 4 steps the latents are compared on their mean |diff| from the float32
// twin: below 0.06 (measured 0.026 at tp 2, worst element 0.51), where another pair of classes
// from the same noise lands 0.83 away.
TEST_F(DiTTest, BFloat16StaysCloseToTheFloat32Twin) {
  auto a = app("cfg", 2, true, "bf16_tp2", DType::BFloat16);
  auto r = a->generate(cfg_->classes(), cfg_->t.at("latents_init"), cfg_->steps(), 4.0);
  const Tensor want = cfg_->step(cfg_->steps() - 1);
  auto mean_abs = [](const Tensor& x, const Tensor& y) {
    const std::vector<float> a = x.to_float_vector(), b = y.to_float_vector();
    double s = 0;
    for (std::size_t i = 0; i < a.size(); ++i) s += std::fabs(a[i] - b[i]);
    return s / static_cast<double>(a.size());
  };
  auto other = a->generate({5, 1}, cfg_->t.at("latents_init"), cfg_->steps(), 4.0);
  EXPECT_LT(mean_abs(r.latents, want), 0.06);
  EXPECT_GT(mean_abs(other.latents, want), 0.5);
}

// No guidance (compiled without the doubled batch), scaled_linear betas, trailing spacing, no
// clipping, 5 steps, 3 images in the batch bucket of 4, at tp 2.
TEST_F(DiTTest, WithoutGuidanceTrailingStepsAndScaledLinearBetas) {
  auto a = app("plain", 2, false, "plain_tp2");
  expect_matches(*a, *plain_, 1.0);
}

// The scheduler's own numbers: alphas_cumprod at each step's t and prev against the twin's
// (torch's float32 linspace and cumprod), and the timestep lists diffusers' set_timesteps gives.
TEST_F(DiTTest, TheSchedulersTimestepsAndAlphasAreDiffusers) {
  for (const auto& [model, tw] : {std::pair{"cfg", cfg_}, {"plain", plain_}}) {
    SCOPED_TRACE(model);
    const auto s = DDIMSchedulerConfig::from_file(twin(std::string(model) + "/scheduler/scheduler_config.json"));
    const std::vector<float> ac = s.alphas_cumprod();
    const auto ts = tw->j.at("timesteps").get<std::vector<std::int64_t>>();
    const auto prev = tw->j.at("prev_timesteps").get<std::vector<std::int64_t>>();
    const auto at = tw->j.at("alphas_cumprod_t").get<std::vector<double>>();
    const auto ap = tw->j.at("alphas_cumprod_prev").get<std::vector<double>>();
    ASSERT_EQ(s.timesteps(static_cast<std::int64_t>(ts.size())), ts);
    for (std::size_t i = 0; i < ts.size(); ++i) {
      EXPECT_NEAR(ac[static_cast<std::size_t>(ts[i])], at[i], 1e-6 * at[i]) << "t " << ts[i];
      if (prev[i] >= 0) EXPECT_NEAR(ac[static_cast<std::size_t>(prev[i])], ap[i], 1e-6 * ap[i]) << "prev " << prev[i];
    }
  }
  DDIMSchedulerConfig s;  // 1000 train steps
  s.timestep_spacing = "leading";
  s.steps_offset = 1;
  EXPECT_EQ(s.timesteps(4), (std::vector<std::int64_t>{751, 501, 251, 1}));
  s.timestep_spacing = "trailing";
  EXPECT_EQ(s.timesteps(3), (std::vector<std::int64_t>{999, 666, 332}));
  EXPECT_EQ(s.timesteps(4), (std::vector<std::int64_t>{999, 749, 499, 249}));
  s.timestep_spacing = "linspace";
  EXPECT_EQ(s.timesteps(4), (std::vector<std::int64_t>{999, 666, 333, 0}));
  EXPECT_EQ(s.timesteps(3), (std::vector<std::int64_t>{999, 500, 0}));  // 499.5 rounds half to even
  EXPECT_THROW(s.timesteps(0), InvalidArgument);
  EXPECT_THROW(s.timesteps(1001), InvalidArgument);
}

// The latents never leave the devices between steps: the host gives the first latents once and
// each step's small inputs, gets the last latents back, and every step after the first takes the
// previous one's output in place on each rank.
TEST_F(DiTTest, LatentsStayOnTheDevicesBetweenSteps) {
  auto a = app("cfg", 2, true, "transfers");
  const std::int64_t n = 2, steps = cfg_->steps();
  reset_transfer_stats();
  auto r = a->generate(cfg_->classes(), cfg_->t.at("latents_init"), steps, 4.0);
  const TransferStats st = transfer_stats();
  EXPECT_TRUE(tensors_close(r.latents, cfg_->step(steps - 1), kRtol, kAtol));
  const std::uint64_t latents = n * 4 * 8 * 8 * 4;
  EXPECT_EQ(st.forwards, static_cast<std::uint64_t>(steps));
  EXPECT_EQ(st.device_to_host_bytes, latents);
  // 2 images fill the batch bucket 2, so the cpu backend reads host inputs where they lie
  // (nothing is copied up): on each of the 2 ranks, the first step's 5 inputs (the latents,
  // labels, timesteps, coefficients, guidance scale), then each later step's 4: the latents
  // come from the previous step, on the device.
  EXPECT_EQ(st.host_to_device_bytes, 0u);
  EXPECT_EQ(st.host_inputs_in_place, static_cast<std::uint64_t>(2 * (5 + 4 * (steps - 1))));
  EXPECT_EQ(st.ranked_inputs_in_place, static_cast<std::uint64_t>(2 * (steps - 1)));
  EXPECT_EQ(st.device_to_device_bytes, 0u);
}

TEST_F(DiTTest, BadRequestsAndConfigsAreRefusedNamingTheValues) {
  auto a = app("cfg", 1, true, "errors");
  const Tensor& x = cfg_->t.at("latents_init");
  auto expect_error = [&](const std::vector<std::int64_t>& classes, const Tensor& latents, std::int64_t steps, double g,
                          const std::vector<std::string>& parts) {
    try {
      a->generate(classes, latents, steps, g);
      ADD_FAILURE() << "accepted a bad request";
    } catch (const InvalidArgument& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_error({3, 10}, x, 4, 4.0, {"class label 10 of image 1", "[0, num_embeds_ada_norm 10)"});
  expect_error({3, 7}, Tensor::zeros({2, 4, 8, 4}), 4, 4.0, {"latents are float32 [2, 4, 8, 4]", "expected float32 [2, 4, 8, 8]"});
  expect_error({3}, x, 4, 4.0, {"expected float32 [1, 4, 8, 8]"});
  expect_error({1, 2, 3, 4, 5}, Tensor::zeros({5, 4, 8, 8}), 4, 4.0, {"5 images", "batch_size 4"});
  expect_error({3, 7}, x, 0, 4.0, {"0 inference steps", "[1, num_train_timesteps 1000]"});
  expect_error({3, 7}, x, 4, 1.0, {"guidance_scale 1", "must be > 1"});
  // Nothing was run or lost: the twin's result still comes out.
  EXPECT_TRUE(tensors_close(a->generate(cfg_->classes(), x, 4, 4.0).latents, cfg_->step(3), kRtol, kAtol));

  auto edited = [&](const std::string& name, const std::string& file, const std::function<void(nlohmann::json&)>& edit) {
    const std::filesystem::path d = dir_->str("cfg_" + name);
    std::filesystem::create_directories(d / "transformer");
    std::filesystem::create_directories(d / "scheduler");
    for (const char* f : {"transformer/config.json", "scheduler/scheduler_config.json"}) {
      std::filesystem::copy_file(twin("cfg") + "/" + f, d / f, std::filesystem::copy_options::overwrite_existing);
    }
    std::ifstream in(d / file);
    nlohmann::json j = nlohmann::json::parse(in);
    in.close();
    edit(j);
    std::ofstream(d / file) << j.dump(2);
    return d.string();
  };
  auto expect_config_error = [&](const std::string& dir, int tp, const std::vector<std::string>& parts) {
    try {
      models::dit_config(dir, RuntimeConfig{.batch_size = 2, .tp_degree = tp});
      ADD_FAILURE() << "accepted " << dir;
    } catch (const ConfigError& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  const std::string tcfg = "transformer/config.json", scfg = "scheduler/scheduler_config.json";
  expect_config_error(edited("pred", scfg, [](nlohmann::json& j) { j["prediction_type"] = "v_prediction"; }), 1,
                      {"scheduler_config.json", "\"prediction_type\" \"v_prediction\" is not supported"});
  expect_config_error(edited("sched", scfg, [](nlohmann::json& j) { j["_class_name"] = "EulerDiscreteScheduler"; }), 1,
                      {"\"EulerDiscreteScheduler\" is not supported"});
  expect_config_error(edited("norm", tcfg, [](nlohmann::json& j) { j["norm_type"] = "ada_norm_single"; }), 1,
                      {"config.json", "\"norm_type\" \"ada_norm_single\" is not supported"});
  expect_config_error(edited("out", tcfg, [](nlohmann::json& j) { j["out_channels"] = 6; }), 1,
                      {"out_channels 6 must be in_channels 4 or twice it"});
  expect_config_error(twin("cfg"), 4, {"num_attention_heads 2 cannot be split over tp_degree 4"});
  expect_config_error(edited("layers", tcfg, [](nlohmann::json& j) { j["num_layers"] = 0; }), 1,
                      {"config.json'", "\"num_layers\" must be >= 1, got 0"});
  expect_config_error(edited("train", scfg, [](nlohmann::json& j) { j["num_train_timesteps"] = 0; }), 1,
                      {"scheduler_config.json'", "\"num_train_timesteps\" must be >= 1, got 0"});
}

// ------------------------------------------------------------------------------ the VAE decoder

namespace {

// The vae_decoder stage alone, on the twin's own last latents: float32 rounding only (the
// decoder's 22 convolutions, GroupNorms over up to 8192 values, a 64-token attention; oneDNN's
// and PyTorch's summation orders differ). Measured worst 2.1e-6 (tp 1 and 2) on images in [0, 1].
constexpr double kStageAtol = 1e-5;
// The whole pipeline: the latents' own float32 difference (3 steps with guidance 4; see kAtol) is
// multiplied by 1 / scaling_factor = 5.5 before the decoder, and the decoder carries it to the
// pixels. Measured worst 1.3e-5 (tp 1), 1.6e-5 (tp 2).
constexpr double kImagesAtol = 1e-4;

std::int64_t count_where(const Tensor& t, const std::function<bool(float)>& pred) {
  std::int64_t n = 0;
  for (float v : t.to_float_vector()) n += pred(v) ? 1 : 0;
  return n;
}

}  // namespace

class DiTVaeTp : public DiTTest, public ::testing::WithParamInterface<int> {};

// With a vae/ the application has the vae_decoder stage; generate()'s images equal the twin's
// (diffusers' DiTPipeline: 1 / scaling_factor * latents, AutoencoderKL.decode, / 2 + 0.5, clamped)
// at tp 1 and 2 (the decoder replicated on both ranks), 3 images in the batch bucket of 4; the
// stage on the twin's latents equals the twin closely; the clamp is exercised.
TEST_P(DiTVaeTp, ImagesMatchTheTwin) {
  auto a = app("vae", GetParam(), true, "vae_tp" + std::to_string(GetParam()));
  ASSERT_TRUE(a->has_vae());
  ASSERT_EQ(a->models.size(), 2u);
  EXPECT_EQ(a->vae_decoder().tag(), "vae_decoder");
  const Tensor& want = vae_->t.at("images");
  ASSERT_EQ(want.shape(), Shape({3, 3, 64, 64}));
  // The twin's decoded samples leave [0, 1] in places (the clamp matters) but not mostly, and the
  // images are not flat.
  const Tensor samples = vae_->t.at("decoded");
  const std::int64_t clamped = count_where(samples, [](float v) { return v / 2 + 0.5f < 0 || v / 2 + 0.5f > 1; });
  EXPECT_GT(clamped, want.numel() / 100);
  EXPECT_LT(clamped, want.numel() / 2);
  EXPECT_GT(count_where(want, [](float v) { return v > 0.05f && v < 0.95f; }), want.numel() / 2);

  auto r = a->generate(vae_->classes(), vae_->t.at("latents_init"), vae_->steps(), 4.0);
  EXPECT_TRUE(tensors_close(r.latents, vae_->step(vae_->steps() - 1), kRtol, kAtol));
  ASSERT_EQ(r.images.shape(), want.shape());
  EXPECT_TRUE(tensors_close(r.images, want, 0, kImagesAtol));
  EXPECT_EQ(count_where(r.images, [](float v) { return v < 0 || v > 1; }), 0);

  const Tensor last = vae_->step(vae_->steps() - 1);
  const Tensor direct = a->vae_decoder().forward({last}).tensor(0);
  EXPECT_TRUE(tensors_close(direct, want, 0, kStageAtol));
  // Where the twin clamped, the stage gives exactly 0 or 1.
  const std::vector<float> d = direct.to_float_vector(), dec = samples.to_float_vector();
  std::int64_t exact = 0;
  for (std::size_t i = 0; i < d.size(); ++i) {
    const float x = dec[i] / 2 + 0.5f;
    if (x < -1e-3f) exact += d[i] == 0.0f ? 1 : 0;
    if (x > 1 + 1e-3f) exact += d[i] == 1.0f ? 1 : 0;
  }
  EXPECT_GT(exact, clamped / 2);
  EXPECT_EQ(exact, count_where(samples, [](float v) { return v / 2 + 0.5f < -1e-3f || v / 2 + 0.5f > 1 + 1e-3f; }));
}

INSTANTIATE_TEST_SUITE_P(Tp, DiTVaeTp, ::testing::Values(1, 2));

// The last step's latents go to the vae_decoder in place on each rank; what comes back to the
// host is the images (rank 0's) and the latents generate() returns, nothing else.
TEST_F(DiTTest, OnlyTheImagesAndLatentsReachTheHost) {
  auto a = app("vae", 2, true, "vae_transfers");
  const std::int64_t n = 3, steps = vae_->steps();
  reset_transfer_stats();
  auto r = a->generate(vae_->classes(), vae_->t.at("latents_init"), steps, 4.0);
  const TransferStats st = transfer_stats();
  EXPECT_TRUE(tensors_close(r.images, vae_->t.at("images"), 0, kImagesAtol));
  EXPECT_EQ(st.forwards, static_cast<std::uint64_t>(steps + 1));
  const std::uint64_t latents = n * 4 * 8 * 8 * 4, images = n * 3 * 64 * 64 * 4;
  EXPECT_EQ(st.device_to_host_bytes, latents + images);
  // Every step after the first, and the decode, take the previous stage's output in place on both
  // ranks; nothing moves between devices.
  EXPECT_EQ(st.ranked_inputs_in_place, static_cast<std::uint64_t>(2 * (steps - 1) + 2));
  EXPECT_EQ(st.device_to_device_bytes, 0u);
}

// A checkpoint with the pre-0.14 attention names (query, key, value, proj_attn) and without the
// encoder gives the same images; dit_config(vae=false) leaves the VAE out.
TEST_F(DiTTest, VaeCheckpointNamesAndOptingOut) {
  const std::filesystem::path d = dir_->str("vae_old_names");
  std::filesystem::create_directories(d);
  std::filesystem::copy(twin("vae"), d, std::filesystem::copy_options::recursive | std::filesystem::copy_options::overwrite_existing);
  const std::string ckpt = (d / "vae" / "diffusion_pytorch_model.safetensors").string();
  std::vector<std::pair<std::string, Tensor>> renamed;
  bool had_encoder = false, had_quant = false;
  for (auto& [key, value] : safetensors::load_all(ckpt)) {
    had_encoder = had_encoder || key.rfind("encoder.", 0) == 0;
    had_quant = had_quant || key.rfind("quant_conv.", 0) == 0;
    if (key.rfind("encoder.", 0) == 0) continue;
    std::string k = key;
    for (auto [from, to] : {std::pair{".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}}) {
      if (const auto at = k.find(from); at != std::string::npos) k = k.substr(0, at) + to + k.substr(at + std::string(from).size());
    }
    renamed.emplace_back(k, value);
  }
  EXPECT_TRUE(had_encoder && had_quant);  // the twin writes a whole AutoencoderKL; the stage skipped them above
  ASSERT_EQ(std::count_if(renamed.begin(), renamed.end(), [](const auto& kv) { return kv.first.find(".proj_attn.") != std::string::npos; }), 2);
  safetensors::save(ckpt, renamed);
  auto a = app((d.string()), 1, true, "vae_old_names_art");
  const Tensor last = vae_->step(vae_->steps() - 1);
  EXPECT_TRUE(tensors_close(a->vae_decoder().forward({last}).tensor(0), vae_->t.at("images"), 0, kStageAtol));

  RuntimeConfig rc{.batch_size = 4, .dtype = DType::Float32, .tp_degree = 1};
  rc.buckets = {2, 4};
  InferenceConfig c = models::dit_config(twin("vae"), rc, true, /*vae=*/false);
  EXPECT_FALSE(c.get_bool("vae"));
  DiTPipeline plain(twin("vae"), c);
  EXPECT_FALSE(plain.has_vae());
  EXPECT_EQ(plain.models.size(), 1u);
  EXPECT_THROW(plain.vae_decoder(), StateError);
  EXPECT_TRUE(models::dit_config(twin("vae"), rc).get_bool("vae"));
  EXPECT_FALSE(models::dit_config(twin("cfg"), rc).get_bool("vae"));
}

TEST_F(DiTTest, VaeConfigErrorsNameTheFileAndKey) {
  auto edited = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    const std::filesystem::path d = dir_->str("vae_cfg_" + name);
    for (const char* sub : {"transformer", "scheduler", "vae"}) std::filesystem::create_directories(d / sub);
    for (const char* f : {"transformer/config.json", "scheduler/scheduler_config.json"}) {
      std::filesystem::copy_file(twin("vae") + "/" + f, d / f, std::filesystem::copy_options::overwrite_existing);
    }
    std::ifstream in(twin("vae") + "/vae/config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    edit(j);
    std::ofstream(d / "vae" / "config.json") << j.dump(2);
    return d.string();
  };
  auto expect_error = [&](const std::string& dir, const std::vector<std::string>& parts) {
    try {
      models::dit_config(dir, RuntimeConfig{.batch_size = 2});
      ADD_FAILURE() << "accepted " << dir;
    } catch (const ConfigError& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_error(edited("class", [](nlohmann::json& j) { j["_class_name"] = "AsymmetricAutoencoderKL"; }),
               {"vae/config.json", "\"_class_name\" \"AsymmetricAutoencoderKL\" is not supported"});
  expect_error(edited("up", [](nlohmann::json& j) { j["up_block_types"][1] = "AttnUpDecoderBlock2D"; }),
               {"vae/config.json", "\"up_block_types\" \"AttnUpDecoderBlock2D\" is not supported"});
  expect_error(edited("ups", [](nlohmann::json& j) { j["up_block_types"] = {"UpDecoderBlock2D"}; }),
               {"\"up_block_types\" has 1 entries, block_out_channels 4"});
  expect_error(edited("act", [](nlohmann::json& j) { j["act_fn"] = "gelu"; }), {"\"act_fn\" \"gelu\" is not supported"});
  expect_error(edited("groups", [](nlohmann::json& j) { j["norm_num_groups"] = 5; }),
               {"\"block_out_channels\" [16,32,32,64]: 16 is not a positive multiple of norm_num_groups 5"});
  expect_error(edited("channels", [](nlohmann::json& j) { j["block_out_channels"] = "wide"; }),
               {"\"block_out_channels\" is \"wide\", expected a non-empty list of integers"});
  expect_error(edited("scale", [](nlohmann::json& j) { j["scaling_factor"] = 0; }), {"\"scaling_factor\" must be > 0"});
  expect_error(edited("latent", [](nlohmann::json& j) { j["latent_channels"] = 8; }),
               {"vae/config.json", "\"latent_channels\" 8 differs from the transformer's in_channels 4"});
}

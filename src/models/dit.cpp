#include "devpipe/models/dit.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <set>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "models/hf_config.h"

namespace devpipe::models {

using nlohmann::json;
namespace fs = std::filesystem;

// ------------------------------------------------------------------------------ configs

DiTConfig DiTConfig::from_hf_folder(const std::string& dir) {
  const std::string where = "'" + (fs::path(dir) / "config.json").string() + "'";
  const json j = read_hf_config_json(dir);
  const HfFields f{j, where};
  DiTConfig c;
  c.num_attention_heads = f.integer("num_attention_heads", c.num_attention_heads);
  c.attention_head_dim = f.integer("attention_head_dim", c.attention_head_dim);
  c.in_channels = f.integer("in_channels", c.in_channels);
  c.out_channels = f.integer("out_channels", c.in_channels);
  c.num_layers = f.integer("num_layers", c.num_layers);
  c.sample_size = f.integer("sample_size", c.sample_size);
  c.patch_size = f.integer("patch_size", c.patch_size);
  c.num_embeds_ada_norm = f.integer("num_embeds_ada_norm", c.num_embeds_ada_norm);
  c.norm_eps = f.number("norm_eps", c.norm_eps);
  c.attention_bias = f.flag("attention_bias", c.attention_bias);
  for (auto [key, want] : {std::pair{"norm_type", "ada_norm_zero"}, {"activation_fn", "gelu-approximate"}}) {
    const std::string got = f.text(key, want);
    if (got != want) throw ConfigError(where + ": \"" + key + "\" \"" + got + "\" is not supported (\"" + want + "\" only)");
  }
  if (f.flag("norm_elementwise_affine", false)) {
    throw ConfigError(where + ": \"norm_elementwise_affine\": true is not supported (DiT's norms have no weights)");
  }
  if (f.flag("upcast_attention", false)) throw ConfigError(where + ": \"upcast_attention\": true is not supported");
  require_positive(where, {{"num_attention_heads", c.num_attention_heads}, {"attention_head_dim", c.attention_head_dim},
                        {"in_channels", c.in_channels}, {"num_layers", c.num_layers}, {"sample_size", c.sample_size},
                        {"patch_size", c.patch_size}, {"num_embeds_ada_norm", c.num_embeds_ada_norm}});
  if (c.out_channels != c.in_channels && c.out_channels != 2 * c.in_channels) {
    throw ConfigError(where + ": out_channels " + std::to_string(c.out_channels) + " must be in_channels " +
                      std::to_string(c.in_channels) + " or twice it (learned sigma)");
  }
  if (c.sample_size % c.patch_size != 0) {
    throw ConfigError(where + ": sample_size " + std::to_string(c.sample_size) + " is not a multiple of patch_size " +
                      std::to_string(c.patch_size));
  }
  if (c.inner_dim() % 4 != 0) {
    throw ConfigError(where + ": the inner dim " + std::to_string(c.inner_dim()) +
                      " (num_attention_heads x attention_head_dim) must be a multiple of 4 (the 2D sin-cos position embedding)");
  }
  return c;
}

DDIMSchedulerConfig DDIMSchedulerConfig::from_file(const std::string& path) {
  const json j = read_json_object(path);
  const HfFields f{j, "'" + path + "'"};
  DDIMSchedulerConfig c;
  c.num_train_timesteps = f.integer("num_train_timesteps", c.num_train_timesteps);
  c.beta_start = f.number("beta_start", c.beta_start);
  c.beta_end = f.number("beta_end", c.beta_end);
  c.beta_schedule = f.text("beta_schedule", c.beta_schedule);
  c.clip_sample = f.flag("clip_sample", c.clip_sample);
  c.clip_sample_range = f.number("clip_sample_range", c.clip_sample_range);
  c.set_alpha_to_one = f.flag("set_alpha_to_one", c.set_alpha_to_one);
  c.steps_offset = f.integer("steps_offset", c.steps_offset);
  c.timestep_spacing = f.text("timestep_spacing", c.timestep_spacing);
  const std::string klass = f.text("_class_name", "DDIMScheduler");
  if (klass != "DDIMScheduler") {
    throw ConfigError(f.where + ": scheduler \"" + klass + "\" is not supported (\"DDIMScheduler\" only)");
  }
  const std::string prediction = f.text("prediction_type", "epsilon");
  if (prediction != "epsilon") {
    throw ConfigError(f.where + ": \"prediction_type\" \"" + prediction + "\" is not supported (\"epsilon\" only)");
  }
  if (f.flag("thresholding", false)) throw ConfigError(f.where + ": \"thresholding\": true is not supported");
  if (j.contains("trained_betas") && !j["trained_betas"].is_null()) {
    throw ConfigError(f.where + ": \"trained_betas\" is not supported (a beta_schedule only)");
  }
  if (c.beta_schedule != "linear" && c.beta_schedule != "scaled_linear") {
    throw ConfigError(f.where + ": \"beta_schedule\" \"" + c.beta_schedule + "\" is not supported (\"linear\" or \"scaled_linear\")");
  }
  if (c.timestep_spacing != "leading" && c.timestep_spacing != "trailing" && c.timestep_spacing != "linspace") {
    throw ConfigError(f.where + ": \"timestep_spacing\" \"" + c.timestep_spacing +
                      "\" is not supported (\"leading\", \"trailing\" or \"linspace\")");
  }
  require_positive(f.where, {{"num_train_timesteps", c.num_train_timesteps}});
  if (!(c.clip_sample_range > 0)) {
    throw ConfigError(f.where + ": \"clip_sample_range\" must be > 0, got " + std::to_string(c.clip_sample_range));
  }
  return c;
}

std::vector<float> DDIMSchedulerConfig::alphas_cumprod() const {
  // As diffusers computes them with torch: betas = torch.linspace(beta_start, beta_end, T) in
  // float32 (scaled_linear: the linspace of the square roots, squared); torch's linspace counts
  // from the start for the first half and back from the end for the second; alphas_cumprod =
  // torch.cumprod(1 - betas), which accumulates in double and rounds each product to float32.
  const std::int64_t T = num_train_timesteps;
  const bool scaled = beta_schedule == "scaled_linear";
  const float lo = static_cast<float>(scaled ? std::sqrt(beta_start) : beta_start);
  const float hi = static_cast<float>(scaled ? std::sqrt(beta_end) : beta_end);
  const float step = T > 1 ? (hi - lo) / static_cast<float>(T - 1) : 0.0f;
  std::vector<float> out(static_cast<std::size_t>(T));
  double prod = 1.0;
  for (std::int64_t t = 0; t < T; ++t) {
    float x = t < T / 2 ? lo + step * static_cast<float>(t) : hi - step * static_cast<float>(T - t - 1);
    if (T == 1) x = lo;
    const float beta = scaled ? x * x : x;
    prod *= static_cast<double>(1.0f - beta);
    out[static_cast<std::size_t>(t)] = static_cast<float>(prod);
  }
  return out;
}

std::vector<std::int64_t> DDIMSchedulerConfig::timesteps(std::int64_t steps) const {
  const std::int64_t T = num_train_timesteps;
  if (steps < 1 || steps > T) {
    throw InvalidArgument("DDIM: " + std::to_string(steps) + " inference steps is outside [1, num_train_timesteps " +
                          std::to_string(T) + "]");
  }
  std::vector<std::int64_t> out;
  if (timestep_spacing == "leading") {
    const std::int64_t ratio = T / steps;
    for (std::int64_t i = steps - 1; i >= 0; --i) out.push_back(i * ratio + steps_offset);
  } else if (timestep_spacing == "trailing") {
    // round(np.arange(T, 0, -T / steps)) - 1: numpy's element count and start + i * step, rounded
    // half to even.
    const double step = -static_cast<double>(T) / static_cast<double>(steps);
    const auto count = static_cast<std::int64_t>(std::ceil((0.0 - static_cast<double>(T)) / step));
    for (std::int64_t i = 0; i < count; ++i) {
      out.push_back(static_cast<std::int64_t>(std::nearbyint(static_cast<double>(T) + static_cast<double>(i) * step)) - 1);
    }
  } else {  // linspace: round(np.linspace(0, T - 1, steps)) reversed (i * step, the last exactly T - 1)
    const double step = steps == 1 ? 0.0 : static_cast<double>(T - 1) / static_cast<double>(steps - 1);
    for (std::int64_t i = steps - 1; i >= 0; --i) {
      const double v = i == steps - 1 && steps > 1 ? static_cast<double>(T - 1) : static_cast<double>(i) * step;
      out.push_back(static_cast<std::int64_t>(std::nearbyint(v)));
    }
  }
  return out;
}

InferenceConfig dit_config(const std::string& pipeline_dir, RuntimeConfig runtime, bool guidance, bool vae) {
  const DiTConfig c = DiTConfig::from_hf_folder((fs::path(pipeline_dir) / "transformer").string());
  const DDIMSchedulerConfig s = DDIMSchedulerConfig::from_file((fs::path(pipeline_dir) / "scheduler" / "scheduler_config.json").string());
  const int tp = runtime.tp_degree;
  if (c.num_attention_heads % tp != 0) {
    throw ConfigError("dit: num_attention_heads " + std::to_string(c.num_attention_heads) + " cannot be split over tp_degree " +
                      std::to_string(tp));
  }
  InferenceConfig config(runtime);
  config.set("num_attention_heads", c.num_attention_heads);
  config.set("attention_head_dim", c.attention_head_dim);
  config.set("in_channels", c.in_channels);
  config.set("out_channels", c.out_channels);
  config.set("num_layers", c.num_layers);
  config.set("sample_size", c.sample_size);
  config.set("patch_size", c.patch_size);
  config.set("num_embeds_ada_norm", c.num_embeds_ada_norm);
  config.set("norm_eps", c.norm_eps);
  config.set("attention_bias", c.attention_bias);
  config.set("num_train_timesteps", s.num_train_timesteps);
  config.set("beta_start", s.beta_start);
  config.set("beta_end", s.beta_end);
  config.set("beta_schedule", s.beta_schedule);
  config.set("clip_sample", s.clip_sample);
  config.set("clip_sample_range", s.clip_sample_range);
  config.set("set_alpha_to_one", s.set_alpha_to_one);
  config.set("steps_offset", s.steps_offset);
  config.set("timestep_spacing", s.timestep_spacing);
  config.set("guidance", guidance);
  config.set("vae", false);
  const fs::path vae_dir = fs::path(pipeline_dir) / "vae";
  if (vae && fs::is_directory(vae_dir)) {
    const AutoencoderKLConfig v = AutoencoderKLConfig::from_hf_folder(vae_dir.string());
    if (v.latent_channels != c.in_channels) {
      throw ConfigError("dit: '" + (vae_dir / "config.json").string() + "': \"latent_channels\" " +
                        std::to_string(v.latent_channels) + " differs from the transformer's in_channels " +
                        std::to_string(c.in_channels));
    }
    set_vae_attributes(config, v);
  }
  return config;
}

namespace {

DiTConfig dit_from_attributes(const InferenceConfig& config) {
  DiTConfig c;
  c.num_attention_heads = config.get_int("num_attention_heads");
  c.attention_head_dim = config.get_int("attention_head_dim");
  c.in_channels = config.get_int("in_channels");
  c.out_channels = config.get_int("out_channels");
  c.num_layers = config.get_int("num_layers");
  c.sample_size = config.get_int("sample_size");
  c.patch_size = config.get_int("patch_size");
  c.num_embeds_ada_norm = config.get_int("num_embeds_ada_norm");
  c.norm_eps = config.get_float("norm_eps");
  c.attention_bias = config.get_bool("attention_bias");
  return c;
}

DDIMSchedulerConfig scheduler_from_attributes(const InferenceConfig& config) {
  DDIMSchedulerConfig s;
  s.num_train_timesteps = config.get_int("num_train_timesteps");
  s.beta_start = config.get_float("beta_start");
  s.beta_end = config.get_float("beta_end");
  s.beta_schedule = config.get_string("beta_schedule");
  s.clip_sample = config.get_bool("clip_sample");
  s.clip_sample_range = config.get_float("clip_sample_range");
  s.set_alpha_to_one = config.get_bool("set_alpha_to_one");
  s.steps_offset = config.get_int("steps_offset");
  s.timestep_spacing = config.get_string("timestep_spacing");
  return s;
}

// ------------------------------------------------------------------------------ the stage

/// diffusers' get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1) for
/// every t in [0, T): row t = [cos(t * f_k), sin(t * f_k)], f_k = exp(-ln(10000) * k / 127),
/// k < 128, in float32.
Tensor timestep_table(std::int64_t T) {
  constexpr std::int64_t kChannels = 256, kHalf = kChannels / 2;
  std::vector<float> v(static_cast<std::size_t>(T * kChannels));
  std::vector<float> freq(kHalf);
  for (std::int64_t k = 0; k < kHalf; ++k) {
    const float exponent = -std::log(10000.0f) * static_cast<float>(k) / static_cast<float>(kHalf - 1);
    freq[static_cast<std::size_t>(k)] = std::exp(exponent);
  }
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t k = 0; k < kHalf; ++k) {
      const float a = static_cast<float>(t) * freq[static_cast<std::size_t>(k)];
      v[static_cast<std::size_t>(t * kChannels + k)] = std::cos(a);
      v[static_cast<std::size_t>(t * kChannels + kHalf + k)] = std::sin(a);
    }
  }
  return Tensor::from_vector(v, {T, kChannels});
}

/// diffusers' get_2d_sincos_pos_embed(D, grid) (base size = grid, interpolation scale 1) for a
/// grid x grid patch image: patch (i, j) (row-major) gets [sin(j w_k), cos(j w_k)] in its first
/// D/2 channels and [sin(i w_k), cos(i w_k)] in the others, w_k = 10000^(-k / (D/4)), k < D/4
/// (the grid's first coordinate is the column: np.meshgrid(w, h)); computed in float64.
Tensor pos_embed_table(std::int64_t D, std::int64_t grid) {
  const std::int64_t quarter = D / 4;
  std::vector<float> v(static_cast<std::size_t>(grid * grid * D));
  for (std::int64_t i = 0; i < grid; ++i) {
    for (std::int64_t j = 0; j < grid; ++j) {
      float* row = v.data() + (i * grid + j) * D;
      for (std::int64_t k = 0; k < quarter; ++k) {
        const double w = 1.0 / std::pow(10000.0, static_cast<double>(k) / static_cast<double>(quarter));
        row[k] = static_cast<float>(std::sin(static_cast<double>(j) * w));
        row[quarter + k] = static_cast<float>(std::cos(static_cast<double>(j) * w));
        row[2 * quarter + k] = static_cast<float>(std::sin(static_cast<double>(i) * w));
        row[3 * quarter + k] = static_cast<float>(std::cos(static_cast<double>(i) * w));
      }
    }
  }
  return Tensor::from_vector(v, {grid * grid, D});
}

struct PatchEmbed : nn::Module {
  nn::Conv2d& proj;
  PatchEmbed(const DiTConfig& c)
      : proj(register_module("proj", std::make_unique<nn::Conv2d>(c.in_channels, c.inner_dim(), nn::Size2(c.patch_size),
                                                                  nn::Conv2dOptions{.stride = nn::Size2(c.patch_size)}))) {}
  std::string type_name() const override { return "PatchEmbed"; }
};

/// TimestepEmbedding: linear_2(silu(linear_1(x))), split over the ranks between the two.
struct TimestepEmbedding : nn::Module {
  nn::ColumnParallelLinear& linear_1;
  nn::RowParallelLinear& linear_2;
  explicit TimestepEmbedding(std::int64_t D)
      : linear_1(register_module("linear_1", std::make_unique<nn::ColumnParallelLinear>(256, D, true, false))),
        linear_2(register_module("linear_2", std::make_unique<nn::RowParallelLinear>(D, D, true, true))) {}
  std::string type_name() const override { return "TimestepEmbedding"; }
};

struct LabelEmbedding : nn::Module {
  nn::Embedding& embedding_table;
  LabelEmbedding(std::int64_t classes, std::int64_t D)
      : embedding_table(register_module("embedding_table", std::make_unique<nn::Embedding>(classes + 1, D))) {}
  std::string type_name() const override { return "LabelEmbedding"; }
};

struct CombinedEmbeddings : nn::Module {
  TimestepEmbedding& timestep_embedder;
  LabelEmbedding& class_embedder;
  explicit CombinedEmbeddings(const DiTConfig& c)
      : timestep_embedder(register_module("timestep_embedder", std::make_unique<TimestepEmbedding>(c.inner_dim()))),
        class_embedder(register_module("class_embedder", std::make_unique<LabelEmbedding>(c.num_embeds_ada_norm, c.inner_dim()))) {}
  std::string type_name() const override { return "CombinedTimestepLabelEmbeddings"; }
};

struct AdaLayerNormZero : nn::Module {
  CombinedEmbeddings& emb;
  nn::ColumnParallelLinear& linear;
  explicit AdaLayerNormZero(const DiTConfig& c)
      : emb(register_module("emb", std::make_unique<CombinedEmbeddings>(c))),
        linear(register_module("linear", std::make_unique<nn::ColumnParallelLinear>(c.inner_dim(), 6 * c.inner_dim(), true, true))) {}
  std::string type_name() const override { return "AdaLayerNormZero"; }
};

struct DiTAttention : nn::Module {
  nn::ColumnParallelLinear& to_q;
  nn::ColumnParallelLinear& to_k;
  nn::ColumnParallelLinear& to_v;
  nn::Module& to_out;
  nn::RowParallelLinear& out0;
  explicit DiTAttention(const DiTConfig& c)
      : to_q(register_module("to_q", std::make_unique<nn::ColumnParallelLinear>(c.inner_dim(), c.inner_dim(), c.attention_bias, false))),
        to_k(register_module("to_k", std::make_unique<nn::ColumnParallelLinear>(c.inner_dim(), c.inner_dim(), c.attention_bias, false))),
        to_v(register_module("to_v", std::make_unique<nn::ColumnParallelLinear>(c.inner_dim(), c.inner_dim(), c.attention_bias, false))),
        to_out(register_module("to_out", std::make_unique<nn::Module>())),
        out0(to_out.register_module("0", std::make_unique<nn::RowParallelLinear>(c.inner_dim(), c.inner_dim(), true, true))) {}
  std::string type_name() const override { return "Attention"; }
};

/// FeedForward: net.0 (GELU with its projection, tanh approximation), net.1 (dropout), net.2.
struct FeedForward : nn::Module {
  nn::Module& net;
  nn::ColumnParallelLinear* proj = nullptr;
  nn::RowParallelLinear* out = nullptr;
  explicit FeedForward(const DiTConfig& c) : net(register_module("net", std::make_unique<nn::Module>())) {
    nn::Module& gelu = net.register_module("0", std::make_unique<nn::Module>());
    proj = &gelu.register_module("proj", std::make_unique<nn::ColumnParallelLinear>(c.inner_dim(), 4 * c.inner_dim(), true, false));
    out = &net.register_module("2", std::make_unique<nn::RowParallelLinear>(4 * c.inner_dim(), c.inner_dim(), true, true));
  }
  std::string type_name() const override { return "FeedForward"; }
  Var operator()(Var x) const { return (*out)(F::gelu((*proj)(x), "tanh")); }
};

struct DiTBlock : nn::Module {
  AdaLayerNormZero& norm1;
  DiTAttention& attn1;
  FeedForward& ff;
  explicit DiTBlock(const DiTConfig& c)
      : norm1(register_module("norm1", std::make_unique<AdaLayerNormZero>(c))),
        attn1(register_module("attn1", std::make_unique<DiTAttention>(c))),
        ff(register_module("ff", std::make_unique<FeedForward>(c))) {}
  std::string type_name() const override { return "BasicTransformerBlock"; }
};

/// x * (1 + scale[:, None]) + shift[:, None] for x [N, P, D], shift/scale [N, D].
Var modulate(Var x, Var shift, Var scale) {
  const std::int64_t N = x.dim(0), D = x.dim(2);
  return x * (F::reshape(scale, {N, 1, D}) + 1.0) + F::reshape(shift, {N, 1, D});
}

/// chunk i of n of x [N, n * D] along dim 1.
Var chunk(Var x, std::int64_t n, std::int64_t i) {
  const std::int64_t D = x.dim(1) / n;
  return F::slice(x, 1, i * D, (i + 1) * D);
}

/// The denoiser stage (see dit.h).
struct Denoiser : nn::Module {
  DiTConfig cfg;
  bool guidance;
  bool clip;
  double clip_range;
  int tp;
  PatchEmbed& pos_embed;
  nn::ModuleList<DiTBlock>& transformer_blocks;
  nn::ColumnParallelLinear& proj_out_1;
  nn::Linear& proj_out_2;

  explicit Denoiser(const InferenceConfig& config)
      : cfg(dit_from_attributes(config)),
        guidance(config.get_bool("guidance")),
        clip(config.get_bool("clip_sample")),
        clip_range(config.get_float("clip_sample_range")),
        tp(config.runtime_config().tp_degree),
        pos_embed(register_module("pos_embed", std::make_unique<PatchEmbed>(cfg))),
        transformer_blocks(register_module("transformer_blocks", std::make_unique<nn::ModuleList<DiTBlock>>())),
        proj_out_1(register_module("proj_out_1", std::make_unique<nn::ColumnParallelLinear>(cfg.inner_dim(), 2 * cfg.inner_dim(), true, true))),
        proj_out_2(register_module("proj_out_2", std::make_unique<nn::Linear>(cfg.inner_dim(), cfg.patch_size * cfg.patch_size * cfg.out_channels))) {
    for (std::int64_t i = 0; i < cfg.num_layers; ++i) transformer_blocks.push_back(std::make_unique<DiTBlock>(cfg));
    register_buffer("timestep_table", timestep_table(config.get_int("num_train_timesteps")));
    register_buffer("pos_table", pos_embed_table(cfg.inner_dim(), cfg.sample_size / cfg.patch_size));
  }
  std::string type_name() const override { return "DiTTransformer2DModel"; }

  /// latents [B, C, S, S], class_labels [B], timestep [B] (int64), coeffs [B, 4] float32
  /// (1 / sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)), guidance_scale [B] float32.
  Var forward(Var latents, Var class_labels, Var timestep, Var coeffs, Var guidance_scale) {
    const std::int64_t B = latents.dim(0), C = cfg.in_channels, S = cfg.sample_size, p = cfg.patch_size;
    const std::int64_t D = cfg.inner_dim(), grid = S / p, P = grid * grid, heads = cfg.num_attention_heads / tp;
    Var x = latents, labels = class_labels, t = timestep;
    if (guidance) {  // the classes, then the null class (row num_embeds_ada_norm of the class table)
      x = F::concat({latents, latents}, 0);
      labels = F::concat({class_labels, F::full({B}, static_cast<double>(cfg.num_embeds_ada_norm), DType::Int64)}, 0);
      t = F::concat({timestep, timestep}, 0);
    }
    const std::int64_t N = x.dim(0);
    // Patch embedding plus the fixed position embedding: [N, P, D].
    Var h = F::transpose(F::reshape(pos_embed.proj(x), {N, D, P}), 1, 2) + buffer("pos_table");
    Var t_proj = F::index_select(buffer("timestep_table"), 0, t);  // [N, 256]
    Var cond0;
    for (std::size_t i = 0; i < transformer_blocks.size(); ++i) {
      DiTBlock& blk = transformer_blocks[i];
      CombinedEmbeddings& e = blk.norm1.emb;
      Var temb = e.timestep_embedder.linear_2(F::silu(e.timestep_embedder.linear_1(t_proj)));
      Var cond = temb + e.class_embedder.embedding_table(labels);  // [N, D]
      if (i == 0) cond0 = cond;
      Var mod = blk.norm1.linear(F::silu(cond));  // [N, 6D]: shift, scale, gate (attention), shift, scale, gate (MLP)
      Var n = modulate(F::layer_norm(h, {D}, std::nullopt, std::nullopt, 1e-6), chunk(mod, 6, 0), chunk(mod, 6, 1));
      DiTAttention& at = blk.attn1;
      auto heads_of = [&](Var y) { return F::transpose(F::reshape(y, {N, P, heads, cfg.attention_head_dim}), 1, 2); };
      Var a = F::scaled_dot_product_attention(heads_of(at.to_q(n)), heads_of(at.to_k(n)), heads_of(at.to_v(n)));
      a = at.out0(F::reshape(F::transpose(a, 1, 2), {N, P, heads * cfg.attention_head_dim}));
      h = h + F::reshape(chunk(mod, 6, 2), {N, 1, D}) * a;
      n = modulate(F::layer_norm(h, {D}, std::nullopt, std::nullopt, cfg.norm_eps), chunk(mod, 6, 3), chunk(mod, 6, 4));
      h = h + F::reshape(chunk(mod, 6, 5), {N, 1, D}) * blk.ff(n);
    }
    // The output layer, modulated by the first block's conditioning: shift, then scale.
    Var out_mod = proj_out_1(F::silu(cond0));
    h = modulate(F::layer_norm(h, {D}, std::nullopt, std::nullopt, 1e-6), chunk(out_mod, 2, 0), chunk(out_mod, 2, 1));
    h = proj_out_2(h);  // [N, P, p * p * out]
    // Unpatchify: [N, grid, grid, p, p, out] -> [N, out, grid, p, grid, p] -> [N, out, S, S].
    const std::int64_t O = cfg.out_channels;
    Var img = F::reshape(F::permute(F::reshape(h, {N, grid, grid, p, p, O}), {0, 5, 1, 3, 2, 4}), {N, O, S, S});
    Var eps = O == C ? img : F::slice(img, 1, 0, C);  // learned sigma: the first C channels
    if (guidance) {
      Var cond_eps = F::slice(eps, 0, 0, B), uncond_eps = F::slice(eps, 0, B, 2 * B);
      eps = uncond_eps + F::reshape(guidance_scale, {B, 1, 1, 1}) * (cond_eps - uncond_eps);
    }
    // DDIM (eta 0): x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), clipped; x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    auto coef = [&](std::int64_t k) { return F::reshape(F::slice(coeffs, 1, k, k + 1), {B, 1, 1, 1}); };
    Var x0 = (latents - coef(1) * eps) * coef(0);
    if (clip) x0 = F::relu(x0 + clip_range) - F::relu(x0 - clip_range) - clip_range;  // clamp(x0, -r, r)
    return coef(2) * x0 + coef(3) * eps;
  }
};

class DenoiserWrapper : public ModelWrapper {
 public:
  explicit DenoiserWrapper(const InferenceConfig& c)
      : ModelWrapper(c, model_cls<Denoiser>(), options()),
        channels_(c.get_int("in_channels")),
        size_(c.get_int("sample_size")) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({1, channels_, size_, size_}), Tensor::zeros({1}, DType::Int64), Tensor::zeros({1}, DType::Int64),
             Tensor::zeros({1, 4}), Tensor::zeros({1})}};
  }
  std::vector<std::string> input_names() const override {
    return {"latents", "class_labels", "timestep", "coefficients", "guidance_scale"};
  }

 private:
  static WrapperOptions options() {
    WrapperOptions o;
    o.pipeline_execution = true;
    o.return_ranked_to_cpu = false;
    o.tag = "denoiser";
    return o;
  }
  std::int64_t channels_, size_;
};

}  // namespace

std::vector<std::pair<std::string, Tensor>> dit_random_state_dict(const InferenceConfig& config, std::uint64_t seed) {
  return nn::random_state_dict(Denoiser(config), seed);
}

// ------------------------------------------------------------------------ application

DiTPipeline::DiTPipeline(const std::string& pipeline_dir, const InferenceConfig& config)
    : ApplicationBase((fs::path(pipeline_dir) / "transformer").string(), config),
      cfg_(dit_from_attributes(config)),
      sched_(scheduler_from_attributes(config)),
      has_vae_(config.get_bool("vae")),
      guidance_(config.get_bool("guidance")),
      rows_(config.runtime_config().batch_size) {
  models.push_back(std::make_shared<DenoiserWrapper>(config));
  if (has_vae_) models.push_back(vae_decoder_wrapper(config, (fs::path(pipeline_dir) / "vae").string()));
}

ModelWrapper& DiTPipeline::vae_decoder() {
  if (!has_vae_) throw StateError("DiTPipeline: no vae_decoder stage (the pipeline folder has no vae/, or dit_config vae=false)");
  return *models.at(1);
}

std::array<float, 4> DDIMSchedulerConfig::step_coefficients(const std::vector<float>& alphas_cumprod, std::int64_t t,
                                                             std::int64_t steps) const {
  const auto at = [&](std::int64_t i) {
    if (i < 0 || i >= static_cast<std::int64_t>(alphas_cumprod.size())) {
      throw InvalidArgument("DDIM: timestep " + std::to_string(i) + " is outside [0, num_train_timesteps " +
                            std::to_string(alphas_cumprod.size()) + ")");
    }
    return alphas_cumprod[static_cast<std::size_t>(i)];
  };
  const std::int64_t prev = t - num_train_timesteps / steps;  // as DDIMScheduler.step
  const float a_t = at(t);
  const float a_prev = prev >= 0 ? at(prev) : (set_alpha_to_one ? 1.0f : at(0));
  return {1.0f / std::sqrt(a_t), std::sqrt(1.0f - a_t), std::sqrt(a_prev), std::sqrt(1.0f - a_prev)};
}

void DiTPipeline::check_request(const std::vector<std::int64_t>& class_labels, const Tensor& latents, std::int64_t steps,
                                double guidance_scale) const {
  const auto n = static_cast<std::int64_t>(class_labels.size());
  // ---- every request checked before anything runs
  if (n < 1) throw InvalidArgument("generate: no class labels");
  if (n > rows_) {
    throw InvalidArgument("generate: " + std::to_string(n) + " images, but the pipeline was compiled for batch_size " +
                          std::to_string(rows_));
  }
  const Shape want{n, cfg_.in_channels, cfg_.sample_size, cfg_.sample_size};
  if (latents.dtype() != DType::Float32 || latents.shape() != want) {
    throw InvalidArgument("generate: latents are " + std::string(dtype_name(latents.dtype())) + " " + latents.shape().to_string() +
                          ", expected float32 " + want.to_string() + " (one per class label)");
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t c = class_labels[static_cast<std::size_t>(i)];
    if (c < 0 || c >= cfg_.num_embeds_ada_norm) {
      throw InvalidArgument("generate: class label " + std::to_string(c) + " of image " + std::to_string(i) +
                            " is outside [0, num_embeds_ada_norm " + std::to_string(cfg_.num_embeds_ada_norm) + ")");
    }
  }
  if (guidance_ && !(guidance_scale > 1)) {
    throw InvalidArgument("generate: guidance_scale " + std::to_string(guidance_scale) +
                          " must be > 1: the pipeline was compiled with classifier-free guidance (dit_config guidance=false "
                          "compiles it without)");
  }
  if (!guidance_ && guidance_scale > 1) {
    throw InvalidArgument("generate: guidance_scale " + std::to_string(guidance_scale) +
                          " needs classifier-free guidance, which this pipeline was compiled without");
  }
  const std::int64_t T = sched_.num_train_timesteps;
  for (std::int64_t t : sched_.timesteps(steps)) {
    if (t < 0 || t >= T) {
      throw InvalidArgument("generate: timestep " + std::to_string(t) + " (steps_offset " + std::to_string(sched_.steps_offset) +
                            ") is outside [0, num_train_timesteps " + std::to_string(T) + ")");
    }
  }
}

DiffusionResult DiTPipeline::generate(const std::vector<std::int64_t>& class_labels, const Tensor& latents,
                                      std::int64_t steps, double guidance_scale, const StepCallback& on_step) {
  const auto start = std::chrono::steady_clock::now();
  check_request(class_labels, latents, steps, guidance_scale);
  const auto n = static_cast<std::int64_t>(class_labels.size());
  const std::vector<std::int64_t> ts = sched_.timesteps(steps);
  const std::vector<float> ac = sched_.alphas_cumprod();

  Tensor labels = Tensor::from_vector_i64(class_labels, {n});
  Tensor scale = Tensor::full({n}, guidance_scale);
  Input current = latents;  // then each step's ranked output: the latents stay on the devices
  Output out;
  for (std::size_t s = 0; s < ts.size(); ++s) {
    const std::int64_t t = ts[s];
    const std::array<float, 4> k = sched_.step_coefficients(ac, t, steps);
    Tensor coeffs = Tensor::zeros({n, 4});
    for (std::int64_t i = 0; i < n; ++i) std::copy(k.begin(), k.end(), coeffs.data<float>() + 4 * i);
    out = denoiser().forward({current, labels, Tensor::full({n}, static_cast<double>(t), DType::Int64), coeffs, scale});
    current = out;
    if (on_step) on_step(static_cast<std::int64_t>(s) + 1, steps, t, out.ranked());
  }
  DiffusionResult r;
  if (has_vae_) r.images = vae_decoder().forward({out}).tensor(0);  // the latents in place on the ranks
  r.latents = out.ranked().to_host().at(0);
  r.timesteps = ts;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace devpipe::models

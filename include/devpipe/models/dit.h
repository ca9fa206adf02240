// devpipe — a diffusion model: diffusers' DiTPipeline (the class-conditional DiT transformer of
// Peebles & Xie, DiTTransformer2DModel, with the DDIM scheduler and classifier-free guidance),
// loaded from a diffusers pipeline folder, as an application of one stage run once per
// denoising step:
//
//   denoiser   latents [B, C, S, S], class_labels [B], timestep [B], the step's scheduler
//              coefficients [B, 4] and guidance scale [B] -> the next latents [B, C, S, S]. In one
//              graph: the batch doubled for guidance (the classes, then the null class), the DiT
//              transformer (patch embedding with the fixed 2D sin-cos position embedding, blocks
//              with adaLN-Zero modulation from the timestep and class embeddings, attention and a
//              GELU MLP, the modulated output layer, unpatchify), the learned-sigma split, the
//              guidance combine and the DDIM step (eta 0). Pipeline execution: its output stays
//              on the ranks' devices and is the next step's input, so the latents never leave
//              the devices between steps; only the last step's come back to the host.
//
// The folder (diffusers' layout, e.g. facebook/DiT-XL-2-256): transformer/config.json
// (DiTTransformer2DModel's keys: num_attention_heads, attention_head_dim, in_channels,
// out_channels, num_layers, sample_size, patch_size, num_embeds_ada_norm, norm_eps, ...),
// transformer/diffusion_pytorch_model.safetensors (or a sharded index) with diffusers' names,
// scheduler/scheduler_config.json (DDIMScheduler's keys), and optionally vae/ (AutoencoderKL:
// config.json and its diffusion_pytorch_model.safetensors). With a vae/ the application has a
// second stage, vae_decoder (devpipe/models/vae.h), run once after the last step on that step's
// latents in place on the ranks: generate() then also returns the images diffusers' DiTPipeline
// returns (1 / scaling_factor * latents, decoded, / 2 + 0.5, clamped to [0, 1]; as [B, 3, H, W],
// not permuted to channels-last). Without one generate() returns the latents only (diffusers'
// output_type="latent").
//
// Tensor parallel: the attention heads, the MLP, the timestep MLP, the adaLN modulation and the
// output modulation are split with ColumnParallelLinear / RowParallelLinear; the patch
// embedding, the class table and the last projection are replicated. The VAE decoder is
// replicated whole on every rank.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/models/vae.h"
#include "devpipe/ranked.h"
#include "devpipe/tensor.h"

namespace devpipe::models {

/// The fields of a diffusers DiTTransformer2DModel config.json.
struct DiTConfig {
  std::int64_t num_attention_heads = 16;
  std::int64_t attention_head_dim = 72;
  std::int64_t in_channels = 4;
  std::int64_t out_channels = 0;  // 0: in_channels (no learned sigma); 2 * in_channels: learned sigma
  std::int64_t num_layers = 28;
  std::int64_t sample_size = 32;  // latent height = width
  std::int64_t patch_size = 2;
  std::int64_t num_embeds_ada_norm = 1000;  // classes; the class table has one more row (the null class)
  double norm_eps = 1e-5;
  bool attention_bias = true;

  /// Reads <dir>/config.json; ConfigError naming the file and the key that is missing,
  /// mistyped, unsupported (norm_type other than "ada_norm_zero", activation_fn other than
  /// "gelu-approximate", norm_elementwise_affine) or out of range.
  static DiTConfig from_hf_folder(const std::string& dir);
  std::int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
};

/// The fields of a diffusers DDIMScheduler scheduler_config.json (eta 0, epsilon prediction).
struct DDIMSchedulerConfig {
  std::int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";  // "linear" or "scaled_linear"
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = true;
  std::int64_t steps_offset = 0;
  std::string timestep_spacing = "leading";  // "leading", "trailing" or "linspace"

  /// Reads a scheduler_config.json; ConfigError naming the file and the key (a prediction_type
  /// other than "epsilon", thresholding, an unknown schedule or spacing).
  static DDIMSchedulerConfig from_file(const std::string& path);
  /// alphas_cumprod[t] for t in [0, num_train_timesteps), in float32 as diffusers computes it.
  std::vector<float> alphas_cumprod() const;
  /// The timesteps of `steps` inference steps, first (noisiest) first, as set_timesteps gives
  /// them; InvalidArgument for steps outside [1, num_train_timesteps].
  std::vector<std::int64_t> timesteps(std::int64_t steps) const;
  /// DDIM's step from timestep t of a `steps`-step run, as the denoiser stage takes it:
  /// {1 / sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)}, a = alphas_cumprod, prev =
  /// t - num_train_timesteps / steps (a_prev = 1, or alphas_cumprod[0] without set_alpha_to_one,
  /// before the first), in float32 as diffusers' step() computes them.
  std::array<float, 4> step_coefficients(const std::vector<float>& alphas_cumprod, std::int64_t t,
                                         std::int64_t steps) const;
};

/// The InferenceConfig of a DiT pipeline: `runtime` (batch_size: the most images per
/// generate(), buckets, dtype, tp_degree) plus the transformer and scheduler configs of
/// `pipeline_dir`; `guidance`: compile classifier-free guidance in (the batch doubled inside
/// the stage; generate()'s guidance_scale then applies, and must be > 1); `vae`: decode the
/// latents with the folder's vae/ when it has one (its AutoencoderKLConfig recorded with
/// set_vae_attributes; attribute "vae" says whether there is one). ConfigError naming the values
/// when tp_degree does not divide the heads, or the VAE's latent_channels differ from the
/// transformer's in_channels.
InferenceConfig dit_config(const std::string& pipeline_dir, RuntimeConfig runtime, bool guidance = true,
                           bool vae = true);

/// What generate() returns.
struct DiffusionResult {
  Tensor latents;                        // [B, C, S, S] float32, after the last step
  Tensor images;                         // [B, 3, S', S'] float32 in [0, 1] from the vae_decoder
                                         // stage (S' = S * AutoencoderKLConfig::upscale()); empty
                                         // without a vae
  std::vector<std::int64_t> timesteps;   // the steps run, in order
  double seconds = 0;                    // wall time of the whole generation (with the decode)
};

/// Called after each denoising step is queued: step (1-based), steps in all, its timestep, and
/// the latents it produces, on the ranks' devices (like diffusers' callback_on_step_end; reading
/// them, e.g. latents.to_host(), waits for the step).
using StepCallback =
    std::function<void(std::int64_t step, std::int64_t steps, std::int64_t timestep, const RankedTensors& latents)>;

/// A random checkpoint of the transformer `config` describes, with diffusers' names, drawn as
/// nn::random_state_dict does (for examples and benchmarks).
std::vector<std::pair<std::string, Tensor>> dit_random_state_dict(const InferenceConfig& config, std::uint64_t seed);

/// The application: models[0] is the denoiser, models[1] the vae_decoder when the config has a
/// vae (compiled from pipeline_dir/vae); compile(path) / load(path) as ApplicationBase.
class DiTPipeline : public ApplicationBase {
 public:
  /// `config` from dit_config().
  DiTPipeline(const std::string& pipeline_dir, const InferenceConfig& config);

  /// Denoises `latents` (float32 [B, in_channels, S, S], e.g. standard normal noise) for the
  /// classes `class_labels` (one per image, in [0, num_embeds_ada_norm)) over `steps` DDIM
  /// steps. Blocking. Throws InvalidArgument before running anything for latents of another
  /// shape or dtype, a label out of range, more images than batch_size, steps outside [1,
  /// num_train_timesteps], or a guidance_scale <= 1 with guidance compiled in (> 1 without it);
  /// each message names the values. With a vae the last step's latents go on to the vae_decoder
  /// stage on the ranks' devices, and the images come back with the latents.
  /// The checks generate() makes before it runs anything (usable before compile/load).
  void check_request(const std::vector<std::int64_t>& class_labels, const Tensor& latents, std::int64_t steps,
                     double guidance_scale) const;
  DiffusionResult generate(const std::vector<std::int64_t>& class_labels, const Tensor& latents, std::int64_t steps,
                           double guidance_scale = 4.0, const StepCallback& on_step = {});

  const DiTConfig& transformer_config() const { return cfg_; }
  const DDIMSchedulerConfig& scheduler_config() const { return sched_; }
  ModelWrapper& denoiser() { return *models[0]; }
  bool has_vae() const { return has_vae_; }
  /// The vae_decoder stage; StateError without a vae.
  ModelWrapper& vae_decoder();

 private:
  DiTConfig cfg_;
  DDIMSchedulerConfig sched_;
  bool has_vae_ = false;
  bool guidance_ = true;
  std::int64_t rows_ = 0;
};

}  // namespace devpipe::models

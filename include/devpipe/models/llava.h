// devpipe — a vision-language model: Hugging Face's LlavaForConditionalGeneration with a Pixtral
// vision tower (the architecture of Mistral's Pixtral 12B) and a Llama/Mistral text decoder,
// loaded from a Hugging Face folder, as an application of three stages:
//
//   vision_encoder     pixel_values [B, C, H, W] -> image features [B, P, text hidden]: the
//                      Pixtral vision transformer (patch conv, RMSNorm, layers with 2D rotary
//                      attention and a gated MLP) and the multi-modal projector. Pipeline
//                      execution: its output stays on the ranks' devices.
//   context_encoding   the Llama prefill (devpipe/models/llama.h) on the token embeddings with
//                      each image's features in place of its image tokens; takes the vision
//                      stage's ranked output directly, so the features never reach the host.
//   token_generation   the Llama token-generation stage, unchanged (the KV cache is shared
//                      with context_encoding through the application's state store).
//
// One image per prompt, every image of one size H x W fixed at compile time (LlavaOptions;
// multiples of the patch size, at most the vision config's image_size): P = (H / patch) *
// (W / patch) features per image ("full" feature selection; "default" drops the first, P - 1).
// A prompt holds exactly that many image_token_index ids (what Pixtral's processor writes for
// the image's [IMG] tokens; its [IMG_BREAK] / [IMG_END] tokens are ordinary text tokens); the
// k-th image token of prompt b is replaced by feature k of image b, as HF's masked_scatter does.
//
// The HF folder: config.json with "text_config" (Llama or Mistral keys, see llama.h; a
// sliding_window shorter than max_length is refused), "vision_config" (model_type "pixtral":
// hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, head_dim,
// num_channels, image_size, patch_size, hidden_act "gelu" | "silu", rope_theta), and
// image_token_index, projector_hidden_act, vision_feature_layer (an int),
// vision_feature_select_strategy, multimodal_projector_bias; model.safetensors (or a sharded
// index) with the names of either layout: the Hub's (vision_tower.*, multi_modal_projector.*,
// language_model.model.*, language_model.lm_head.weight) or transformers >= 4.52's
// (model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*,
// lm_head.weight). Vision layers past vision_feature_layer are not compiled (their weights are
// skipped).
//
// Tensor parallel: the vision attention heads and MLP are split with ColumnParallelLinear /
// RowParallelLinear, the projector's linear_1 by columns and linear_2 by rows (its output
// all-reduced: every rank holds the whole features); the text model as in llama.h.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/models/llama.h"
#include "devpipe/tensor.h"

namespace devpipe::models {

/// The fields of an HF Pixtral vision_config (HF's defaults where a key is absent).
struct PixtralVisionConfig {
  std::int64_t hidden_size = 1024;
  std::int64_t intermediate_size = 4096;
  std::int64_t num_hidden_layers = 24;
  std::int64_t num_attention_heads = 16;
  std::int64_t head_dim = 0;  // hidden_size / num_attention_heads unless given (must agree)
  std::int64_t num_channels = 3;
  std::int64_t image_size = 1024;  // the largest image side; the 2D rotary grid is image_size / patch_size wide
  std::int64_t patch_size = 16;
  std::string hidden_act = "gelu";  // "gelu" (exact) or "silu"
  double rope_theta = 10000.0;
};

/// The fields of an HF LlavaForConditionalGeneration config.json.
struct LlavaConfig {
  LlamaConfig text;
  PixtralVisionConfig vision;
  std::int64_t image_token_index = 32000;
  std::string projector_hidden_act = "gelu";  // "gelu" (exact) or "silu"
  /// Which hidden state of the vision tower feeds the projector, Python-indexed over its
  /// num_hidden_layers + 1 states (0: after ln_pre, -1: the last layer's output).
  std::int64_t vision_feature_layer = -2;
  std::string vision_feature_select_strategy = "default";  // "full" or "default" (drops patch 0)
  bool multimodal_projector_bias = true;

  /// Reads <model_dir>/config.json; ConfigError names the file and the key that is missing,
  /// mistyped, unsupported (a vision tower other than Pixtral, a list of feature layers) or out
  /// of range.
  static LlavaConfig from_hf_folder(const std::string& model_dir);
  /// The vision tower's layers the model runs: vision_feature_layer as a non-negative index.
  std::int64_t vision_layers_used() const;
  /// Features of one image of height x width pixels = the image tokens its prompt holds:
  /// (height / patch_size) * (width / patch_size), one fewer with the "default" strategy.
  std::int64_t image_tokens(std::int64_t height, std::int64_t width) const;
};

/// Options of the application beyond the HF config.
struct LlavaOptions {
  /// The text model's buckets and cache (as for LlamaForCausalLM; prompts include their image
  /// tokens).
  LlamaOptions text;
  /// The images' size in pixels; 0: the vision config's image_size.
  std::int64_t image_height = 0;
  std::int64_t image_width = 0;
};

/// The InferenceConfig of a Llava application: llama_config()'s for the text model plus the
/// vision config, the image size and the projector as attributes. ConfigError naming the values
/// for an image size that is not a multiple of the patch size or exceeds image_size, an
/// image_token_index outside the vocabulary, or vision heads / intermediate size / text hidden
/// size that tp_degree does not divide.
InferenceConfig llava_config(const std::string& model_dir, RuntimeConfig runtime, const LlavaOptions& options = {});

/// A random checkpoint of the model `config` describes, with the Hub's names (every vision layer,
/// also those past vision_feature_layer), drawn as nn::random_state_dict does; for examples and
/// benchmarks (the weights a real checkpoint would hold).
std::vector<std::pair<std::string, Tensor>> llava_random_state_dict(const InferenceConfig& config, std::uint64_t seed);

/// The application: models[0] vision_encoder, models[1] context_encoding, models[2]
/// token_generation; compile(path) / load(path) as ApplicationBase.
class LlavaForConditionalGeneration : public ApplicationBase {
 public:
  /// `config` from llava_config().
  LlavaForConditionalGeneration(const std::string& model_dir, const InferenceConfig& config);

  /// Generates for a batch of prompts, prompt b about image b of `pixel_values` (float32
  /// [prompts, num_channels, image_height, image_width], already normalised as the model
  /// expects). Blocking. Throws InvalidArgument before running anything for everything
  /// LlamaForCausalLM::generate refuses, for pixel_values of another shape or dtype, and for a
  /// prompt whose count of image_token_index ids is not image_tokens(); each message names the
  /// sequence and the values.
  GenerationResult generate(const std::vector<std::vector<std::int64_t>>& prompts, const Tensor& pixel_values,
                            const GenerationConfig& gen = {}, const TokenCallback& on_token = {});
  /// The checks generate() makes before it runs anything (usable before compile/load).
  void check_request(const std::vector<std::vector<std::int64_t>>& prompts, const Tensor& pixel_values,
                     const GenerationConfig& gen) const;

  /// Features per image = image tokens a prompt must hold.
  std::int64_t image_tokens() const { return image_tokens_; }
  const LlavaConfig& llava() const { return cfg_; }
  ModelWrapper& vision_encoder() { return *models[0]; }
  ModelWrapper& context_encoding() { return *models[1]; }
  ModelWrapper& token_generation() { return *models[2]; }

 private:
  LlavaConfig cfg_;
  LlamaOptions text_opts_;
  std::int64_t rows_ = 0;
  std::int64_t image_height_ = 0, image_width_ = 0;
  std::int64_t image_tokens_ = 0;
};

}  // namespace devpipe::models

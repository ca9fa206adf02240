// devpipe — the Llama causal LM (the text model of Llama 3/4 and of Mistral), loaded from a
// Hugging Face folder, as an application of two stages sharing a KV cache on the device.
//
//   context_encoding   prefill: the prompts of a batch, bucketed on sequence length ("seq");
//                      writes every layer's K/V rows into the cache and samples token 0
//   token_generation   one token per sequence per step, bucketed on the batch and on the cache
//                      length ("cache": the attention_mask [batch, cache] input, HF-style, 1 =
//                      attend); appends to the cache and samples the next token. Each cache
//                      bucket C attends over the cache's first C positions in place (no copy
//                      of the cache); generate() passes the current length and the runtime
//                      picks the smallest bucket that holds every sequence.
//
// The cache is two states per layer, "layers.N.self_attn.k_cache" / "v_cache", of per-rank
// shape [batch_size, kv_heads / tp (or 1 when replicated), max_length, head_dim]; rows are
// sequences. Sampling runs on the device, so only token ids cross to the host each step.
//
// The HF folder: config.json with HF's keys (hidden_size, intermediate_size,
// num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim (optional),
// rms_norm_eps, rope_theta, vocab_size, max_position_embeddings, tie_word_embeddings,
// eos_token_id: an int or a list) and model.safetensors or a sharded index, with
// LlamaForCausalLM's state-dict names (model.embed_tokens.weight, model.layers.N.self_attn.
// q_proj.weight, ..., model.norm.weight, lm_head.weight unless tied).
//
// Tensor parallel: attention heads and the MLP are split with ColumnParallelLinear /
// RowParallelLinear; KV heads are split when tp divides them and replicated otherwise (tp a
// multiple of kv_heads: each rank keeps the one KV head its query heads use); the vocabulary
// is split when tp divides it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/nn.h"
#include "devpipe/tensor.h"

namespace devpipe::models {

/// The architecture fields of an HF Llama config.json.
struct LlamaConfig {
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // hidden_size / num_attention_heads unless given
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  std::vector<std::int64_t> eos_token_ids;
  /// Mistral's sliding_window (0: none, HF's null). devpipe attends over the whole cache, so a
  /// window shorter than max_length is refused by llama_config().
  std::int64_t sliding_window = 0;

  /// Reads <model_dir>/config.json; ConfigError names the file and the key that is missing,
  /// mistyped or out of range (heads not dividing hidden, odd head_dim, ...).
  static LlamaConfig from_hf_folder(const std::string& model_dir);
  /// As InferenceConfig attributes (the HF key names; eos_token_id as an int list).
  void to_attributes(InferenceConfig& config) const;
  /// Back from InferenceConfig attributes (what the stages read when traced).
  static LlamaConfig from_attributes(const InferenceConfig& config);
};

/// Options of the application beyond the HF config.
struct LlamaOptions {
  /// Context-encoding sequence buckets (the longest prompt is the largest).
  std::vector<std::int64_t> context_buckets{16, 32, 64, 128};
  /// Token-generation cache-length buckets, each in [1, max_length]; max_length is always the
  /// largest (added when the list stops short of it). Empty: 128, 256, 512, ... below
  /// max_length, then max_length. The token-generation stage is compiled for every batch
  /// bucket x cache bucket.
  std::vector<std::int64_t> cache_buckets;
  /// KV cache length per sequence: prompt + generated tokens; 0: max_position_embeddings.
  std::int64_t max_length = 0;
  /// Also return logits (context encoding: [batch, seq, vocab]; token generation: [batch,
  /// vocab]): for tests; they then cross to the host every step.
  bool output_logits = false;
};

/// The first default cache bucket (then doubling up to max_length).
inline constexpr std::int64_t kFirstCacheBucket = 128;

/// The cache buckets LlamaOptions::cache_buckets asks for with this max_length: sorted, de-
/// duplicated, max_length last (the default list when `buckets` is empty). ConfigError naming
/// the buckets when one lies outside [1, max_length].
std::vector<std::int64_t> resolve_cache_buckets(std::vector<std::int64_t> buckets, std::int64_t max_length);

/// The InferenceConfig of a Llama application: `runtime` (batch_size: the most sequences per
/// generate(); buckets: token-generation batch buckets; dtype, tp_degree, device) plus the HF
/// config of `model_dir` and `options` as attributes; the context buckets become the named
/// dim "seq", the cache buckets "cache" (recorded in the artifacts and checked at load: an
/// artifact compiled with other cache buckets is refused with an ArtifactMismatch naming both).
InferenceConfig llama_config(const std::string& model_dir, RuntimeConfig runtime, const LlamaOptions& options = {});

/// The decoder of one stage (traced per bucket; see the file comment). `decode` selects the
/// token-generation graph.
class LlamaModel : public nn::Module {
 public:
  LlamaModel(const InferenceConfig& config, bool decode);
  ~LlamaModel() override;
  std::string type_name() const override { return "LlamaForCausalLM"; }
  /// Context encoding: input_ids [B, T], positions1 [B, T] (position + 1; 0 = padding),
  /// last_index [B] (index of each prompt's last token), sampling [B, 3], u [B].
  /// Token generation: input_ids [B, 1], positions1 [B, 1], attention_mask [B, C] (int64, 1 =
  /// a cache position to attend; C the cache bucket), sampling [B, 3], u [B].
  /// Returns the sampled ids [B] (and the logits with output_logits).
  std::vector<Var> encode(Var input_ids, Var positions1, Var last_index, Var sampling, Var u);
  std::vector<Var> decode(Var input_ids, Var positions1, Var attention_mask, Var sampling, Var u);
  /// The token embeddings [B, T, hidden] of input_ids (encode()'s first step).
  Var embed(Var input_ids);
  /// encode() from embeddings [B, T, hidden] instead of ids (a vision-language model merges
  /// image features into the token embeddings first).
  std::vector<Var> encode_embeds(Var embeds, Var positions1, Var last_index, Var sampling, Var u);

 private:
  struct Layers;
  // attention_mask: token generation's [B, C] (attends over the cache); none: prefill.
  Var hidden(Var x, Var positions, Var kv_lengths, std::optional<Var> attention_mask);
  Var lm_head(Var h);
  LlamaConfig cfg_;
  LlamaOptions opts_;
  std::int64_t rows_ = 0;  // KV cache rows (batch_size)
  int tp_ = 1;
  std::unique_ptr<Layers> layers_;
};

/// How to pick tokens.
struct GenerationConfig {
  std::int64_t max_new_tokens = 32;
  /// <= 0: greedy (argmax). Otherwise softmax(logits / temperature) cut by top_k / top_p.
  double temperature = 0.0;
  std::int64_t top_k = 0;   // <= 0: no cut
  double top_p = 1.0;       // >= 1: no cut
  std::uint64_t seed = 0;   // the draws of a sampling run (one uniform per sequence per step)
  /// Stop a sequence after it emits one of the eos_token_ids (the eos is returned).
  bool stop_at_eos = true;
};

/// What generate() returns.
struct GenerationResult {
  std::vector<std::vector<std::int64_t>> tokens;  // new tokens per sequence
  /// With LlamaOptions::output_logits: the prefill logits [B, Tmax, V] (rows past a prompt's
  /// length unspecified) and each decode step's [B, V] (step s gives new token s + 1).
  Tensor prefill_logits;
  std::vector<Tensor> decode_logits;
  /// The cache bucket each decode step ran in (step s: the bucket that held every live
  /// sequence's length after it), as the runtime reports it (Output::bucket()).
  std::vector<std::int64_t> decode_cache_buckets;
  double seconds = 0;  // wall time of the whole generation
  std::int64_t generated = 0;  // tokens generated in all
};

/// Called for each new token as it is produced: sequence index, token id.
using TokenCallback = std::function<void(std::int64_t sequence, std::int64_t token)>;

/// The application: compile(path) / load(path) as ApplicationBase; models[0] is the
/// context-encoding stage, models[1] the token-generation stage.
class LlamaForCausalLM : public ApplicationBase {
 public:
  /// `config` from llama_config().
  LlamaForCausalLM(const std::string& model_dir, const InferenceConfig& config);

  /// Generates for a batch of prompts (token ids; lengths may differ; at most batch_size).
  /// Blocking. Throws InvalidArgument before running anything for an empty prompt, a prompt
  /// longer than the largest context bucket, a token id outside [0, vocab_size), a request
  /// whose prompt + max_new_tokens passes max_position_embeddings or the cache length, or more
  /// prompts than batch_size; each message names the sequence and the values.
  GenerationResult generate(const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen = {},
                            const TokenCallback& on_token = {});
  /// The checks generate() makes before it runs anything (usable before compile/load).
  void check_request(const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen) const;

  const LlamaConfig& llama() const { return cfg_; }
  ModelWrapper& context_encoding() { return *models[0]; }
  ModelWrapper& token_generation() { return *models[1]; }

 private:
  LlamaConfig cfg_;
  LlamaOptions opts_;
  std::int64_t rows_ = 0;
};

}  // namespace devpipe::models

// devpipe — the pieces of the Llama application that other models built on its decoder share
// (internal: the vision-language model of llava.cpp uses them).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "devpipe/models/llama.h"
#include "models/hf_config.h"

namespace devpipe::models {


/// The Llama/Mistral architecture fields of an HF config object (a whole config.json, or a
/// VLM's "text_config"); `where` names it in errors ("'dir/config.json'").
LlamaConfig parse_llama_config(const nlohmann::json& j, const std::string& where);
/// llama_config() for a config already read (`where` names the folder in errors).
InferenceConfig llama_inference_config(const LlamaConfig& cfg, const std::string& where, RuntimeConfig runtime,
                                       const LlamaOptions& options);
/// The LlamaOptions recorded in a config by llama_inference_config().
LlamaOptions llama_options_of(const InferenceConfig& config);

/// The token-generation stage (tag "token_generation") of a config from llama_inference_config();
/// `checkpoint_key_map` as WrapperOptions' (a VLM's checkpoint nests the text model's keys).
std::shared_ptr<ModelWrapper> make_token_generation(
    const InferenceConfig& config, std::function<std::string(const std::string&)> checkpoint_key_map = {});

/// The checks of LlamaForCausalLM::check_request (`rows`: the batch_size).
void check_generation_request(const LlamaConfig& cfg, const LlamaOptions& opts, std::int64_t rows,
                              const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen);

/// Runs the context encoding of the prompts (right-padded to the longest: ids [n, Tmax],
/// positions1 [n, Tmax] (0 = padding), last_index [n], sampling [n, 3], u [n]); returns its
/// output (token 0's ids first, then the logits with output_logits).
using PrefillFn = std::function<Output(const Tensor& ids, const Tensor& positions1, const Tensor& last_index,
                                       const Tensor& sampling, const Tensor& u)>;
/// generate() once the request is checked: the prefill through `prefill`, then one token per
/// live sequence per step through `token_generation`.
GenerationResult run_generation(const LlamaConfig& cfg, const LlamaOptions& opts,
                                const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen,
                                const TokenCallback& on_token, const PrefillFn& prefill,
                                ModelWrapper& token_generation);

}  // namespace devpipe::models
